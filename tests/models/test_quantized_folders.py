"""GPTQ, AWQ and compressed-tensors folders load as the float models their codes stand for: folders
built here from known codes, scales and zero points (packed by slow bit-by-bit reference packers)
load with exactly the weights (q - z) * s, bit for bit."""

import json

import pytest
import torch
from safetensors.torch import save_file
from tiny_models import CHAT_WORDS, build_tiny, word_tokenizer

from lowbit.cli import main
from lowbit.errors import ConfigError
from lowbit.models import load_model
from lowbit.models.quantized_folders import quant_method, unpack_int32_rows

AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # nibble k of a word holds output column 8j + AWQ_ORDER[k]


def _int32(words):
    """Python ints in [0, 2**32) -> int32 tensor (two's complement)."""
    return torch.tensor([[w - (1 << 32) if w >= 1 << 31 else w for w in row] for row in words], dtype=torch.int32)


def pack_rows_reference(values, bits):
    """values [n, C] -> int32 [ceil(n * bits / 32), C]: each column one little-endian bit stream."""
    n, c = values.shape
    words = [[0] * c for _ in range(-(-n * bits // 32))]
    for i in range(n):
        for col in range(c):
            v = int(values[i, col])
            for b in range(bits):
                pos = i * bits + b
                words[pos // 32][col] |= ((v >> b) & 1) << (pos % 32)
    return _int32(words)


def pack_awq_reference(values):
    """values [R, C] (4-bit) -> int32 [R, C / 8] in AWQ's nibble order."""
    r, c = values.shape
    return _int32([[sum(int(values[i, 8 * j + AWQ_ORDER[k]]) << (4 * k) for k in range(8)) for j in range(c // 8)]
                   for i in range(r)])


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_unpacking_inverts_the_reference_packer(bits):
    values = torch.randint(0, 1 << bits, (77, 5), generator=torch.Generator().manual_seed(bits))
    assert torch.equal(unpack_int32_rows(pack_rows_reference(values, bits), bits, 77), values.to(torch.int32))


def _linears(model):
    return [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and ".layers." in n]


def _known(out, n_in, bits, group_size, seed, act_order=False, zero_low=0):
    """Codes q [in, out], zeros z [G, out], float16 scales s [G, out], g_idx [in], and the weight
    [out, in] they stand for, w[o, i] = (q[i, o] - z[g[i], o]) * s[g[i], o]."""
    gen = torch.Generator().manual_seed(seed)
    gs = n_in if group_size == -1 else group_size
    groups = n_in // gs
    q = torch.randint(0, 1 << bits, (n_in, out), generator=gen)
    z = torch.randint(zero_low, 1 << bits, (groups, out), generator=gen)
    s = (torch.rand(groups, out, generator=gen) * 0.02 + 0.001).half()
    g = torch.arange(n_in) // gs
    if act_order:
        g = g[torch.randperm(n_in, generator=gen)]
    w = torch.empty(out, n_in)
    for i in range(n_in):
        w[:, i] = (q[i] - z[g[i]]).float() * s[g[i]].float()
    return q, z, s, g, w


def _write_folder(folder, model, config_q, layer_parts):
    """A Hugging Face folder of `model` whose decoder linears are replaced by layer_parts(k, name,
    [out, in]) -> (tensors, expected weight); returns {name: expected weight}."""
    state, seen = {}, set()
    for k, t in model.state_dict().items():  # a tied head is stored once, as transformers saves it
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            state[k] = t.contiguous()
    expected = {}
    for k, name in enumerate(_linears(model)):
        del state[f"{name}.weight"]
        parts, expected[name] = layer_parts(k, name, tuple(model.get_submodule(name).weight.shape))
        state.update({f"{name}.{p}": t.contiguous() for p, t in parts.items()})
    folder.mkdir()
    save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
    model.config.save_pretrained(folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "quantization_config": config_q}))
    word_tokenizer().save_pretrained(folder)
    return expected


def _gptq_folder(folder, bits, group_size, checkpoint_format="gptq", act_order=False):
    def parts(k, name, shape):
        out, n_in = shape
        q, z, s, g, w = _known(out, n_in, bits, group_size, k, act_order, zero_low=1)
        stored_z = z - 1 if checkpoint_format == "gptq" else z
        tensors = {"qweight": pack_rows_reference(q, bits), "qzeros": pack_rows_reference(stored_z.T, bits).T,
                   "scales": s, "g_idx": g.to(torch.int32)}
        return tensors, w

    q = {"quant_method": "gptq", "bits": bits, "group_size": group_size, "desc_act": act_order, "sym": False,
         "checkpoint_format": checkpoint_format}
    return _write_folder(folder, build_tiny("llama", tie=False, vocab=len(CHAT_WORDS)), q, parts)


def _awq_folder(folder, group_size=32, **config):
    def parts(k, name, shape):
        out, n_in = shape
        q, z, s, _, w = _known(out, n_in, 4, group_size, k)
        return {"qweight": pack_awq_reference(q), "qzeros": pack_awq_reference(z), "scales": s}, w

    q = {"quant_method": "awq", "bits": 4, "group_size": group_size, "zero_point": True, "version": "gemm", **config}
    return _write_folder(folder, build_tiny("qwen2", tie=True, vocab=len(CHAT_WORDS)), q, parts)


def _assert_weights(loaded, expected):
    for name, w in expected.items():
        assert torch.equal(loaded.model.get_submodule(name).weight, w), name


@pytest.mark.parametrize("bits,group_size,checkpoint_format,act_order", [
    (4, 32, "gptq", True), (3, 32, "gptq_v2", False), (8, -1, "gptq", False), (2, 16, "gptq", True)])
def test_gptq_folders_load_their_exact_weights(tmp_path, bits, group_size, checkpoint_format, act_order):
    expected = _gptq_folder(tmp_path / "gptq", bits, group_size, checkpoint_format, act_order)
    assert quant_method(tmp_path / "gptq") == "gptq"
    loaded = load_model(str(tmp_path / "gptq"))
    _assert_weights(loaded, expected)
    assert all(not p.is_meta for p in loaded.model.parameters())


def test_awq_folders_load_their_exact_weights(tmp_path):
    expected = _awq_folder(tmp_path / "awq")
    loaded = load_model(str(tmp_path / "awq"))
    _assert_weights(loaded, expected)  # Qwen2: the biases and the tied head come along
    assert loaded.model.lm_head.weight.data_ptr() == loaded.model.model.embed_tokens.weight.data_ptr()


def test_a_compressed_tensors_export_transformers_cannot_load_is_read(tmp_path):
    """Asymmetric layers in several config groups (a budget's export): lowbit decompresses each
    layer with its own scheme, to exactly the records' weights."""
    pytest.importorskip("compressed_tensors")
    from lowbit.algorithms.rtn import rtn_quantize
    from lowbit.checkpoint import save_checkpoint
    from lowbit.export.compressed_tensors import export_compressed_tensors
    from lowbit.qtensor import QuantFormat
    from lowbit.runtime.qlinear import QuantLinear

    model = build_tiny("qwen2", tie=True, vocab=len(CHAT_WORDS))
    records = {}
    for k, name in enumerate(_linears(model)):
        lin = model.get_submodule(name)
        bits, group_size = ((4, 16), (8, -1), (3, 32))[k % 3]
        records[name] = rtn_quantize(lin.weight.detach(), QuantFormat.resolved(lin.in_features, bits, group_size, False))
        model.set_submodule(name, QuantLinear.from_quantized(records[name], lin.bias))
    save_checkpoint(records, model, word_tokenizer(), tmp_path / "ck", {"recipe": {"method": "rtn"}})
    out = export_compressed_tensors(tmp_path / "ck", tmp_path / "ct").path
    assert quant_method(out) == "compressed-tensors"
    _assert_weights(load_model(str(out)), {n: qw.dequantize() for n, qw in records.items()})


def test_eval_scores_a_gptq_folder_as_its_dequantized_model(tmp_path, capsys):
    expected = _gptq_folder(tmp_path / "gptq", 4, 32, act_order=True)
    plain = build_tiny("llama", tie=False, vocab=len(CHAT_WORDS))
    # the float model with the folder's dequantized weights
    plain.load_state_dict({f"{n}.weight": w for n, w in expected.items()}, strict=False)
    folder = tmp_path / "plain"
    plain.save_pretrained(folder)
    word_tokenizer().save_pretrained(folder)
    text = tmp_path / "text.txt"
    text.write_text(" ".join(f"w{(i * 7) % 61}" for i in range(600)))
    scores = []
    for model in (tmp_path / "gptq", folder):
        assert main(["eval", str(model), "--data", str(text), "--reference", "none", "--seqlen", "64",
                     "--dtype", "fp32", "--json", "-q"]) == 0
        scores.append([d["ppl"] for d in json.loads(capsys.readouterr().out)["datasets"].values()])
    assert scores[0] == scores[1] and len(scores[0]) == 1


@pytest.mark.parametrize("make,change,what", [
    (_awq_folder, {"version": "gemv"}, "gemv"),
    (_gptq_folder, {"checkpoint_format": "marlin"}, "marlin"),
    (_gptq_folder, {"bits": 5}, "5"),
])
def test_layouts_it_cannot_read_are_refused(tmp_path, make, change, what):
    if make is _gptq_folder:
        make(tmp_path / "m", 4, 32)
    else:
        make(tmp_path / "m")
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    config["quantization_config"].update(change)
    (tmp_path / "m" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match=what):
        load_model(str(tmp_path / "m"))


def test_a_layer_without_its_zero_points_is_refused_by_name(tmp_path):
    _gptq_folder(tmp_path / "m", 4, 32)
    from safetensors.torch import load_file

    state = load_file(tmp_path / "m" / "model.safetensors")
    del state["model.layers.1.mlp.up_proj.qzeros"]
    save_file(state, tmp_path / "m" / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ConfigError, match=r"model\.layers\.1\.mlp\.up_proj"):
        load_model(str(tmp_path / "m"))
