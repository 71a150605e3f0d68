"""The streamed GGUF conversion (convert_gguf) against transformers' whole-model GGUF load: the same
folder, bit for bit, written a shard at a time."""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import pytest
import torch
from safetensors.torch import load_file
from tiny_models import FOLDER_POSITIONS, GGUF_PIECES, build_tiny, tiny_gguf_metadata
from transformers import AutoModelForCausalLM, AutoTokenizer

from lowbit.algorithms.ggml import ggml_rtn
from lowbit.errors import ConfigError
from lowbit.export.gguf import gguf_names, to_gguf_layout, write_gguf
from lowbit.models import gguf_tensors, load_model, shards
from lowbit.models.convert import SOURCE_RECORD, convert_gguf
from lowbit.models.weights import INDEX, SINGLE

# the block types the tiny files mix, one per weight in turn (F16 and F32 stored as floats)
TYPES = ("Q4_K", "Q6_K", "Q8_0", "Q4_1", "Q5_K", "F16")


def whole_model_conversion(path: Path, out: Path) -> None:
    """The reference: how lowbit converted a GGUF before it streamed. transformers dequantizes the
    whole model into memory; it is saved without its GGUF quantization_config."""
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    del model.config.quantization_config
    with torch.device("meta"):
        plain = AutoModelForCausalLM.from_config(model.config, dtype=torch.float32)
    plain.load_state_dict(model.state_dict(), assign=True)
    plain.tie_weights()
    plain.generation_config = model.generation_config
    plain.save_pretrained(out)
    AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name).save_pretrained(out)


def write_mixed_gguf(path: Path, arch: str, tie: bool, *, drop: str | None = None,
                     reshape: str | None = None) -> None:
    """A tiny `arch` model as a GGUF whose weights are in several of llama.cpp's block types (norms
    in F32). `drop` leaves that GGUF tensor out; `reshape` stores that one with a row too few."""
    model = build_tiny(arch, tie=tie, hidden=256, vocab=len(GGUF_PIECES), max_positions=FOLDER_POSITIONS)
    names = gguf_names(model, arch)
    tensors = {}
    for i, (name, p) in enumerate(model.named_parameters()):
        key = names[name]
        value = to_gguf_layout(arch, key, p.detach(), model.config)
        if key == reshape:
            value = value[:-1]
        kind = TYPES[i % len(TYPES)]
        if value.dim() == 1 or key == drop:
            pass
        elif kind == "F16":
            value = value.half()
        else:
            value = ggml_rtn(value, kind if value.shape[1] % 256 == 0 else "Q8_0")
        tensors[key] = value
    tensors.pop(drop, None)
    write_gguf(path, tensors, tiny_gguf_metadata(model, arch))


def stored_tensors(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor in a folder's safetensors file(s)."""
    out = {}
    for file in sorted(folder.glob("*.safetensors")):
        out.update(load_file(file))
    return out


def assert_same_folder(streamed: Path, reference: Path, gguf_path: Path) -> None:
    """Same files but the weights' layout; the same stored tensors; and loaded, the same model as
    transformers makes of the GGUF file itself."""
    for name in ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json"):
        assert (streamed / name).read_text() == (reference / name).read_text(), name
    want, got = stored_tensors(reference), stored_tensors(streamed)
    assert want.keys() == got.keys()
    assert all(got[k].dtype == torch.float32 and torch.equal(got[k], want[k]) for k in want)
    direct = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32)
    loaded = AutoModelForCausalLM.from_pretrained(streamed)
    want, got = direct.state_dict(), loaded.state_dict()
    assert want.keys() == got.keys()
    for k in want:
        assert torch.equal(got[k], want[k]), k


@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied"])
@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma3"])
def test_streamed_conversion_is_the_whole_model_conversion(tmp_path, arch, tie):
    path = tmp_path / "tiny.gguf"
    write_mixed_gguf(path, arch, tie)
    whole_model_conversion(path, tmp_path / "reference")
    streamed = tmp_path / "streamed"
    convert_gguf(path, streamed, "0" * 64)
    assert_same_folder(streamed, tmp_path / "reference", path)
    assert (streamed / SINGLE).is_file() and not (streamed / INDEX).exists()  # 1 MB: one shard
    assert ("lm_head.weight" in stored_tensors(streamed)) == (not tie)  # saved as save_pretrained saves
    record = json.loads((streamed / SOURCE_RECORD).read_text())
    assert record["gguf_sha256"] == "0" * 64 and record["dtype"] == "float32"


def test_shards_hold_one_shard_of_tensors_at_a_time(tmp_path, monkeypatch):
    """With small shards: several are written, no save_file call is handed more than a shard's
    bytes (or one tensor bigger than that), and the sharded folder is the same model (also when
    each tensor is dequantized a few rows at a time)."""
    path = tmp_path / "tiny.gguf"
    write_mixed_gguf(path, "llama", tie=False)
    whole_model_conversion(path, tmp_path / "reference")
    calls = []
    real_save = shards.save_file

    def spy(tensors, file, metadata=None):
        calls.append({k: t.numel() * t.element_size() for k, t in tensors.items()})
        real_save(tensors, file, metadata=metadata)

    monkeypatch.setattr(shards, "save_file", spy)
    monkeypatch.setattr(gguf_tensors, "DEQUANT_BYTES", 4096)  # and dequantized 4 rows at a time
    limit = 200_000  # a few of the tiny model's 256 x 256 and 512 x 256 float32 weights
    streamed = tmp_path / "streamed"
    streamed.mkdir()
    convert_gguf(path, streamed, "0" * 64, shard_bytes=limit)
    biggest = max(t.numel() * 4 for t in stored_tensors(tmp_path / "reference").values())
    assert len(calls) > 2
    assert all(sum(c.values()) <= limit or len(c) == 1 for c in calls)  # a bigger tensor alone
    assert max(sum(c.values()) for c in calls) <= max(limit, biggest)
    index = json.loads((streamed / INDEX).read_text())
    files = sorted(p.name for p in streamed.glob("*.safetensors"))
    assert files == [f"model-{i:05d}-of-{len(calls):05d}.safetensors" for i in range(1, len(calls) + 1)]
    assert sorted(set(index["weight_map"].values())) == files
    assert index["metadata"]["total_size"] == sum(sum(c.values()) for c in calls)
    for file in files:
        assert all(index["weight_map"][k] == file for k in load_file(streamed / file))
    assert not list(streamed.glob(".*"))  # no provisional shard name left
    assert_same_folder(streamed, tmp_path / "reference", path)


@pytest.mark.parametrize("case", ["missing", "wrong-shape"])
def test_a_gguf_without_every_weight_is_refused_and_not_cached(tmp_path, monkeypatch, case):
    """A weight left out, or stored with the wrong shape (past the header check, which counts
    blocks only), is refused by name, and nothing is cached."""
    monkeypatch.chdir(tmp_path)
    name = "blk.1.attn_v.weight"
    if case == "missing":
        write_mixed_gguf(tmp_path / "bad.gguf", "llama", tie=True, drop=name)
    else:
        write_mixed_gguf(tmp_path / "bad.gguf", "llama", tie=True, reshape=name)
    with pytest.raises(ConfigError, match="missing" if case == "missing" else "wrong shape") as err:
        load_model("bad.gguf", cache=tmp_path / "cache", progress=False)
    assert "model.layers.1.self_attn.v_proj.weight" in str(err.value)
    assert not any((tmp_path / "cache" / "hf").iterdir())


def test_an_unreadable_tensor_is_refused_by_name(tmp_path, monkeypatch):
    path = tmp_path / "tiny.gguf"
    write_mixed_gguf(path, "llama", tie=True)

    def broken(data, qtype):
        raise NotImplementedError(f"no decoder for {qtype.name}")

    monkeypatch.setattr(gguf, "dequantize", broken)
    with pytest.raises(ConfigError, match="token_embd.weight"):
        convert_gguf(path, tmp_path, "0" * 64)


@pytest.mark.real_model
def test_smollm2_streams_to_the_whole_model_conversion(tmp_path):
    """The real Q4_1 (+ Q8_0, F32) file, tied, in several shards."""
    from lowbit.models import fetch_known_model

    path = fetch_known_model("smollm2-135m", progress=False)
    whole_model_conversion(path, tmp_path / "reference")
    streamed = tmp_path / "streamed"
    streamed.mkdir()
    convert_gguf(path, streamed, "0" * 64, shard_bytes=1 << 27)  # 128 MiB: the 540 MB model in 5
    assert len(json.loads((streamed / INDEX).read_text())["weight_map"]) == 272  # lm_head tied, not stored
    assert_same_folder(streamed, tmp_path / "reference", path)
