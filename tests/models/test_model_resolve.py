"""resolve_model and load_model on local specs, with no download."""

import hashlib
import json
import os

import pytest
import torch
from tiny_models import CHAT_WORDS, save_tiny_folder, tiny_llama
from transformers import LlamaForCausalLM

from lowbit.errors import ConfigError, ModelNotFoundError
from lowbit.models import KNOWN_MODELS, ModelSource, load_model, resolve_model
from lowbit.models import convert as convert_module
from lowbit.models.convert import SOURCE_RECORD, converted_dir


def test_folder_with_config(tmp_path):
    folder = tmp_path / "my-model"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    (folder / "model-b.safetensors").write_bytes(b"bbb")
    (folder / "model-a.safetensors").write_bytes(b"aaa")
    (folder / "tokenizer.json").write_bytes(b"not part of the weights")
    source = resolve_model(str(folder), cache=tmp_path / "cache")
    assert (source.kind, source.path, source.name, source.gguf_file) == (
        "hf_folder", folder.resolve(), "my-model", None
    )
    # sha256 of the `sha256sum *.safetensors` listing, files in sorted name order
    listing = "".join(
        f"{hashlib.sha256(data).hexdigest()}  {name}\n"
        for name, data in [("model-a.safetensors", b"aaa"), ("model-b.safetensors", b"bbb")]
    )
    assert source.sha256 == hashlib.sha256(listing.encode()).hexdigest()


def test_folder_without_weights_has_no_sha(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    assert resolve_model(str(tmp_path), cache=tmp_path / "cache").sha256 is None


def test_folder_without_config(tmp_path):
    with pytest.raises(ModelNotFoundError, match="config.json"):
        resolve_model(str(tmp_path), cache=tmp_path / "cache")


def test_gguf_file(tmp_path):
    gguf = tmp_path / "Some-Model.Q4_0.gguf"
    gguf.write_bytes(b"GGUF" + bytes(100))
    source = resolve_model(str(gguf), cache=tmp_path / "cache")
    assert not (tmp_path / "cache" / "stamps").exists()  # modified just now: hashed, not stamped
    old = gguf.stat().st_mtime - 60
    os.utime(gguf, (old, old))
    source = resolve_model(str(gguf), cache=tmp_path / "cache")
    assert source.kind == "gguf"
    assert source.path == gguf.resolve()
    assert source.gguf_file == "Some-Model.Q4_0.gguf"
    assert source.name == "Some-Model.Q4_0"
    assert source.sha256 == hashlib.sha256(gguf.read_bytes()).hexdigest()
    assert list((tmp_path / "cache" / "stamps").glob("*.json"))  # stamped in the cache ...
    assert sorted(p.name for p in tmp_path.iterdir()) == ["Some-Model.Q4_0.gguf", "cache"]  # only


def test_other_file_is_rejected(tmp_path):
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(b"x")
    with pytest.raises(ModelNotFoundError, match="model.safetensors"):
        resolve_model(str(weights), cache=tmp_path)


def test_hub_id(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    source = resolve_model("HuggingFaceTB/SmolLM2-135M", cache=tmp_path)
    assert (source.kind, source.path, source.name, source.sha256) == (
        "hub", None, "HuggingFaceTB/SmolLM2-135M", None
    )


@pytest.mark.parametrize("spec", ["smollm3", "./missing/model", "missing/model.gguf", "a/b/c", ""])
def test_garbage_lists_known_names(tmp_path, monkeypatch, spec):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ModelNotFoundError) as err:
        resolve_model(spec, cache=tmp_path)
    message = str(err.value)
    assert all(name in message for name in KNOWN_MODELS)
    assert "lowbit models --fetch" in message


def test_known_model_not_cached_without_fetch(tmp_path):
    with pytest.raises(ModelNotFoundError, match="lowbit models --fetch smollm2-135m"):
        resolve_model("smollm2-135m", cache=tmp_path, fetch=False)


def test_load_hf_folder(tmp_path):
    original = tiny_llama(vocab=len(CHAT_WORDS))
    save_tiny_folder(tmp_path / "tiny", model=original)
    loaded = load_model(str(tmp_path / "tiny"), cache=tmp_path / "cache")
    assert isinstance(loaded.model, LlamaForCausalLM)
    assert not loaded.model.training
    assert loaded.source.kind == "hf_folder"
    ids = loaded.tokenizer("w5 w0 w9", return_tensors="pt").input_ids
    assert ids.tolist() == [[CHAT_WORDS.index(w) for w in ("w5", "w0", "w9")]]
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(ids).logits, original(ids).logits, rtol=0, atol=0)


def test_load_bfloat16(tmp_path):
    save_tiny_folder(tmp_path / "tiny")
    loaded = load_model(str(tmp_path / "tiny"), dtype=torch.bfloat16, cache=tmp_path / "cache")
    assert loaded.model.lm_head.weight.dtype == torch.bfloat16


def test_bad_dtype(tmp_path):
    with pytest.raises(ConfigError, match="dtype"):
        load_model(str(tmp_path), dtype=torch.int8)


def test_gguf_is_converted_once(tmp_path, monkeypatch):
    """load_model converts a GGUF into the cache once, then loads the folder."""
    gguf = tmp_path / "tiny.gguf"
    gguf.write_bytes(b"GGUF stand-in")
    calls = []

    def fake_convert(path, out, sha256):  # stands in for transformers' GGUF reader
        calls.append(path)
        save_tiny_folder(out)
        (out / SOURCE_RECORD).write_text(json.dumps({"gguf_sha256": sha256}))

    monkeypatch.setattr(convert_module, "convert_gguf", fake_convert)
    cache = tmp_path / "cache"
    first = load_model(str(gguf), cache=cache, progress=False)
    second = load_model(str(gguf), cache=cache, progress=False)
    assert calls == [gguf.resolve()]
    folder = converted_dir(gguf, first.source.sha256, cache)
    assert folder.name == f"tiny-{first.source.sha256[:16]}"
    assert sorted(p.name for p in folder.parent.iterdir()) == [folder.name]  # no temp folder left
    assert isinstance(second.model, LlamaForCausalLM)


def test_failed_conversion_leaves_no_folder(tmp_path, monkeypatch):
    gguf = tmp_path / "tiny.gguf"
    gguf.write_bytes(b"GGUF stand-in")

    def broken_convert(path, out, sha256):
        (out / "half-written").write_text("")
        raise ConfigError("cannot read it")

    monkeypatch.setattr(convert_module, "convert_gguf", broken_convert)
    with pytest.raises(ConfigError):
        load_model(str(gguf), cache=tmp_path / "cache", progress=False)
    assert list((tmp_path / "cache" / "hf").iterdir()) == []


def test_source_of_unknown_kind(tmp_path):
    source = ModelSource("x", "zip", None, None, "x", None)
    with pytest.raises(ConfigError, match="'zip'"):
        load_model(source, cache=tmp_path)
