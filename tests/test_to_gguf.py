"""quantize_to_gguf and `lowbit quantize --format gguf:MIX`: lowbit's records written on llama.cpp's
block types, read back by gguf's reader and by transformers' GGUF loader as the same weights."""

from __future__ import annotations

import json

import pytest
import torch
from tiny_models import WORDS, write_tiny_gguf_of

from lowbit.cli import main
from lowbit.errors import ConfigError
from lowbit.export.gguf import gguf_names, read_types
from lowbit.models import load_model
from lowbit.recipes import Recipe
from lowbit.to_gguf import is_lowbit_gguf, quantize_to_gguf

TEXT = " ".join(WORDS[3 + (i * 7) % (len(WORDS) - 3)] for i in range(3000))


@pytest.fixture
def env(tmp_path, monkeypatch):
    monkeypatch.setenv("LOWBIT_CACHE", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    (tmp_path / "text.txt").write_text(TEXT)
    return tmp_path


def _calibrated(method: str) -> Recipe:
    return Recipe.from_dict({"method": method, "calibration": {"dataset": "text.txt", "n_samples": 4, "seqlen": 32}})


@pytest.mark.parametrize("arch,method", [("llama", "rtn"), ("qwen2", "gptq"), ("gemma3", "awq-gptq")])
def test_the_written_file_holds_the_records_and_loads_back_as_them(env, arch, method):
    write_tiny_gguf_of(env / "src.gguf", arch)
    loaded = load_model("src.gguf", cache=env / "cache", progress=False)
    res = quantize_to_gguf(loaded, _calibrated(method), "Q4_0", env / "out.gguf", progress=False)
    names = gguf_names(loaded.model)
    types = read_types(env / "out.gguf")
    assert set(types) == set(res.types) == set(names.values())
    for hf, gname in names.items():
        shape = tuple(loaded.model.get_parameter(hf).shape)
        # llama.cpp's Q4_0 mix: the output head in Q6_K, every other matrix in Q4_0, norms as they are
        want = ("Q6_K" if gname == "output.weight" else "Q4_0") if len(shape) == 2 else "F32"
        assert types[gname] == (want, shape), gname
    assert is_lowbit_gguf(env / "out.gguf")
    back = load_model("out.gguf", cache=env / "cache", progress=False).model
    assert res.quantized.weights
    for name, record in res.quantized.weights.items():
        assert torch.equal(back.get_parameter(f"{name}.weight"), record.dequantize()), name
    assert res.bits_per_weight == pytest.approx(4.5)


def test_gptq_on_the_block_grid_beats_rtn_in_kl_on_text_like_the_calibration(env):
    write_tiny_gguf_of(env / "src.gguf", "llama")
    losses = {}
    for method in ("rtn", "gptq"):
        loaded = load_model("src.gguf", cache=env / "cache", progress=False)
        quantize_to_gguf(loaded, _calibrated(method), "Q4_0", env / f"{method}.gguf", progress=False)
        ref = load_model("src.gguf", cache=env / "cache", progress=False).model
        q = load_model(f"{method}.gguf", cache=env / "cache", progress=False).model
        ids = loaded.tokenizer(TEXT[-2000:], return_tensors="pt").input_ids[:, -256:]
        with torch.no_grad():
            p = torch.log_softmax(ref(ids).logits, -1)
            lq = torch.log_softmax(q(ids).logits, -1)
        losses[method] = float((p.exp() * (p - lq)).sum(-1).mean())
    assert losses["gptq"] < losses["rtn"]


def test_cli_writes_a_gguf_and_refuses_to_overwrite_a_foreign_file(env, capsys):
    write_tiny_gguf_of(env / "src.gguf", "llama")
    args = ["quantize", "src.gguf", "--method", "rtn", "--format", "gguf:Q8_0", "-o", "out.gguf", "-q"]
    assert main(args) == 0
    assert {t for t, _ in read_types(env / "out.gguf").values()} == {"Q8_0", "F32"}
    assert main(["eval", "out.gguf", "--data", "text.txt", "--max-tokens", "128", "--seqlen", "64", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["datasets"]["text.txt"]["kl_mean"] > 0   # the source named in the file is the reference
    assert result["size"]["bits_per_weight"] == pytest.approx(8.5)  # Q8_0: 34 bytes per 32 weights
    assert main(["generate", "out.gguf", "--prompt", "w3 w7", "--raw", "--max-new-tokens", "4", "--json"]) == 0
    assert 1 <= len(json.loads(capsys.readouterr().out)["tokens"]) <= 4  # runs like any GGUF model
    assert main(args) == 2                       # exists: needs --force
    assert main([*args, "--force"]) == 0         # lowbit wrote it: replaced
    (env / "mine.gguf").write_bytes(b"not lowbit's")
    assert main([*args[:-2], "mine.gguf", "-q", "--force"]) == 2
    assert (env / "mine.gguf").read_bytes() == b"not lowbit's"
    assert main(["quantize", "src.gguf", "--method", "slim", "--bits", "2.5", "--format", "gguf:Q4_0", "-o",
                 "x.gguf", "-q"]) == 2
    assert not (env / "x.gguf").exists()
    assert main(["quantize", "src.gguf", "--format", "gguf:Q9_X", "-o", "y.gguf", "-q"]) == 2
    capsys.readouterr()


def test_gguf_needs_a_mix_or_a_budget_over_block_types(env):
    """Without a mix a budget must choose the types (tests/budget/test_ggml_budget.py writes such
    files); one over affine levels someone chose cannot, and names them."""
    write_tiny_gguf_of(env / "src.gguf", "llama")
    loaded = load_model("src.gguf", cache=env / "cache", progress=False)
    with pytest.raises(ConfigError, match="mix"):
        quantize_to_gguf(loaded, Recipe(method="rtn"), None, env / "a.gguf", progress=False)
    recipe = Recipe.from_dict({"method": "rtn", "budget": {"target_bpw": 3.0, "levels": ["w3g64", "w4g64"]}})
    with pytest.raises(ConfigError, match="w3g64"):
        quantize_to_gguf(loaded, recipe, "Q4_0", env / "b.gguf", progress=False)
    assert not (env / "a.gguf").exists() and not (env / "b.gguf").exists()


def test_a_hugging_face_folder_gets_its_metadata_from_llama_cpps_converter(env, monkeypatch):
    """A model that did not come from a GGUF: llama.cpp's converter (--vocab-only) supplies the
    hyper-parameters and tokenizer (needs the llama.cpp tools built in the usual cache)."""
    import sys
    from pathlib import Path

    from lowbit.export.gguf import GGUFMetadata
    from lowbit.peers.llamacpp import built_tools, tools_dir

    with monkeypatch.context() as m:
        m.delenv("LOWBIT_CACHE")  # the usual cache, not the test's
        tools, where = built_tools(), tools_dir()
    if tools is None:
        pytest.skip(f"llama.cpp tools not built in {where} (lowbit.peers.llamacpp.ensure_llamacpp)")
    (env / "cache" / "llamacpp").mkdir(parents=True)
    (env / "cache" / "llamacpp" / tools.root.name).symlink_to(tools.root)
    sys.path.insert(0, str(Path(__file__).parent / "peers"))
    from test_llamacpp_imatrix import write_tiny_llama

    write_tiny_llama(env / "src.gguf")
    folder = load_model("src.gguf", cache=env / "cache", progress=False).model.name_or_path
    loaded = load_model(folder, cache=env / "cache", progress=False)
    assert loaded.source.kind == "hf_folder"
    quantize_to_gguf(loaded, Recipe(method="rtn"), "Q8_0", env / "out.gguf", progress=False)
    src, out = GGUFMetadata.from_file(env / "src.gguf").fields, GGUFMetadata.from_file(env / "out.gguf").fields
    for key in ("llama.block_count", "llama.embedding_length", "llama.attention.head_count",
                "llama.attention.head_count_kv", "tokenizer.ggml.tokens"):
        assert out[key][0] == src[key][0], key
    back = load_model("out.gguf", cache=env / "cache", progress=False)
    assert back.tokenizer("w3 w7").input_ids == loaded.tokenizer("w3 w7").input_ids
