"""A numeric format in one small class: a toy grid, registered for the test, runs through
round-to-nearest, the record, the checkpoint and the runtimes' fallback."""

import json

import pytest
import torch
from tiny_models import build_tiny, records_of

from lowbit.algorithms.rtn import rtn_quantize
from lowbit.checkpoint import MANIFEST, save_checkpoint
from lowbit.errors import ConfigError, LowbitError
from lowbit.formats import affine
from lowbit.formats.grids import GRIDS, Grid
from lowbit.loading import load_checkpoint
from lowbit.qtensor import QuantFormat, QuantizedWeight
from lowbit.recipes import ClipConfig
from lowbit.runtime.packed import PackedLinear
from lowbit.runtime.qlinear import QuantLinear


# ---- the diff to add a numeric format ----
class Cubic(Grid):
    """Levels dense near the zero point and sparse at the ends (as NF4's are)."""

    name = "cubic"

    def values(self, bits):
        h = 2 ** (bits - 1)
        t = torch.arange(2 * h, dtype=torch.float32) / h - 1  # -1 .. 1 - 1/h
        return h + h * t**3
# ---- (and GRIDS["cubic"] = Cubic()) ----


@pytest.fixture
def cubic(monkeypatch):
    monkeypatch.setitem(GRIDS, "cubic", Cubic())


def _on_grid(qw: QuantizedWeight) -> torch.Tensor:
    """Each dequantized value in code units: value / scale + zero, [out, G, gs]."""
    wg = affine.group_view(qw.dequantize(), qw.fmt.group_size)
    return wg / qw.float_scales().unsqueeze(-1) + qw.zero_points().unsqueeze(-1)


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("clip", [None, ClipConfig()])
def test_rtn_quantizes_to_the_grid_and_dequantize_reads_it(cubic, symmetric, clip):
    w = torch.randn(16, 96, generator=torch.Generator().manual_seed(0))
    qw = rtn_quantize(w, QuantFormat(4, 32, symmetric, grid="cubic"), clip)
    levels = Cubic().values(4)
    dist = (_on_grid(qw).unsqueeze(-1) - levels).abs().amin(-1)
    assert float(dist.max()) < 1e-3  # every dequantized value is a level of the cubic grid
    assert not torch.equal(qw.dequantize(), rtn_quantize(w, QuantFormat(4, 32, symmetric), clip).dequantize())
    # each code is its value's nearest level, in the same scale / zero frame as affine
    x = affine.group_view(w, 32) / qw.float_scales().unsqueeze(-1) + qw.zero_points().unsqueeze(-1)
    best = (x.unsqueeze(-1) - levels).abs().amin(-1)
    chosen = (x - levels[affine.group_view(qw.codes, 32).long()]).abs()
    assert torch.allclose(chosen, best)
    assert float((qw.dequantize() - w).norm() / w.norm()) < 0.3


def test_checkpoint_keeps_the_grid_and_packed_falls_back(cubic, tmp_path):
    model = build_tiny("llama")
    names = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and ".layers." in n]
    cubic_names = names[::2]
    for name in names:
        w = model.get_submodule(name).weight.detach()
        grid = "cubic" if name in cubic_names else "affine"
        qw = rtn_quantize(w, QuantFormat.resolved(w.shape[1], 4, 32, True, grid=grid), ClipConfig())
        model.set_submodule(name, QuantLinear.from_quantized(qw))
    records = records_of(model)
    save_checkpoint(records, model, None, tmp_path / "ck", {})

    entries = json.loads((tmp_path / "ck" / MANIFEST).read_text())["layers"]
    assert all(entries[n].get("grid") == ("cubic" if n in cubic_names else None) for n in names)

    loaded = load_checkpoint(tmp_path / "ck")
    for n in names:
        got = loaded.model.get_submodule(n).quantized_weight()
        assert got.fmt == records[n].fmt
        assert torch.equal(got.codes, records[n].codes)
        assert torch.equal(got.dequantize(), records[n].dequantize())

    packed = load_checkpoint(tmp_path / "ck", runtime="packed").model
    for n in names:
        m = packed.get_submodule(n)
        if n in cubic_names:
            assert type(m) is QuantLinear and m.fmt.grid == "cubic"
            assert torch.equal(m.dequantized_weight(torch.float32), records[n].dequantize())
        else:
            assert isinstance(m, PackedLinear)
    ids = torch.randint(0, 256, (1, 9), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        ref, got = loaded.model(ids).logits, packed(ids).logits
    assert torch.allclose(ref, got, atol=1e-3, rtol=1e-3)


def test_affine_format_is_stored_as_before():
    assert QuantFormat(4, 32, True).to_dict() == {"bits": 4, "group_size": 32, "symmetric": True}
    assert QuantFormat.from_dict({"bits": 4, "group_size": 32, "symmetric": True}).grid == "affine"


def test_grid_name_round_trips(cubic):
    fmt = QuantFormat(3, 16, False, grid="cubic")
    assert fmt.to_dict()["grid"] == "cubic" and QuantFormat.from_dict(fmt.to_dict()) == fmt


def test_unknown_grid_is_refused_by_name():
    with pytest.raises(ConfigError, match=r"grid 'nf5' is not one of affine"):
        QuantFormat(4, 32, True, grid="nf5")
    with pytest.raises(ConfigError, match="nf5"):
        QuantFormat.from_dict({"bits": 4, "group_size": 32, "symmetric": True, "grid": "nf5"})


def test_a_checkpoint_of_an_unknown_grid_is_refused_naming_it(cubic, tmp_path, monkeypatch):
    model = build_tiny("llama")
    name = "model.layers.0.mlp.up_proj"
    w = model.get_submodule(name).weight.detach()
    model.set_submodule(name, QuantLinear.from_quantized(rtn_quantize(w, QuantFormat(4, 32, True, grid="cubic"))))
    save_checkpoint(records_of(model), model, None, tmp_path / "ck", {})
    monkeypatch.delitem(GRIDS, "cubic")
    with pytest.raises(LowbitError, match="cubic"):
        load_checkpoint(tmp_path / "ck")
