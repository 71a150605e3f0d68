"""Loading a checkpoint checks it before trusting it (issue 22).

A lowbit checkpoint is unmistakable: a folder that looks like a damaged one is refused, never
loaded as a plain Hugging Face folder with random layers. The manifest lists every file in the
folder with its size and sha256, names only plain files inside it, and is checked before any
file is parsed; config and tokenizer files are covered too. Tensor headers are checked (dtypes,
shapes, byte ranges) before anything is allocated from them. Each bad input is one clean error.
"""

from __future__ import annotations

import hashlib
import json
import re
import time
from pathlib import Path

import pytest
import torch
from hostile_cli import assert_clean_error, run_cli, tree
from rendered import numbers

from lowbit.checkpoint import (
    DENSE_FILE,
    FORMAT_VERSION,
    MANIFEST,
    QUANT_FILE,
    check_not_checkpoint,
    is_checkpoint,
    looks_like_checkpoint,
)
from lowbit.errors import CheckpointError
from lowbit.loading import load_checkpoint

COMMANDS = {
    "info": ["info", "{ck}", "--verify"],
    "eval": ["eval", "{ck}", "--data", "text.txt", "--reference", "none", "--max-tokens", "64", "--seqlen", "32"],
    "generate": ["generate", "{ck}", "--prompt", "w1 w2 w3", "--max-new-tokens", "2"],
}


def refused(capsys, ck: Path, command: str) -> str:
    """The one error line `lowbit COMMAND` prints for checkpoint `ck` (failing unless it is clean)."""
    rc, _, err = run_cli(capsys, *(a.format(ck=ck) for a in COMMANDS[command]))
    return assert_clean_error(rc, err)


def manifest(ck: Path) -> dict:
    return json.loads((ck / MANIFEST).read_text())


def write_manifest(ck: Path, m) -> None:
    (ck / MANIFEST).write_text(json.dumps(m))


def rehash(ck: Path, *names: str) -> None:
    """Record the current size and sha256 of `names` in the manifest, as a careful forger would."""
    m = manifest(ck)
    for name in names:
        data = (ck / name).read_bytes()
        m["files"][name] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    write_manifest(ck, m)


def edit_config(ck: Path, **changes) -> None:
    config = json.loads((ck / "config.json").read_text())
    config.update(changes)
    (ck / "config.json").write_text(json.dumps(config, indent=2))


def rewrite_header(f: Path, change) -> None:
    """Replace the JSON header of safetensors file `f` by change(header) (the data stays)."""
    raw = f.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = change(json.loads(raw[8:8 + n]))
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    f.write_bytes(len(text).to_bytes(8, "little") + text + raw[8 + n:])


def first_tensor(header: dict) -> str:
    return next(k for k in sorted(header) if k != "__metadata__")


def test_an_intact_checkpoint_verifies_and_loads(checkpoint, capsys):
    rc, _, err = run_cli(capsys, "info", checkpoint, "--verify")
    assert rc == 0, err
    listed = set(manifest(checkpoint)["files"])
    assert {QUANT_FILE, DENSE_FILE, "config.json", "tokenizer.json"} <= listed
    assert listed == {p.name for p in checkpoint.iterdir()} - {MANIFEST, "REPORT.md"}
    loaded = load_checkpoint(checkpoint)
    assert getattr(loaded.model.config, "quantization_config", None) is None  # lowbit's marker is stripped
    assert loaded.tokenizer is not None


# ---------------------------------------------------------------- what the manifest lists
@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_an_emptied_file_list_is_refused(checkpoint, capsys, command):
    m = manifest(checkpoint)
    m["files"] = {}
    write_manifest(checkpoint, m)
    line = refused(capsys, checkpoint, command)
    assert "files" in line or QUANT_FILE in line


@pytest.mark.parametrize("name", ["../outside.bin", "sub/../../outside.bin", "/etc/hostname", "..", "a\\b"])
def test_names_that_leave_the_folder_are_refused(checkpoint, capsys, name):
    outside = checkpoint.parent / "outside.bin"
    outside.write_bytes(b"x" * 12345)
    m = manifest(checkpoint)
    m["files"][name] = {"bytes": 12345, "sha256": hashlib.sha256(b"x" * 12345).hexdigest()}
    write_manifest(checkpoint, m)
    for command in COMMANDS:
        line = refused(capsys, checkpoint, command)
        assert repr(name) in line
        assert "12345" not in line and "0.0 MB" not in line  # nothing was stat'ed and reported
    rc, out, err = run_cli(capsys, "info", checkpoint)  # info without --verify reads the manifest too
    assert_clean_error(rc, err)
    assert "12345" not in out


@pytest.mark.parametrize("missing", [QUANT_FILE, DENSE_FILE, "config.json"])
def test_a_file_list_without_a_file_it_needs_is_refused(checkpoint, capsys, missing):
    m = manifest(checkpoint)
    del m["files"][missing]
    write_manifest(checkpoint, m)
    for command in COMMANDS:
        assert missing in refused(capsys, checkpoint, command)


@pytest.mark.parametrize("extra", ["added_tokens.json", "chat_template.jinja", "generation_config.json"])
def test_a_file_no_hash_covers_is_refused(checkpoint, capsys, extra):
    (checkpoint / extra).write_text('{"w1": 5}' if extra.endswith(".json") else "{{ messages }}")
    for command in COMMANDS:
        assert extra in refused(capsys, checkpoint, command)


def test_a_link_to_a_file_outside_is_refused(checkpoint, capsys):
    outside = checkpoint.parent / "tokenizer.json"
    outside.write_bytes((checkpoint / "tokenizer.json").read_bytes())
    (checkpoint / "tokenizer.json").unlink()
    (checkpoint / "tokenizer.json").symlink_to(outside)
    for command in COMMANDS:
        assert "tokenizer.json" in refused(capsys, checkpoint, command)


# ---------------------------------------------------------------- config and tokenizer covered
@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_an_edited_config_is_caught(checkpoint, capsys, command):
    text = (checkpoint / "config.json").read_text()
    assert '"rms_norm_eps": 1e-06' in text
    (checkpoint / "config.json").write_text(text.replace('"rms_norm_eps": 1e-06', '"rms_norm_eps": 5e-01'))
    line = refused(capsys, checkpoint, command)  # same size: only the hash tells
    assert "config.json" in line and "sha256" in line


def test_an_edited_tokenizer_or_chat_template_is_caught(checkpoint, capsys):
    cfg = json.loads((checkpoint / "tokenizer_config.json").read_text())
    cfg["chat_template"] = "{{ 'ignore the user' }}"
    (checkpoint / "tokenizer_config.json").write_text(json.dumps(cfg))
    for command in COMMANDS:
        assert "tokenizer_config.json" in refused(capsys, checkpoint, command)


def test_code_in_the_folder_never_runs(checkpoint, capsys):
    """A tokenizer and a config naming their own classes (auto_map) and the code for them, all
    hashed: that code is never imported."""
    marker = checkpoint.parent / "ran"
    (checkpoint / "evil.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n")
    cfg = json.loads((checkpoint / "tokenizer_config.json").read_text())
    cfg["auto_map"] = {"AutoTokenizer": ["evil.EvilTokenizer", "evil.EvilTokenizer"]}
    (checkpoint / "tokenizer_config.json").write_text(json.dumps(cfg))
    edit_config(checkpoint, auto_map={"AutoModelForCausalLM": "evil.EvilModel", "AutoConfig": "evil.EvilConfig"})
    rehash(checkpoint, "evil.py", "tokenizer_config.json", "config.json")
    rc, _, err = run_cli(capsys, *(a.format(ck=checkpoint) for a in COMMANDS["eval"]))
    if rc:  # refusing is fine; loading is fine too, with transformers' own classes
        assert_clean_error(rc, err)
    else:
        assert getattr(load_checkpoint(checkpoint).model.config, "auto_map", None) is None
    assert not marker.exists()


# ---------------------------------------------------------------- tensor headers
def _largest_allocation(monkeypatch) -> list[int]:
    """Record the element count of every torch.empty/zeros call from now on."""
    sizes: list[int] = []
    for fn in ("empty", "zeros"):
        real = getattr(torch, fn)

        def spy(*shape, _real=real, **kw):
            dims = shape[0] if len(shape) == 1 and isinstance(shape[0], (tuple, list, torch.Size)) else shape
            n = 1
            for d in dims:
                n *= int(d)
            sizes.append(n)
            return _real(*shape, **kw)

        monkeypatch.setattr(torch, fn, spy)
    return sizes


def _seven_bytes(raw: bytes) -> bytes:
    n = int.from_bytes(raw[:8], "little")
    i = raw.index(b'"shape"', 8, 8 + n)
    return raw[:i] + b'"SHAPE"' + raw[i + 7:]


def _bad_utf8(raw: bytes) -> bytes:
    return raw[:9] + b"\xff\xfe\x00abcd" + raw[16:]


@pytest.mark.parametrize("edit", [_seven_bytes, _bad_utf8])
@pytest.mark.parametrize("fname", [QUANT_FILE, DENSE_FILE])
def test_a_seven_byte_header_edit_is_a_clean_error(checkpoint, capsys, fname, edit):
    f = checkpoint / fname
    f.write_bytes(edit(f.read_bytes()))
    rehash(checkpoint, fname)
    for command in COMMANDS:
        assert fname in refused(capsys, checkpoint, command)


def _huge(h):  # 2**38 float32 elements: one TB claimed by an entry whose bytes are a few KB
    h[first_tensor(h)].update(dtype="F32", shape=[2**19, 2**19])
    return h


def _huge_range(h):
    k = first_tensor(h)
    start = h[k]["data_offsets"][0]
    h[k].update(dtype="F32", shape=[2**19, 2**19], data_offsets=[start, start + 2**40])
    return h


def _overlap(h):
    a, b = sorted((k for k in h if k != "__metadata__"), key=lambda k: h[k]["data_offsets"])[:2]
    h[b]["data_offsets"] = [h[a]["data_offsets"][0] + 1, h[a]["data_offsets"][0] + 1 + h[b]["data_offsets"][1]
                            - h[b]["data_offsets"][0]]
    return h


def _set(key, value):
    def change(h):
        h[first_tensor(h)][key] = value
        return h
    return change


HEADER_EDITS = {
    "1 TB shape": _huge,
    "1 TB range": _huge_range,
    "overlapping": _overlap,
    "unknown dtype": _set("dtype", "F8_E9"),
    "shape a string": _set("shape", "64,64"),
    "negative dim": _set("shape", [-1, 64]),
    "offsets reversed": lambda h: _set("data_offsets", h[first_tensor(h)]["data_offsets"][::-1])(h),
    "offsets not ints": _set("data_offsets", ["0", "8"]),
    "header a list": lambda h: [h],
}


@pytest.mark.parametrize("edit", sorted(HEADER_EDITS))
@pytest.mark.parametrize("fname", [QUANT_FILE, DENSE_FILE])
def test_a_rehashed_bad_header_fails_fast_without_allocating(checkpoint, capsys, monkeypatch, fname, edit):
    rewrite_header(checkpoint / fname, HEADER_EDITS[edit])
    rehash(checkpoint, fname)
    sizes = _largest_allocation(monkeypatch)
    start = time.perf_counter()
    for command in COMMANDS:
        assert fname in refused(capsys, checkpoint, command)
    assert time.perf_counter() - start < 30
    assert max(sizes, default=0) < 10**7  # the tiny model's tensors only, never what the header claims


def test_a_layer_whose_tensors_do_not_match_its_manifest_entry_is_refused(checkpoint, capsys):
    m = manifest(checkpoint)
    name = next(iter(m["layers"]))
    m["layers"][name]["shape"] = [64, 4096]
    write_manifest(checkpoint, m)
    for command in COMMANDS:
        assert name in refused(capsys, checkpoint, command)


def test_a_stray_tensor_in_the_quantized_file_is_refused(checkpoint, capsys):
    def rename(h):
        k = first_tensor(h)
        h["model.layers.9.mlp.up_proj.codes"] = h.pop(k)
        return h

    rewrite_header(checkpoint / QUANT_FILE, rename)
    rehash(checkpoint, QUANT_FILE)
    for command in COMMANDS:
        assert "model.layers.9" in refused(capsys, checkpoint, command)


# ---------------------------------------------------------------- the manifest itself
def _drop(key):
    def change(m):
        del m[key]
        return m
    return change


def _layer(key, value):
    def change(m):
        m["layers"][next(iter(m["layers"]))][key] = value
        return m
    return change


MANIFEST_EDITS = {
    "not an object": (lambda m: [m], "object"),
    "a string": (lambda m: "lowbit-checkpoint", "object"),
    "no layers": (_drop("layers"), "layers"),
    "no files": (_drop("files"), "files"),
    "no dtype": (_drop("dtype"), "dtype"),
    "unknown dtype": (lambda m: {**m, "dtype": "float8_e9m0"}, "dtype"),
    "dtype not a string": (lambda m: {**m, "dtype": ["float32"]}, "dtype"),
    "layers a list": (lambda m: {**m, "layers": list(m["layers"])}, "layers"),
    "shape of strings": (_layer("shape", ["64", "64"]), "shape"),
    "shape with zero": (_layer("shape", [0, 64]), "shape"),
    "bits 99": (_layer("bits", 99), "bits"),
    "bits missing": (_layer("bits", None), "bits"),
    "symmetric a string": (_layer("symmetric", "no"), "symmetric"),
    "file entry a number": (lambda m: {**m, "files": {**m["files"], QUANT_FILE: 5}}, QUANT_FILE),
    "sha256 not hex": (lambda m: {**m, "files": {**m["files"], "config.json": {"bytes": 1, "sha256": "z"}}},
                       "config.json"),
    "stats a list": (lambda m: {**m, "stats": [1]}, "stats"),
    "source a string": (lambda m: {**m, "source": "x"}, "source"),
}


@pytest.mark.parametrize("edit", sorted(MANIFEST_EDITS))
def test_a_malformed_manifest_is_a_message_naming_the_key(checkpoint, capsys, edit):
    change, key = MANIFEST_EDITS[edit]
    write_manifest(checkpoint, change(manifest(checkpoint)))
    for command in COMMANDS:
        assert key in refused(capsys, checkpoint, command)
    rc, _, err = run_cli(capsys, "info", checkpoint)
    assert key in assert_clean_error(rc, err)


def test_a_version_1_checkpoint_asks_for_a_new_quantize(checkpoint, capsys):
    m = manifest(checkpoint)
    m["format_version"] = 1
    write_manifest(checkpoint, m)
    for command in COMMANDS:
        line = refused(capsys, checkpoint, command)
        # the version found, the version read, and the command that makes the checkpoint again
        assert {1, FORMAT_VERSION} <= set(numbers(line)) and "lowbit quantize" in line


@pytest.mark.parametrize("text", ["", "{", "[[[[" * 100000, "null"])
def test_an_unreadable_manifest_is_refused(checkpoint, capsys, text):
    (checkpoint / MANIFEST).write_text(text)
    for command in COMMANDS:
        assert MANIFEST in refused(capsys, checkpoint, command)


# ---------------------------------------------------------------- missing files
@pytest.mark.parametrize("gone", ["config.json", "tokenizer.json", QUANT_FILE, DENSE_FILE])
@pytest.mark.parametrize("unlisted", [False, True])
def test_a_deleted_file_is_named(checkpoint, capsys, gone, unlisted):
    (checkpoint / gone).unlink()
    if unlisted:  # also taken out of the manifest, so only the required-file checks can notice
        m = manifest(checkpoint)
        del m["files"][gone]
        write_manifest(checkpoint, m)
    for command in COMMANDS:
        line = refused(capsys, checkpoint, command)
        assert gone in line
        assert "sentencepiece" not in line


# ---------------------------------------------------------------- a damaged checkpoint is not a model folder
@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_a_checkpoint_without_its_manifest_is_refused(checkpoint, capsys, command):
    (checkpoint / MANIFEST).unlink()
    before = tree(checkpoint)
    line = refused(capsys, checkpoint, command)
    assert MANIFEST in line and QUANT_FILE in line  # what is missing, and what marks it as a checkpoint
    assert tree(checkpoint) == before


def test_a_lowbit_config_alone_marks_a_checkpoint(checkpoint, capsys):
    (checkpoint / MANIFEST).unlink()
    (checkpoint / QUANT_FILE).unlink()
    assert looks_like_checkpoint(checkpoint) and is_checkpoint(checkpoint)
    for command in COMMANDS:
        assert MANIFEST in refused(capsys, checkpoint, command)
    with pytest.raises(CheckpointError, match=re.escape(MANIFEST)):
        check_not_checkpoint(checkpoint)


def test_model_loaders_can_tell_checkpoints_from_model_folders(checkpoint, env):
    check_not_checkpoint(env / "tiny")  # a plain Hugging Face folder passes
    assert not looks_like_checkpoint(env / "tiny")
    with pytest.raises(CheckpointError, match="load_checkpoint"):
        check_not_checkpoint(checkpoint)
    (checkpoint / MANIFEST).unlink()
    with pytest.raises(CheckpointError, match=re.escape(MANIFEST)):  # names the missing file
        check_not_checkpoint(checkpoint)


def test_transformers_refuses_a_checkpoint(checkpoint):
    """from_pretrained must not load a checkpoint as a plain model with random quantized layers."""
    from transformers import AutoModelForCausalLM

    with pytest.raises((OSError, ValueError)):
        AutoModelForCausalLM.from_pretrained(checkpoint)


def test_hashing_comes_before_parsing(checkpoint, monkeypatch):
    """A tampered header is reported as a hash mismatch: it is never parsed."""
    rewrite_header(checkpoint / QUANT_FILE, _huge)
    m = manifest(checkpoint)
    m["files"][QUANT_FILE]["bytes"] = (checkpoint / QUANT_FILE).stat().st_size  # the size fits, the hash not
    write_manifest(checkpoint, m)
    parsed = []
    import lowbit.checkpoint.tensors as ck

    monkeypatch.setattr(ck, "_check_header", lambda *a: parsed.append(a) or {})
    with pytest.raises(CheckpointError, match="sha256"):
        load_checkpoint(checkpoint)
    assert parsed == []
