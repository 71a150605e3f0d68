"""The method table: a new method is a layer quantizer (one function) plus one entry in each table.

The toy method here, "rtn-noclip", rounds to nearest over each group's full range (no clipping
search). Registering it is the whole diff a new method needs; the pipeline runs it, records it,
and the checkpoint saves and loads it like any other.
"""

import pytest
import torch
from tiny_models import loaded_tiny

from lowbit.algorithms.cores import CORES, Core, LayerJob, LayerResult
from lowbit.algorithms.rtn import rtn_quantize
from lowbit.errors import ConfigError
from lowbit.loading import load_checkpoint
from lowbit.methods import METHODS, Method
from lowbit.pipeline import quantize, save


def rtn_noclip(job: LayerJob) -> LayerResult:
    """The toy method's layer quantizer: round-to-nearest over each group's full range."""
    return LayerResult(rtn_quantize(job.weight, job.spec.fmt), details={"toy": True})


@pytest.fixture
def toy(monkeypatch):
    monkeypatch.setitem(CORES, "rtn-noclip", Core(rtn_noclip))
    monkeypatch.setitem(METHODS, "rtn-noclip", Method("rtn-noclip", core="rtn-noclip"))


def test_a_registered_method_quantizes_saves_and_loads(toy, tmp_path):
    from lowbit.recipes import Recipe

    lm = loaded_tiny()
    originals = {n: m.weight.detach().clone() for n, m in lm.model.named_modules() if ".layers." in n
                 and isinstance(m, torch.nn.Linear)}
    res = quantize(lm, Recipe(method="rtn-noclip", bits=3, group_size=32), progress=False)
    assert set(res.weights) == set(originals) and res.calibration is None
    for name, qw in res.weights.items():
        expected = rtn_quantize(originals[name], qw.fmt)
        assert torch.equal(qw.codes, expected.codes) and torch.equal(qw.scales, expected.scales)
        assert qw.fmt.bits == 3 and qw.fmt.group_size == 32 and res.layers[name].extra == {"toy": True}
    # it differs from the built-in rtn, whose clipping search shrinks some ranges
    searched = quantize(loaded_tiny(), Recipe(method="rtn", bits=3, group_size=32), progress=False)
    assert any(not torch.equal(res.weights[n].codes, searched.weights[n].codes) for n in originals)
    out = save(res, tmp_path / "ck")
    back = load_checkpoint(out)
    for name, qw in res.weights.items():
        loaded = back.model.get_submodule(name).quantized_weight()
        assert torch.equal(loaded.codes, qw.codes) and torch.equal(loaded.dequantize(), qw.dequantize())


def test_the_table_answers_for_every_method():
    assert set(METHODS) == {"rtn", "gptq", "awq", "awq-gptq", "slim", "awq-slim"}
    for m in METHODS.values():
        assert m.core in CORES and (m.needs_data or not CORES[m.core].needs_hessian)
    assert [m for m in METHODS if METHODS[m].fractional_bits] == ["slim", "awq-slim"]
    assert [m for m in METHODS if METHODS[m].smoothing] == ["awq", "awq-gptq", "awq-slim"]


def test_an_unregistered_method_is_refused_by_name():
    from lowbit.recipes import Recipe

    with pytest.raises(ConfigError, match="rtn-noclip"):
        Recipe(method="rtn-noclip")
