"""Export to compressed-tensors: the folder transformers loads holds exactly lowbit's weights, the
tensors equal what the library's own compressor writes, and formats it cannot express are refused
naming the layer, with nothing written."""

import json

import pytest
import torch
from tiny_models import CHAT_WORDS, build_tiny, word_tokenizer

from lowbit.algorithms.gptq import gptq_quantize
from lowbit.algorithms.rtn import rtn_quantize
from lowbit.checkpoint import save_checkpoint
from lowbit.cli import main
from lowbit.errors import ConfigError
from lowbit.export.compressed_tensors import (
    SchemeKey,
    compressed_tensors_state,
    export_compressed_tensors,
    quantization_scheme,
)
from lowbit.formats.grids import GRIDS, Grid
from lowbit.loading import load_checkpoint
from lowbit.qtensor import QuantFormat, QuantizedWeight
from lowbit.recipes import GPTQConfig

pytest.importorskip("compressed_tensors")
transformers = pytest.importorskip("transformers")
# from_pretrained(..., quantization_config=CompressedTensorsConfig(dequantize=True)) warns that it keeps the
# folder's config and takes only the loading attributes: what is asked for
pytestmark = pytest.mark.filterwarnings("ignore:You passed `quantization_config`:UserWarning")

IDS = torch.randint(3, len(CHAT_WORDS), (2, 24), generator=torch.Generator().manual_seed(1))


def _linears(model):
    return [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and ".layers." in n]


def _checkpoint(path, quantizer, arch="llama", tie=False, method="rtn"):
    """A lowbit checkpoint of a tiny model whose decoder linears are quantizer(k, name, weight)
    records (None keeps a layer dense); returns (folder, records)."""
    from lowbit.runtime.qlinear import QuantLinear

    model = build_tiny(arch, tie=tie, vocab=len(CHAT_WORDS))
    records = {}
    for k, name in enumerate(_linears(model)):
        lin = model.get_submodule(name)
        qw = quantizer(k, name, lin.weight.detach())
        if qw is not None:
            records[name] = qw
            model.set_submodule(name, QuantLinear.from_quantized(qw, lin.bias))
    save_checkpoint(records, model, word_tokenizer(), path, {"recipe": {"method": method}})
    return path, records


def _uniform(bits, group_size, symmetric):
    return lambda k, name, w: rtn_quantize(w, QuantFormat.resolved(w.shape[1], bits, group_size, symmetric))


def _lowbit_logits(ckpt):
    with torch.inference_mode():
        return load_checkpoint(ckpt).model(IDS).logits


def _hf(folder, dequantize=True):
    """transformers' model of the folder: dequantized at load, or (its default) compressed modules
    that decompress at the first forward."""
    kw = {"quantization_config": transformers.CompressedTensorsConfig(dequantize=True)} if dequantize else {}
    return transformers.AutoModelForCausalLM.from_pretrained(folder, **kw).eval()


def _check_loaded(model, records, ckpt):
    with torch.inference_mode():
        torch.testing.assert_close(model(IDS).logits, _lowbit_logits(ckpt), rtol=1e-5, atol=1e-5)
    for name, qw in records.items():  # bit for bit: the record's dequantization
        assert torch.equal(model.get_submodule(name).weight, qw.dequantize()), name


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("group_size", [16, 32])
def test_transformers_loads_lowbits_weights(tmp_path, bits, symmetric, group_size):
    ckpt, records = _checkpoint(tmp_path / "ck", _uniform(bits, group_size, symmetric))
    out = export_compressed_tensors(ckpt, tmp_path / "ct").path
    q = json.loads((out / "config.json").read_text())["quantization_config"]
    (group,) = q["config_groups"].values()
    assert q["format"] == "pack-quantized" and q["ignore"] == ["lm_head"] and group["targets"] == ["Linear"]
    assert group["weights"] == {**group["weights"], "num_bits": bits, "group_size": group_size,
                                "symmetric": symmetric, "strategy": "group", "type": "int"}
    assert (out / "tokenizer.json").is_file()
    _check_loaded(_hf(out), records, ckpt)
    if symmetric:  # transformers' default path: compressed modules, decompressed at the first forward
        _check_loaded(_hf(out, dequantize=False), records, ckpt)


def mixed_quantizer(symmetric):
    """Per-layer formats as a budget picks them: a per-channel act-order GPTQ layer (a permutation
    within its one group), a dense layer, 4-bit g16 and 8-bit per-channel layers."""
    def quantizer(k, name, w):
        if k == 0:
            x = torch.randn(64, w.shape[1], generator=torch.Generator().manual_seed(k))
            fmt = QuantFormat.resolved(w.shape[1], 4, -1, symmetric)
            return gptq_quantize(w, 2 * x.T @ x / 64, fmt, config=GPTQConfig(act_order=True)).qweight
        if k == 1:
            return None
        return _uniform(*((4, 16, symmetric) if k % 2 else (8, -1, True)))(k, name, w)

    return quantizer


def test_mixed_formats_become_config_groups(tmp_path):
    """Several config groups, per-channel rows, a permuted layer, biases (Qwen2), a tied head:
    transformers' default loader applies each layer's scheme."""
    ckpt, records = _checkpoint(tmp_path / "ck", mixed_quantizer(True), arch="qwen2", tie=True, method="gptq")
    assert records["model.layers.0.self_attn.q_proj"].perm is not None
    result = export_compressed_tensors(ckpt, tmp_path / "ct")
    assert set(result.groups) == {SchemeKey(4, True, None), SchemeKey(4, True, 16), SchemeKey(8, True, None)}
    q = json.loads((result.path / "config.json").read_text())["quantization_config"]
    targets = {t for g in q["config_groups"].values() for t in g["targets"]}
    assert targets == set(records) and "model.layers.0.self_attn.k_proj" in q["ignore"]
    assert any("model.layers.0.self_attn" in n for n in result.notes)  # q/k/v in three formats: vLLM fuses them
    _check_loaded(_hf(result.path, dequantize=False), records, ckpt)


@pytest.mark.parametrize("bits", [3, 4, 8])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("shape,group_size", [((40, 48), 16), ((33, 64), -1)])
def test_tensors_equal_the_librarys_own_compressor(bits, symmetric, shape, group_size):
    """compressed_tensors_state == PackedQuantizationCompressor.compress of the dequantized weight
    with the same scales and zero points, bit for bit; decompress gives the record's weight back."""
    from compressed_tensors.compressors import PackedQuantizationCompressor

    w = torch.randn(*shape, generator=torch.Generator().manual_seed(bits))
    qw = rtn_quantize(w, QuantFormat.resolved(shape[1], bits, group_size, symmetric))
    key = SchemeKey(bits, symmetric, None if group_size == -1 else group_size)
    scheme = quantization_scheme(key, ["Linear"])
    ours = compressed_tensors_state(qw, torch.float32)
    given = {"weight": qw.dequantize(), "weight_scale": qw.scales.float()}
    if not symmetric:
        given["weight_zero_point"] = (qw.zeros.to(torch.int16) - (1 << (bits - 1))).to(torch.int8)
    theirs = PackedQuantizationCompressor.compress(given, scheme)
    assert set(ours) == set(theirs)
    for k in ours:
        assert torch.equal(ours[k], theirs[k]), k
    back = PackedQuantizationCompressor.decompress(dict(ours), scheme)
    assert torch.equal(back["weight"], qw.dequantize())


def test_the_cli_writes_a_folder_transformers_loads(tmp_path, capsys):
    ckpt, records = _checkpoint(tmp_path / "ck", _uniform(4, 32, True))
    assert main(["export", str(ckpt), "--to", "compressed-tensors", "-o", str(tmp_path / "ct"), "--dtype", "fp32"]) == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / "ct")
    _check_loaded(_hf(tmp_path / "ct", dequantize=False), records, ckpt)


# ---------------------------------------------------------------- refusals
class _SquareGrid(Grid):
    name = "test-square"

    def values(self, bits):
        return torch.arange(1 << bits, dtype=torch.float32) ** 2 / ((1 << bits) - 1)


def _mixed(w):
    """A SliM-style record: groups of 2 and 3 bits."""
    base = rtn_quantize(w, QuantFormat.resolved(w.shape[1], 2, 16, False))
    widths = torch.tensor([2, 3] * (w.shape[1] // 32), dtype=torch.uint8)
    return QuantizedWeight(base.codes, base.scales, base.zeros, QuantFormat.resolved(w.shape[1], 3, 16, False),
                           group_bits=widths)


def _act_order(w):
    x = torch.randn(64, w.shape[1], generator=torch.Generator().manual_seed(0))
    fmt = QuantFormat.resolved(w.shape[1], 4, 16, False)
    return gptq_quantize(w, 2 * x.T @ x / 64 + torch.diag(torch.arange(w.shape[1]) * 1.0), fmt,
                         config=GPTQConfig(act_order=True)).qweight


REFUSED = {
    "slim mixed widths": (_mixed, "--bits 3"),
    "integer scale": (lambda w: rtn_quantize(w, QuantFormat.resolved(w.shape[1], 4, 16, False, scale_bits=8)),
                      "--bits 4"),
    "non-affine grid": (lambda w: rtn_quantize(w, QuantFormat.resolved(w.shape[1], 4, 16, False,
                                                                       grid="test-square")), "--bits 4"),
    "short last group": (lambda w: rtn_quantize(w, QuantFormat.resolved(w.shape[1], 4, 48, False)), "--group-size 32"),
    "act-order across groups": (_act_order, "--static-groups"),
}


@pytest.mark.parametrize("case", list(REFUSED))
def test_inexpressible_formats_are_refused_naming_the_layer(tmp_path, monkeypatch, case):
    monkeypatch.setitem(GRIDS, "test-square", _SquareGrid())
    make, fix = REFUSED[case]
    bad = "model.layers.1.mlp.down_proj"
    ckpt, _ = _checkpoint(tmp_path / "ck", lambda k, name, w: make(w) if name == bad else _uniform(4, 16, False)(k, name, w))
    before = sorted(p.name for p in tmp_path.iterdir())
    with pytest.raises(ConfigError) as e:
        export_compressed_tensors(ckpt, tmp_path / "ct")
    assert bad in str(e.value) and fix in str(e.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no folder, no staging left


def test_a_width_the_packer_refuses_is_refused(tmp_path, monkeypatch):
    from compressed_tensors.compressors import PackedQuantizationCompressor

    real = PackedQuantizationCompressor.can_compress.__func__
    monkeypatch.setattr(PackedQuantizationCompressor, "can_compress",
                        classmethod(lambda cls, t, s: s.weights.num_bits != 3 and real(cls, t, s)))
    ckpt, _ = _checkpoint(tmp_path / "ck", lambda k, n, w: _uniform(3 if k == 2 else 4, 16, True)(k, n, w))
    with pytest.raises(ConfigError, match="model.layers.0.self_attn.v_proj"):
        export_compressed_tensors(ckpt, tmp_path / "ct")
    assert not (tmp_path / "ct").exists()


def test_an_existing_output_is_left_alone(tmp_path, capsys):
    ckpt, _ = _checkpoint(tmp_path / "ck", _uniform(4, 16, True))
    (tmp_path / "ct").mkdir()
    (tmp_path / "ct" / "mine.txt").write_text("keep")
    code = main(["export", str(ckpt), "--to", "compressed-tensors", "-o", str(tmp_path / "ct")])
    err = capsys.readouterr().err
    assert code == 2 and str(tmp_path / "ct") in err and len(err.strip().splitlines()) == 1
    assert [p.name for p in (tmp_path / "ct").iterdir()] == ["mine.txt"]
