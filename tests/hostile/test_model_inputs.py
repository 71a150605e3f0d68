"""Hostile input models and implausible results (issue 22): non-finite or overflowing weights,
GPTQ's silent fallback, GGUF files whose header lies or is damaged, a tampered conversion cache,
pickled weights, model folders that want their own code, manifests that name a download, and
perplexities that mean nothing."""

from __future__ import annotations

import builtins
import json
import os
import shutil
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from hostile_cli import assert_clean_error, run_cli, tree
from rendered import numbers, warnings_logged
from safetensors.torch import load_file, save_file
from tiny_models import FOLDER_POSITIONS, WORDS, build_tiny
from transformers import LlamaForCausalLM

from lowbit.checkpoint import Manifest, Source
from lowbit.errors import ConfigError, LowbitError, ModelNotFoundError
from lowbit.eval.evaluate import (
    DatasetResult,
    evaluate,
    implausible,
    load_reference_for,
)
from lowbit.models import fetch as fetch_module
from lowbit.models import hashing, load_model
from lowbit.models.convert import SOURCE_RECORD
from lowbit.pipeline import quantize
from lowbit.recipes import Recipe

Q_PROJ = "model.layers.1.self_attn.q_proj.weight"
NORM = "model.layers.0.input_layernorm.weight"


def set_value(folder: Path, tensor: str, value: float, index=(0, 0)) -> None:
    """Overwrite one entry of a tensor in the folder's model.safetensors."""
    path = folder / "model.safetensors"
    sd = load_file(path)
    sd[tensor][index] = value
    save_file(sd, path, metadata={"format": "pt"})


def quantize_args(method: str) -> list[str]:
    args = ["quantize", "tiny", "--method", method, "--bits", "4", "--group-size", "32", "-o", "out", "-q"]
    if method == "gptq":
        args += ["--calib-data", "text.txt", "--calib-samples", "4", "--calib-seqlen", "32"]
    return args


# --- non-finite and overflowing weights -------------------------------------------------------

@pytest.mark.parametrize("method", ["rtn", "gptq"])
@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_weight_is_refused_naming_the_tensor(env, capsys, method, value):
    set_value(env / "tiny", Q_PROJ, value)
    rc, _, err = run_cli(capsys, *quantize_args(method))
    assert Q_PROJ in assert_clean_error(rc, err)
    assert not (env / "out").exists()


def test_non_finite_norm_weight_is_refused_too(env, capsys):
    """Every floating parameter is checked, not only the layers to quantize."""
    set_value(env / "tiny", NORM, float("nan"), index=(3,))
    rc, _, err = run_cli(capsys, *quantize_args("rtn"))
    assert NORM in assert_clean_error(rc, err)


@pytest.mark.parametrize("method", ["rtn", "gptq"])
def test_weight_whose_scale_overflows_float16_is_refused_naming_the_layer(env, capsys, method):
    # 1e7 at 4 bits needs a group scale of ~670000 (asymmetric: ~1e7 / 15), above float16's 65504,
    # and still ~130000 at the clipping search's smallest ratio (0.2)
    set_value(env / "tiny", Q_PROJ, 1e7)
    rc, _, err = run_cli(capsys, *quantize_args(method))
    line = assert_clean_error(rc, err)
    assert Q_PROJ.removesuffix(".weight") in line and "skip" in line
    assert not (env / "out").exists()


def test_float16_load_that_overflows_is_refused(env, capsys):
    set_value(env / "tiny", Q_PROJ, 1e6)  # fine in the float32 file, inf once loaded as float16
    rc, _, err = run_cli(capsys, *quantize_args("rtn"), "--dtype", "float16")
    line = assert_clean_error(rc, err)
    assert Q_PROJ in line and "float32" in line


def test_quantized_weight_check_finite():
    from lowbit.algorithms.rtn import rtn_quantize
    from lowbit.qtensor import QuantFormat

    w = torch.randn(8, 64)
    rtn_quantize(w, QuantFormat(4, 32, False)).check_finite("ok")
    w[2, 40] = 1e6
    with pytest.raises(ConfigError, match="layer big"):
        rtn_quantize(w, QuantFormat(4, 32, False)).check_finite("big")
    rtn_quantize(w, QuantFormat(8, 32, False)).check_finite("big at 8 bits")  # 1e6 / 255 fits float16


# --- GPTQ fallback ------------------------------------------------------------------------------

def test_forced_cholesky_failure_is_recorded_as_a_fallback(env, monkeypatch, caplog):
    from lowbit.algorithms import gptq

    monkeypatch.setattr(gptq, "inverse_hessian_cholesky", lambda H, damp: (torch.eye(H.shape[0]), float("inf")))
    loaded = load_model("tiny", cache=env / "cache", progress=False)
    recipe = Recipe.from_dict({"method": "gptq", "bits": 4, "group_size": 32, "head_bits": 0,  # blocks only
                               "calibration": {"dataset": "text.txt", "n_samples": 4, "seqlen": 32}})
    result = quantize(loaded, recipe, progress=False)
    assert result.fallbacks == list(result.layers) and len(result.fallbacks) == 14
    assert all(r.fallback and r.damp is None for r in result.layers.values())
    assert result.extra["fallbacks"] == result.fallbacks  # carried into the manifest
    assert numbers(result.fallback_summary())[:2] == [14, 14]  # how many of how many
    assert result.fallback_summary() in warnings_logged(caplog)  # and said once as a warning


def test_no_fallback_when_the_hessian_factorizes(env):
    loaded = load_model("tiny", cache=env / "cache", progress=False)
    recipe = Recipe.from_dict({"method": "gptq", "bits": 4, "group_size": 32,
                               "calibration": {"dataset": "text.txt", "n_samples": 4, "seqlen": 32}})
    result = quantize(loaded, recipe, progress=False)
    assert result.fallbacks == [] and result.fallback_summary() is None and "fallbacks" not in result.extra


# --- GGUF files ------------------------------------------------------------------------------

def _permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """Hugging Face q/k row order -> llama.cpp's (its converter permutes these rows)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


GGUF_NAMES = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
              "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
              "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}


def write_tiny_gguf(path: Path, block_count: int = 2) -> LlamaForCausalLM:
    """A float32 GGUF of a 2-block tiny Llama whose header claims `block_count` blocks."""
    model = build_tiny("llama", tie=False, vocab=len(WORDS), max_positions=FOLDER_POSITIONS)
    sd = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(block_count)
    w.add_context_length(FOLDER_POSITIONS)
    w.add_embedding_length(64)
    w.add_feed_forward_length(128)
    w.add_head_count(4)
    w.add_head_count_kv(2)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_rope_freq_base(10000.0)
    w.add_vocab_size(len(WORDS))
    w.add_tokenizer_model("llama")
    w.add_token_list(WORDS)
    w.add_token_scores([0.0] * len(WORDS))
    w.add_token_types([2, 3, 3] + [1] * (len(WORDS) - 3))
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    w.add_tensor("token_embd.weight", sd["model.embed_tokens.weight"])
    w.add_tensor("output_norm.weight", sd["model.norm.weight"])
    w.add_tensor("output.weight", sd["lm_head.weight"])
    for i in range(2):
        for hf, name in GGUF_NAMES.items():
            t = sd[f"model.layers.{i}.{hf}.weight"]
            t = _permute(t, 4) if name == "attn_q" else _permute(t, 2) if name == "attn_k" else t
            w.add_tensor(f"blk.{i}.{name}.weight", np.ascontiguousarray(t))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    old = path.stat().st_mtime - 60  # old enough to be stamped, like a downloaded file
    os.utime(path, (old, old))
    return model


def test_tiny_gguf_converts_to_the_same_model(env):
    original = write_tiny_gguf(env / "tiny.gguf")
    loaded = load_model("tiny.gguf", cache=env / "cache", progress=False)
    ids = torch.tensor([[1, 5, 6, 7, 8]])
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(ids).logits, original(ids).logits)


def test_gguf_claiming_more_blocks_than_it_holds_is_refused_and_not_cached(env, capsys):
    write_tiny_gguf(env / "liar.gguf", block_count=4)
    rc, _, err = run_cli(capsys, "quantize", "liar.gguf", "--method", "rtn", "-o", "out", "-q")
    line = assert_clean_error(rc, err)
    assert "liar.gguf" in line and "block_count" in line
    assert not (env / "out").exists()
    hf = env / "cache" / "hf"
    assert not hf.exists() or not any(hf.iterdir())  # nothing converted, nothing left half-done


def test_a_gguf_streams_from_its_conversion_to_the_in_memory_checkpoint(env, capsys):
    """--stream reads a GGUF's weights from the safetensors folder it is converted to: the
    checkpoint is the one the in-memory job writes, tensor for tensor."""
    from safetensors import safe_open

    write_tiny_gguf(env / "tiny.gguf")
    for out, extra in (("whole", []), ("streamed", ["--stream"])):
        rc, _, err = run_cli(capsys, "quantize", "tiny.gguf", "--method", "rtn", "--group-size", "32", "-o", out,
                             "-q", *extra)
        assert rc == 0, err
    for name in ("quantized.safetensors", "dense.safetensors"):
        with safe_open(env / "whole" / name, "pt") as a, safe_open(env / "streamed" / name, "pt") as b:
            assert set(a.keys()) == set(b.keys())
            assert all(torch.equal(a.get_tensor(k), b.get_tensor(k)) for k in a.keys())  # noqa: SIM118


def test_a_gguf_claiming_more_blocks_is_refused_when_streamed_too(env, capsys):
    write_tiny_gguf(env / "liar.gguf", block_count=4)
    rc, _, err = run_cli(capsys, "quantize", "liar.gguf", "--method", "rtn", "-o", "out", "-q", "--stream")
    line = assert_clean_error(rc, err)
    assert "liar.gguf" in line and "block_count" in line
    assert not (env / "out").exists()
    hf = env / "cache" / "hf"
    assert not hf.exists() or not any(hf.iterdir())


def test_transformers_missing_keys_are_refused_even_past_the_header_check(env, monkeypatch):
    """If the header check were fooled, transformers' MISSING report still stops the conversion."""
    from lowbit.models import convert

    write_tiny_gguf(env / "liar.gguf", block_count=4)
    monkeypatch.setattr(convert, "check_gguf", lambda path: None)
    with pytest.raises(ConfigError, match="missing") as err:
        load_model("liar.gguf", cache=env / "cache", progress=False)
    assert "model.layers.2" in str(err.value)
    assert not any((env / "cache" / "hf").iterdir())


def _damaged(good: bytes) -> dict[str, bytes]:
    garbage = bytearray(good)
    garbage[24:600] = bytes((i * 97 + 13) % 256 for i in range(576))  # metadata overwritten
    return {"truncated-header": good[:200], "truncated-data": good[: len(good) // 2], "empty": b"",
            "bad-magic": b"GGUX" + good[4:], "garbage-metadata": bytes(garbage)}


@pytest.mark.parametrize("case", ["truncated-header", "truncated-data", "empty", "bad-magic", "garbage-metadata"])
def test_damaged_gguf_gives_one_line_error(env, capsys, case):
    write_tiny_gguf(env / "good.gguf")
    bad = env / f"{case}.gguf"
    bad.write_bytes(_damaged((env / "good.gguf").read_bytes())[case])
    rc, _, err = run_cli(capsys, "eval", bad.name, "--data", "text.txt", "--reference", "none", "--max-tokens", "64")
    assert bad.name in assert_clean_error(rc, err)
    hf = env / "cache" / "hf"
    assert not hf.exists() or not any(hf.iterdir())


def test_tampered_conversion_cache_is_detected_and_converted_again(env, caplog):
    original = write_tiny_gguf(env / "tiny.gguf")
    first = load_model("tiny.gguf", cache=env / "cache", progress=False)
    folder = next((env / "cache" / "hf").iterdir())
    record = json.loads((folder / SOURCE_RECORD).read_text())
    assert set(record["files"]) >= {"model.safetensors", "config.json"}

    sd = load_file(folder / "model.safetensors")
    sd[Q_PROJ] = torch.full_like(sd[Q_PROJ], float("nan"))
    save_file(sd, folder / "model.safetensors", metadata={"format": "pt"})
    again = load_model("tiny.gguf", cache=env / "cache", progress=False)
    assert any("model.safetensors" in w for w in warnings_logged(caplog))  # names the file
    torch.testing.assert_close(again.model.state_dict()[Q_PROJ], original.state_dict()[Q_PROJ])
    assert hashing.sha256_file(folder / "model.safetensors") == record["files"]["model.safetensors"]["sha256"]
    del first


def test_extra_file_in_conversion_cache_is_detected(env, caplog):
    write_tiny_gguf(env / "tiny.gguf")
    load_model("tiny.gguf", cache=env / "cache", progress=False)
    folder = next((env / "cache" / "hf").iterdir())
    (folder / "pytorch_model.bin").write_bytes(b"dropped in")
    load_model("tiny.gguf", cache=env / "cache", progress=False)
    assert any("pytorch_model.bin" in w for w in warnings_logged(caplog))
    assert not (folder / "pytorch_model.bin").exists()


def test_unchanged_conversion_cache_is_not_rehashed(env, monkeypatch):
    write_tiny_gguf(env / "tiny.gguf")
    load_model("tiny.gguf", cache=env / "cache", progress=False)
    hashed = []
    real = hashing.sha256_file
    monkeypatch.setattr(hashing, "sha256_file", lambda p: hashed.append(Path(p).name) or real(p))
    load_model("tiny.gguf", cache=env / "cache", progress=False)
    assert hashed == []


def test_cache_from_an_older_lowbit_is_converted_again(env, caplog):
    write_tiny_gguf(env / "tiny.gguf")
    load_model("tiny.gguf", cache=env / "cache", progress=False)
    folder = next((env / "cache" / "hf").iterdir())
    record = json.loads((folder / SOURCE_RECORD).read_text())
    del record["files"]
    (folder / SOURCE_RECORD).write_text(json.dumps(record))
    load_model("tiny.gguf", cache=env / "cache", progress=False)
    assert any(SOURCE_RECORD in w for w in warnings_logged(caplog))  # names the record that lacks them
    assert "files" in json.loads((folder / SOURCE_RECORD).read_text())


# --- folders: pickles, custom code, incomplete weights, damaged checkpoints -------------------

@pytest.mark.parametrize("name", ["pytorch_model.bin", "model.pt", "weights.ckpt"])
def test_pickled_weights_are_refused(env, capsys, name):
    folder = env / "tiny"
    torch.save(load_file(folder / "model.safetensors"), folder / name)
    (folder / "model.safetensors").unlink()
    before = tree(env / "tiny")
    rc, _, err = run_cli(capsys, *quantize_args("rtn"))
    line = assert_clean_error(rc, err)
    assert name in line and "safetensors" in line
    assert tree(env / "tiny") == before


def _edit_config(folder: Path, **changes) -> None:
    config = json.loads((folder / "config.json").read_text())
    config.update(changes)
    (folder / "config.json").write_text(json.dumps(config))


@pytest.mark.parametrize("command", ["quantize", "eval", "reference"])
def test_auto_map_is_refused_without_prompting(env, capsys, monkeypatch, checkpoint, command):
    def no_prompt(*args, **kwargs):
        raise AssertionError("lowbit prompted the user")

    monkeypatch.setattr(builtins, "input", no_prompt)
    (env / "tiny" / "modeling_evil.py").write_text("raise SystemExit('the folder ran its code')\n")
    _edit_config(env / "tiny", auto_map={"AutoModelForCausalLM": "modeling_evil.EvilForCausalLM"})
    argv = {"quantize": quantize_args("rtn"),
            "eval": ["eval", "tiny", "--data", "text.txt", "--reference", "none"],
            "reference": ["eval", "ckpt", "--data", "text.txt", "--reference", "tiny"]}[command]
    rc, _, err = run_cli(capsys, *argv)
    assert "auto_map" in assert_clean_error(rc, err)


def test_auto_map_in_tokenizer_config_is_refused(env, capsys):
    path = env / "tiny" / "tokenizer_config.json"
    config = json.loads(path.read_text())
    config["auto_map"] = {"AutoTokenizer": ["tokenization_evil.EvilTokenizer", None]}
    path.write_text(json.dumps(config))
    rc, _, err = run_cli(capsys, *quantize_args("rtn"))
    assert "tokenizer_config.json" in assert_clean_error(rc, err)


def test_unknown_model_type_is_refused_naming_it(env, capsys):
    _edit_config(env / "tiny", model_type="evilformer")
    rc, _, err = run_cli(capsys, *quantize_args("rtn"))
    assert "evilformer" in assert_clean_error(rc, err)


def test_folder_missing_a_tensor_is_refused(env, capsys):
    path = env / "tiny" / "model.safetensors"
    sd = load_file(path)
    del sd[Q_PROJ]
    save_file(sd, path, metadata={"format": "pt"})
    rc, _, err = run_cli(capsys, *quantize_args("rtn"))
    assert Q_PROJ in assert_clean_error(rc, err)
    assert not (env / "out").exists()


def test_config_claiming_more_layers_than_the_weights_is_refused(env, capsys):
    _edit_config(env / "tiny", num_hidden_layers=4)
    rc, _, err = run_cli(capsys, *quantize_args("rtn"))
    assert "model.layers.2" in assert_clean_error(rc, err)


@pytest.mark.parametrize("damage", ["no-manifest", "quant-method-only"])
def test_damaged_checkpoint_is_not_a_model_folder(env, capsys, checkpoint, damage):
    if damage == "no-manifest":
        (checkpoint / "manifest.json").unlink()
    else:
        shutil.rmtree(checkpoint)
        shutil.copytree(env / "tiny", checkpoint)
        _edit_config(checkpoint, quantization_config={"quant_method": "lowbit"})
    rc, _, err = run_cli(capsys, "quantize", "ckpt", "--method", "rtn", "-o", "out", "-q")
    assert "manifest" in assert_clean_error(rc, err)


# --- the manifest's source is not an instruction to fetch -----------------------------------

def _set_source(checkpoint: Path, **source) -> None:
    path = checkpoint / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest["source"] = {"name": "x", "path": None, "sha256": None, **source}
    path.write_text(json.dumps(manifest, indent=2))


def _no_network(monkeypatch):
    import huggingface_hub

    def refuse(*args, **kwargs):
        raise AssertionError("lowbit went to the network on the word of a manifest")

    monkeypatch.setattr(fetch_module, "pip_download", refuse)
    for name in ("hf_hub_download", "snapshot_download"):
        monkeypatch.setattr(huggingface_hub, name, refuse)


def test_hub_source_is_refused_with_reference_auto(env, monkeypatch):
    _no_network(monkeypatch)
    with pytest.raises(ConfigError, match="--reference"):
        load_reference_for(Source.from_dict({"kind": "hub", "spec": "someone/evil-model"}), torch.float32)


def test_hub_source_in_a_checkpoint_is_refused_by_eval(env, capsys, monkeypatch, checkpoint):
    _no_network(monkeypatch)
    _set_source(checkpoint, kind="hub", spec="someone/evil-model")
    rc, _, err = run_cli(capsys, "eval", "ckpt", "--data", "text.txt", "--max-tokens", "64")
    line = assert_clean_error(rc, err)
    assert "someone/evil-model" in line and "--reference" in line


def test_known_source_not_in_the_cache_is_not_fetched(env, monkeypatch):
    _no_network(monkeypatch)
    with pytest.raises(ModelNotFoundError, match="lowbit models --fetch smollm2-135m"):
        load_reference_for(Source.from_dict({"kind": "known", "spec": "smollm2-135m"}), torch.float32)


@pytest.mark.parametrize("source", [
    {"kind": "hf_folder", "spec": "x", "path": "/nonexistent/model"},
    {"kind": "gguf", "spec": "x", "path": "someone/evil-model"},  # a hub id where a path belongs
    {"kind": "known", "spec": "someone/evil-model"},              # not a known name at all
    {"kind": "hf_folder", "spec": "x", "path": "text.txt"},     # exists, but not what it says
    {"kind": "zip", "spec": "x"},
])
def test_other_bad_sources_are_refused_without_network(env, monkeypatch, source):
    _no_network(monkeypatch)
    with pytest.raises(LowbitError, match="--reference"):
        load_reference_for(Source.from_dict(source), torch.float32)


def test_local_folder_source_still_works(env, checkpoint):
    _set_source(checkpoint, kind="hf_folder", spec="tiny", path=str(env / "tiny"))
    ref = load_reference_for(Manifest.read(checkpoint).source, torch.float32, cache=str(env / "cache"))
    assert ref.source.path == (env / "tiny").resolve()


# --- results that mean nothing --------------------------------------------------------------

def test_nan_perplexity_is_flagged(env, capsys, caplog):
    set_value(env / "tiny", NORM, float("nan"), index=(0,))
    loaded = load_model("tiny", cache=env / "cache", progress=False)
    result = evaluate(loaded, ["text.txt"], "broken", max_tokens=128, seqlen=64, progress=False)
    assert result.non_finite
    assert any("text.txt" in n and "nan" in n for n in result.notes)
    assert any(r.levelname == "WARNING" and "text.txt" in r.getMessage() for r in caplog.records)
    assert result.to_dict()["notes"] == result.notes

    # the CLI exits non-zero and its JSON stays strict: the NaN is written as null, the note says why
    rc, out, err = run_cli(capsys, "eval", "tiny", "--data", "text.txt", "--reference", "none",
                           "--max-tokens", "128", "--seqlen", "64", "--json")
    assert rc == 1, err
    report = json.loads(out)
    assert report["datasets"]["text.txt"]["ppl"] is None
    assert any("nan" in n for n in report["notes"])


def test_a_working_model_is_not_flagged(env):
    loaded = load_model("tiny", cache=env / "cache", progress=False)
    result = evaluate(loaded, ["text.txt"], "fine", max_tokens=128, seqlen=64, progress=False)
    ppl = result.datasets["text.txt"].ppl
    assert not result.non_finite
    assert bool(result.notes) == (ppl > len(WORDS))  # only flagged if worse than a uniform guess


def test_implausible_numbers():
    ok = DatasetResult("d", 64, 100, 99, ppl=20.0, ref_ppl=19.0, kl_mean=0.1, kl_p99=0.5)
    assert implausible(ok, 64) == []
    assert "vocabulary" in implausible(DatasetResult("d", 64, 100, 99, ppl=1e5), 64)[0]
    assert implausible(DatasetResult("d", 64, 100, 99, ppl=20.0, kl_mean=float("inf")), 64) == ["mean KL is inf"]
    assert len(implausible(DatasetResult("d", 64, 100, 99, ppl=float("nan"), ref_ppl=float("nan")), 64)) == 2
