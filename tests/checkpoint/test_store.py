import json
import os

import pytest
import torch
from safetensors.torch import save_file
from tiny_models import build_tiny, quantize_all, records_of

from lowbit.checkpoint import (
    DENSE_FILE,
    MANIFEST,
    QUANT_FILE,
    save_checkpoint,
)
from lowbit.errors import CheckpointError, LowbitError
from lowbit.loading import load_checkpoint
from lowbit.runtime.qlinear import QuantLinear


@pytest.mark.parametrize("tie", [True, False])
def test_save_load_gives_bit_identical_logits(tmp_path, arch, tie):
    model = build_tiny(arch, tie=tie)
    names = quantize_all(model)
    ids = torch.randint(0, 256, (1, 33), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        before = model(ids).logits
    save_checkpoint(records_of(model), model, None, tmp_path / "ck", {"recipe": {"method": "test"}})
    loaded = load_checkpoint(tmp_path / "ck")
    with torch.inference_mode():
        after = loaded.model(ids).logits
    assert torch.equal(before, after)
    assert set(loaded.manifest.layers) == set(names)
    assert loaded.manifest.recipe == {"method": "test"}
    assert all(isinstance(loaded.model.get_submodule(n), QuantLinear) for n in names)
    if tie:
        assert loaded.model.lm_head.weight.data_ptr() == loaded.model.model.embed_tokens.weight.data_ptr()


def test_codes_are_stored_packed(tmp_path):
    model = build_tiny("llama")
    quantize_all(model, bits=3)
    save_checkpoint(records_of(model), model, None, tmp_path / "ck", {})
    from safetensors.torch import load_file

    t = load_file(tmp_path / "ck" / QUANT_FILE)
    codes = t["model.layers.0.mlp.down_proj.codes"]
    assert codes.dtype == torch.uint8 and codes.shape == (64, 128 * 3 // 8)


@pytest.fixture
def saved(tmp_path):
    model = build_tiny("llama")
    quantize_all(model)
    return save_checkpoint(records_of(model), model, None, tmp_path / "ck", {})


def test_truncated_file_is_rejected(saved):
    f = saved / QUANT_FILE
    f.write_bytes(f.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match="truncated"):
        load_checkpoint(saved)


def test_tampered_file_is_rejected(saved):
    f = saved / DENSE_FILE
    data = bytearray(f.read_bytes())
    data[-5] ^= 0xFF
    f.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="sha256"):
        load_checkpoint(saved)


def _age(path, seconds=60):
    old = path.stat().st_mtime - seconds
    os.utime(path, (old, old))


def test_hashes_are_remembered_until_a_file_changes(saved, tmp_path, monkeypatch):
    monkeypatch.setenv("LOWBIT_CACHE", str(tmp_path / "cache"))
    stamps = tmp_path / "cache" / "stamps"
    load_checkpoint(saved)
    assert not stamps.exists()  # files written just now are hashed but not stamped
    files = json.loads((saved / MANIFEST).read_text())["files"]
    for f in files:
        _age(saved / f)
    load_checkpoint(saved)
    assert len(list(stamps.glob("*.json"))) == len(files)
    # stamped: a second load does not hash again
    calls = []
    monkeypatch.setattr("lowbit.models.hashing.sha256_file", lambda p: calls.append(p) or "0" * 64)
    load_checkpoint(saved)
    assert calls == []
    # a file rewritten with the same size (new modification time) is hashed again and rejected
    monkeypatch.undo()
    monkeypatch.setenv("LOWBIT_CACHE", str(tmp_path / "cache"))
    f = saved / DENSE_FILE
    data = bytearray(f.read_bytes())
    data[-5] ^= 0xFF
    f.write_bytes(bytes(data))
    _age(f, 30)
    with pytest.raises(CheckpointError, match="sha256"):
        load_checkpoint(saved)


def test_full_verification_ignores_stamps(saved, tmp_path, monkeypatch):
    monkeypatch.setenv("LOWBIT_CACHE", str(tmp_path / "cache"))
    f = saved / DENSE_FILE
    _age(f)
    _age(saved / QUANT_FILE)
    load_checkpoint(saved)  # stamps both
    st = f.stat()
    data = bytearray(f.read_bytes())
    data[-5] ^= 0xFF
    f.write_bytes(bytes(data))
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))  # a change that keeps size and time
    load_checkpoint(saved)  # the stamp is trusted (documented)
    with pytest.raises(CheckpointError, match="sha256"):
        load_checkpoint(saved, verify="full")
    with pytest.raises(Exception, match="verify='sometimes'"):
        load_checkpoint(saved, verify="sometimes")


def test_missing_file_and_manifest_problems(saved, tmp_path):
    with pytest.raises(CheckpointError, match="not a lowbit checkpoint"):
        load_checkpoint(tmp_path / "nowhere")
    m = json.loads((saved / MANIFEST).read_text())
    m["format_version"] = 99
    (saved / MANIFEST).write_text(json.dumps(m))
    with pytest.raises(CheckpointError, match="format version 99"):
        load_checkpoint(saved)
    (saved / MANIFEST).write_text("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        load_checkpoint(saved)


def test_deleted_tensor_file_is_rejected(saved):
    (saved / QUANT_FILE).unlink()
    with pytest.raises(CheckpointError, match="missing"):
        load_checkpoint(saved)


def test_existing_output_is_not_overwritten_without_asking(saved):
    model = build_tiny("llama")
    quantize_all(model)
    before = {f.name: f.read_bytes() for f in saved.iterdir()}
    with pytest.raises(LowbitError, match="already exists"):
        save_checkpoint(records_of(model), model, None, saved, {})
    assert {f.name: f.read_bytes() for f in saved.iterdir()} == before
    save_checkpoint(records_of(model), model, None, saved, {"note": 1}, overwrite=True)
    assert json.loads((saved / MANIFEST).read_text())["note"] == 1


def test_a_failed_save_leaves_nothing_behind(tmp_path, monkeypatch):
    import lowbit.checkpoint.write as ck

    model = build_tiny("llama")
    quantize_all(model)

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(ck, "write_tensors", boom)
    with pytest.raises(OSError):
        save_checkpoint(records_of(model), model, None, tmp_path / "ck", {})
    assert list(tmp_path.iterdir()) == []


def test_tensors_are_read_without_mapping_and_converted_in_slices(tmp_path, monkeypatch):
    """The reader behind load_checkpoint gives what safetensors gives, dtype conversion included,
    also when a tensor is converted in many small slices."""
    from safetensors.torch import load_file

    from lowbit.checkpoint import _Tensors

    t = {"a": torch.randn(37, 11), "b": torch.arange(10, dtype=torch.int32), "c": torch.randn(5).half(),
         "e": torch.zeros(0, 3)}
    save_file(t, tmp_path / "t.safetensors")
    monkeypatch.setattr(_Tensors, "CHUNK", 40)  # 10 floats per slice
    r = _Tensors(tmp_path / "t.safetensors")
    ref = load_file(tmp_path / "t.safetensors")
    assert sorted(r.keys) == sorted(t)
    for k in t:
        assert torch.equal(r.get(k), ref[k])
        want = ref[k].to(torch.bfloat16) if ref[k].is_floating_point() else ref[k]
        assert torch.equal(r.get(k, torch.bfloat16), want)
    (tmp_path / "cut.safetensors").write_bytes((tmp_path / "t.safetensors").read_bytes()[:-20])
    with pytest.raises(CheckpointError, match="truncated"):  # the header's ranges are checked on opening
        _Tensors(tmp_path / "cut.safetensors")


def test_info_verify_hashes_every_file(saved, tmp_path, monkeypatch, capsys):
    from lowbit.cli import main

    assert main(["info", str(saved), "--verify"]) == 0
    n = len(json.loads((saved / MANIFEST).read_text())["files"])
    assert n == 3  # quantized.safetensors, dense.safetensors, config.json (no tokenizer here)
    assert f"verified: {n} files" in capsys.readouterr().err
    f = saved / QUANT_FILE
    st = f.stat()
    data = bytearray(f.read_bytes())
    data[100] ^= 0x01
    f.write_bytes(bytes(data))
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert main(["info", str(saved), "--verify"]) == 2
    assert "sha256" in capsys.readouterr().err
