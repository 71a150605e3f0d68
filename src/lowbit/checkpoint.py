"""Save and load quantized models: safetensors + a JSON manifest, no pickle.

A checkpoint folder holds
    manifest.json           format version, lowbit version, recipe, source model and its sha256,
                            calibration set and seed, per-layer format, sha256 of every tensor file
    quantized.safetensors   per quantized layer: packed codes, float16 scales, packed zeros,
                            optional permutation and bias
    dense.safetensors       every other tensor (embeddings, norms, an untied LM head); not named
                            model.safetensors, so transformers' own from_pretrained finds no weights
                            and refuses the folder instead of loading random ones
    config.json, tokenizer files   so loading needs nothing but this folder; config.json carries
                            quantization_config {"quant_method": "lowbit", "format_version": 2}
    REPORT.md               written by the CLI

Loading rebuilds the transformers model from config.json with empty weights, puts QuantLinear
modules where the manifest says, and checks sizes and hashes first: a truncated or modified file
is a CheckpointError, never a half-loaded model.
"""

from __future__ import annotations

import ctypes
import datetime as _dt
import json
import logging
import math
import os
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

import lowbit
from lowbit.errors import CheckpointError, ConfigError, ShapeError
from lowbit.marks import (  # noqa: F401 - check_not_checkpoint: re-exported for loaders of model folders
    CONFIG_FILE,
    FORMAT,
    MANIFEST,
    MAX_JSON_BYTES,
    QUANT_FILE,
    QUANT_METHOD,
    check_not_checkpoint,
    looks_like_checkpoint,
    missing_manifest,
)
from lowbit.models.hashing import external_stamp, sha256_file, stamped_sha256
from lowbit.outputs import (
    STAGING_MARKER,
    apply_umask,
    check_output,
    make_staging,
    publish,
    remove_tree,
)
from lowbit.paths import cache_dir
from lowbit.qtensor import QuantFormat, QuantizedWeight
from lowbit.runtime.qlinear import QuantLinear

log = logging.getLogger(__name__)

FORMAT_VERSION = 2
# tensors of one quantized layer in quantized.safetensors (bias aside); codes.b<w> / zeros.b<w>
# hold the groups of width w of a mixed-precision layer
_PART = re.compile(r"codes|scales|scale_mult|zeros|perm|group_bits|(codes|zeros)\.b[1-8]")
DENSE_FILE = "dense.safetensors"
REPORT = "REPORT.md"


def _quantized_modules(model: nn.Module) -> dict[str, QuantLinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}


def layer_entry(m: QuantLinear) -> dict[str, Any]:
    """The manifest's description of one quantized layer."""
    qw = m.quantized_weight()
    entry = {**qw.fmt.to_dict(), "shape": list(qw.shape), "perm": qw.perm is not None, "bias": m.bias is not None}
    if qw.mixed:
        entry["group_bits"] = qw.group_bits.tolist()
        entry["average_bits"] = qw.average_bits()
    return entry


def layer_entries(model: nn.Module) -> dict[str, dict[str, Any]]:
    return {name: layer_entry(m) for name, m in _quantized_modules(model).items()}


def _split_state(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], dict[str, dict]]:
    """(quantized tensors, dense tensors, per-layer manifest entries), tied tensors stored once."""
    qmods = _quantized_modules(model)
    quant: dict[str, torch.Tensor] = {}
    layers: dict[str, dict] = {}
    for name, m in qmods.items():
        qw = m.quantized_weight()
        for key, t in qw.packed().items():
            quant[f"{name}.{key}"] = t.contiguous()
        if m.bias is not None:
            quant[f"{name}.bias"] = m.bias.detach().contiguous()
        layers[name] = layer_entry(m)
    dense: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for key, t in model.state_dict().items():
        owner = key.rsplit(".", 1)[0]
        if owner in qmods:
            continue
        ptr = t.untyped_storage().data_ptr()
        if ptr in seen:  # tied weights (e.g. lm_head = embed_tokens): stored once, re-tied on load
            continue
        seen.add(ptr)
        dense[key] = t.detach().contiguous()
    return quant, dense, layers


def save_checkpoint(
    model: nn.Module,
    tokenizer: Any,
    out_dir: str | os.PathLike,
    info: dict[str, Any],
    report: str | Callable[[dict[str, Any]], str] | None = None,
    overwrite: bool = False,
    protect: Iterable[str | os.PathLike] = (),
) -> Path:
    """Write the checkpoint into a staging folder beside `out_dir`, then move it into place in one
    rename (outputs.publish): `out_dir` is never half written, and an existing folder is replaced
    only with `overwrite` and only if it is a lowbit checkpoint and none of `protect` (the input
    model) or the current directory (outputs.check_output).

    `info` goes into the manifest (recipe, source, calibration, stats...); info["stats"] gains
    disk_bytes, the bytes of the files written. `report` is REPORT.md's text, or a function of the
    finished manifest that returns it. Every file written except manifest.json and REPORT.md is
    listed in the manifest's "files" with its size and sha256.
    """
    out = check_output(out_dir, overwrite, protect)
    staging = make_staging(out)
    try:
        quant, dense, layers = _split_state(model)
        save_file(quant, staging / QUANT_FILE, metadata={"format": FORMAT})
        save_file(dense, staging / DENSE_FILE, metadata={"format": FORMAT})
        model.config.save_pretrained(staging)
        _mark_config(staging / "config.json")
        if tokenizer is not None:
            tokenizer.save_pretrained(staging)
        files = _file_entries(staging)
        manifest = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "lowbit_version": lowbit.__version__,
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
            **info,
            "layers": layers,
            "files": files,
        }
        if isinstance(info.get("stats"), dict):
            manifest["stats"] = {**info["stats"], "disk_bytes": sum(f["bytes"] for f in files.values())}
        (staging / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=False) + "\n")
        text = report(manifest) if callable(report) else report
        if text is not None:
            (staging / REPORT).write_text(text)
        apply_umask(staging)
        return publish(staging, out, overwrite, protect)
    except BaseException:
        if staging.is_dir():
            remove_tree(staging)
        raise


def _mark_config(path: Path) -> None:
    """Add lowbit's quantization_config to a saved config.json: lowbit strips it when it loads the
    checkpoint, and other tools see that the folder is not a plain Hugging Face model."""
    config = json.loads(path.read_text())
    config["quantization_config"] = {"quant_method": "lowbit", "format_version": FORMAT_VERSION}
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def _file_entries(folder: Path) -> dict[str, dict[str, Any]]:
    """{name: {"bytes", "sha256"}} of every file in a staging folder but the manifest, REPORT.md
    and the staging marker. A sub-folder is refused: the manifest lists plain names only."""
    entries = {}
    for f in sorted(folder.iterdir()):
        if f.name in (MANIFEST, REPORT, STAGING_MARKER):
            continue
        if not f.is_file() or f.is_symlink():
            raise CheckpointError(f"saving wrote {f.name}, which is not a plain file; a checkpoint holds plain "
                                  "files only (report this as a lowbit bug)")
        entries[f.name] = {"bytes": f.stat().st_size, "sha256": sha256_file(f)}
    return entries


@dataclass
class LoadedCheckpoint:
    model: nn.Module
    tokenizer: Any
    manifest: dict[str, Any]
    path: Path


# ---------------------------------------------------------------- reading a checkpoint
TOKENIZER_FILE = "tokenizer.json"
UNHASHED = (MANIFEST, "REPORT.md")  # the only files of a checkpoint folder no sha256 covers
REQUIRED_FILES = (QUANT_FILE, DENSE_FILE, CONFIG_FILE)
FLOAT_DTYPES = ("float16", "bfloat16", "float32", "float64")  # the manifest's "dtype"
_SHA256 = re.compile(r"[0-9a-f]{64}")
_MODULE_NAME = re.compile(r"\w+(\.\w+)*")


def _read_json(f: Path, what: str) -> Any:
    """The JSON value in `f`, or a CheckpointError naming the file; a file over MAX_JSON_BYTES is
    refused unread."""
    try:
        size = f.stat().st_size
        if size > MAX_JSON_BYTES:
            raise CheckpointError(f"{f} is {size} bytes, more than a {what} may have ({MAX_JSON_BYTES}); "
                                  "the checkpoint is damaged, re-run `lowbit quantize`")
        data = f.read_bytes()
    except OSError as e:
        raise CheckpointError(f"{f} could not be read ({e})") from None
    try:
        return json.loads(data)
    except (ValueError, RecursionError) as e:  # RecursionError: JSON nested too deep to parse
        raise CheckpointError(f"{f} is not valid JSON ({e}); the {what} is damaged, re-run `lowbit quantize` "
                              "or copy the checkpoint again") from None


def is_checkpoint(path: str | os.PathLike) -> bool:
    """Whether to open `path` with load_checkpoint rather than as a model: looks_like_checkpoint, so
    a damaged checkpoint reaches load_checkpoint, which says what is wrong with it."""
    return looks_like_checkpoint(path)


def _is_int(x: Any) -> bool:
    return type(x) is int  # bool is an int subclass, never a size


def _is_number(x: Any) -> bool:
    return type(x) in (int, float) and math.isfinite(x)


def _check_file_name(name: Any, where: Path) -> None:
    """A manifest's file name must be a plain name of a file in the checkpoint folder."""
    if (not isinstance(name, str) or name in ("", ".", "..", MANIFEST) or name != name.strip()
            or any(c in name for c in "/\\:\0") or Path(name).is_absolute()):
        raise CheckpointError(f"{where}: files names {name!r}, which is not the plain name of a file in the "
                              "checkpoint folder; the manifest is damaged or was edited, re-run `lowbit quantize`")


def _check_layer_entry(name: Any, entry: Any, where: Path) -> None:
    def bad(problem: str) -> CheckpointError:
        return CheckpointError(f"{where}: layers[{name!r}] {problem}; the manifest is damaged, "
                               "re-run `lowbit quantize`")

    if not isinstance(name, str) or not _MODULE_NAME.fullmatch(name):
        raise bad("is not a module name (dotted words)")
    if not isinstance(entry, dict):
        raise bad("is not an object")
    shape = entry.get("shape")
    if not (isinstance(shape, list) and len(shape) == 2 and all(_is_int(d) and d > 0 for d in shape)):
        raise bad(f"shape is {shape!r}, not [out_features, in_features] of positive integers")
    for key in ("bits", "group_size"):
        if not _is_int(entry.get(key)):
            raise bad(f"{key} is {entry.get(key)!r}, not an integer")
    if not _is_int(entry.get("scale_bits", 0)):
        raise bad(f"scale_bits is {entry.get('scale_bits')!r}, not an integer")
    for key, required in (("symmetric", True), ("perm", False), ("bias", False)):
        if (required or key in entry) and not isinstance(entry.get(key), bool):
            raise bad(f"{key} is {entry.get(key)!r}, not true or false")
    if "group_bits" in entry:
        gb = entry["group_bits"]
        if not (isinstance(gb, list) and gb and all(_is_int(b) and 1 <= b <= 8 for b in gb)):
            raise bad("group_bits is not a list of bit widths from 1 to 8")
        if not _is_number(entry.get("average_bits")):
            raise bad(f"average_bits is {entry.get('average_bits')!r}, not a number")
    try:
        QuantFormat.from_dict(entry)
    except (ConfigError, ShapeError) as e:
        raise bad(f"has an unsupported format ({e})") from None


def check_manifest(manifest: Any, where: Path) -> dict[str, Any]:
    """`manifest` (parsed from the file `where`) if it has every key lowbit reads, with the right
    types; else a CheckpointError naming the key. A manifest of an older format version is refused."""
    def bad(key: str, problem: str) -> CheckpointError:
        return CheckpointError(f"{where}: {key} {problem}; the manifest is damaged, re-run `lowbit quantize`")

    if not isinstance(manifest, dict):
        raise CheckpointError(f"{where} holds a JSON {type(manifest).__name__}, not an object; it is not a "
                              "lowbit manifest, re-run `lowbit quantize`")
    if manifest.get("format") != FORMAT:
        raise CheckpointError(f"{where} is not a lowbit manifest (format={manifest.get('format')!r})")
    version = manifest.get("format_version")
    if version != FORMAT_VERSION:
        if _is_int(version) and version < FORMAT_VERSION:
            raise CheckpointError(
                f"{where.parent}: checkpoint format version {version} was made by an older lowbit, whose "
                f"manifest leaves the config and tokenizer files unhashed; lowbit {lowbit.__version__} reads "
                f"version {FORMAT_VERSION}: re-run `lowbit quantize` to make the checkpoint again")
        raise CheckpointError(f"{where.parent}: checkpoint format version {version!r} is not supported by "
                              f"lowbit {lowbit.__version__} (reads version {FORMAT_VERSION})")
    for key in ("dtype", "layers", "files"):
        if key not in manifest:
            raise bad(key, "is missing")
    if manifest["dtype"] not in FLOAT_DTYPES:
        raise bad("dtype", f"is {manifest['dtype']!r}, not one of {', '.join(FLOAT_DTYPES)}")
    for key in ("source", "recipe", "stats"):
        if key in manifest and not isinstance(manifest[key], dict):
            raise bad(key, "is not an object")
    if isinstance(manifest.get("source"), dict) and not isinstance(manifest["source"].get("kind", ""), str):
        raise bad("source.kind", "is not a string")
    for key, value in manifest.get("stats", {}).items():
        if key in ("bits_per_weight", "model_bytes", "seconds") and not _is_number(value):
            raise bad(f"stats.{key}", f"is {value!r}, not a number")
    cal = manifest.get("calibration")
    if cal is not None:
        if not isinstance(cal, dict):
            raise bad("calibration", "is neither null nor an object")
        if not (isinstance(cal.get("dataset"), str)
                and all(_is_int(cal.get(k)) for k in ("n_samples", "seqlen", "seed"))):
            raise bad("calibration", "needs a dataset name and integer n_samples, seqlen and seed")
    if not isinstance(manifest["layers"], dict):
        raise bad("layers", "is not an object")
    for name, entry in manifest["layers"].items():
        _check_layer_entry(name, entry, where)
    files = manifest["files"]
    if not isinstance(files, dict):
        raise bad("files", "is not an object")
    for name, meta in files.items():
        _check_file_name(name, where)
        if not (isinstance(meta, dict) and _is_int(meta.get("bytes")) and meta["bytes"] >= 0
                and isinstance(meta.get("sha256"), str) and _SHA256.fullmatch(meta["sha256"])):
            raise bad(f"files[{name!r}]", "is not {\"bytes\": size, \"sha256\": 64 hex digits}")
    absent = [f for f in REQUIRED_FILES if f not in files]
    if absent:
        raise bad("files", f"does not list {', '.join(absent)}, so nothing checks them")
    return manifest


def read_manifest(path: str | os.PathLike) -> dict[str, Any]:
    """The checked manifest of the checkpoint folder `path` (check_manifest); a folder without one
    is refused, with a message that says so when it looks like a damaged checkpoint."""
    path = Path(path)
    mpath = path / MANIFEST
    if not path.is_dir() or not mpath.is_file():
        if looks_like_checkpoint(path):
            raise CheckpointError(missing_manifest(path))
        raise CheckpointError(f"{path} is not a lowbit checkpoint (no {MANIFEST}); create one with `lowbit quantize`")
    return check_manifest(_read_json(mpath, "manifest"), mpath)


class _Background:
    """fn(*args) in a thread; result() joins it and re-raises what it raised."""

    def __init__(self, fn, *args):
        import threading

        self._error: BaseException | None = None
        self._value = None

        def run():
            try:
                self._value = fn(*args)
            except BaseException as e:  # noqa: BLE001 - re-raised in the caller by result()
                self._error = e

        self._thread = threading.Thread(target=run, daemon=True)
        self._thread.start()

    def result(self):
        self._thread.join()
        if self._error is not None:
            raise self._error
        return self._value


def verify_files(path: Path, manifest: dict[str, Any], hashes: bool = True, cache: Path | None = None) -> None:
    """The checkpoint folder holds exactly the files its manifest lists (besides manifest.json and
    REPORT.md), each a plain file inside the folder with its listed size and (with `hashes`) sha256.

    Run before any of the files is parsed. With a `cache` folder, a file's hash is remembered there
    (models.hashing: a stamp keyed by its path, trusted while its size and modification time are
    unchanged), so a checkpoint loaded again is not read twice; without one, every file is hashed."""
    path = Path(path)
    files = manifest["files"]
    for name in files:
        _check_file_name(name, path / MANIFEST)
    try:
        present = sorted(os.listdir(path))
    except OSError as e:
        raise CheckpointError(f"{path} could not be listed ({e})") from None
    unlisted = [n for n in present if n not in files and n not in UNHASHED]
    if unlisted:
        raise CheckpointError(
            f"{path}: {', '.join(unlisted[:5])} {'is' if len(unlisted) == 1 else 'are'} not in the manifest, so no "
            "sha256 covers what loading might read from them; remove them, or re-run `lowbit quantize`")
    folder = Path(os.path.realpath(path))
    for fname, meta in files.items():
        f = path / fname
        target = Path(os.path.realpath(f))  # never raises, unlike resolve() on a link loop
        if f.is_symlink() and target.parent != folder:
            raise CheckpointError(f"{f} is a link to {target}, outside the checkpoint folder; a checkpoint "
                                  "holds its own files: copy them in, or re-run `lowbit quantize`")
        if not f.is_file():
            raise CheckpointError(f"{f} is missing or not a file; the checkpoint is incomplete, "
                                  "re-run `lowbit quantize`")
        size = f.stat().st_size
        if size != meta["bytes"]:
            raise CheckpointError(
                f"{f} is {size} bytes but the manifest says {meta['bytes']}: the file is truncated or "
                "was replaced; re-run `lowbit quantize` or copy the checkpoint again"
            )
    if not hashes:
        return
    for fname, meta in files.items():
        f = path / fname
        sha = sha256_file(f) if cache is None else stamped_sha256(f, external_stamp(f, cache))
        if sha != meta["sha256"]:
            raise CheckpointError(
                f"{f} does not match the sha256 in {MANIFEST}: it was modified after saving; "
                "re-run `lowbit quantize` or copy the checkpoint again"
            )


_ST_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "U8": torch.uint8,
              "I8": torch.int8, "I16": torch.int16, "I32": torch.int32, "I64": torch.int64, "BOOL": torch.bool}


def _check_header(header: Any, data_bytes: int) -> dict[str, dict[str, Any]]:
    """A safetensors header's tensor entries, once each has a known dtype, a shape of non-negative
    integers and a byte range [start, end) inside the `data_bytes` after the header that holds
    exactly its elements, and no two ranges overlap; else a ValueError saying which tensor is
    wrong. Nothing is allocated from what the header claims until this passes."""
    if not isinstance(header, dict):
        raise ValueError(f"the header is a JSON {type(header).__name__}, not an object")  # noqa: TRY004
    entries: dict[str, dict[str, Any]] = {}
    for key, meta in header.items():
        if key == "__metadata__":
            if not isinstance(meta, dict):
                raise ValueError("__metadata__ is not an object")
            continue
        if not isinstance(meta, dict) or meta.get("dtype") not in _ST_DTYPES:
            raise ValueError(f"tensor {key!r} has no known dtype ({', '.join(_ST_DTYPES)})")
        shape, offsets = meta.get("shape"), meta.get("data_offsets")
        if not (isinstance(shape, list) and all(_is_int(d) and d >= 0 for d in shape)):
            raise ValueError(f"tensor {key!r} has shape {shape!r}, not a list of non-negative integers")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_int(o) for o in offsets)
                and 0 <= offsets[0] <= offsets[1]):
            raise ValueError(f"tensor {key!r} has data_offsets {offsets!r}, not a [start, end] byte range")
        if offsets[1] > data_bytes:
            raise ValueError(f"tensor {key!r} ends {offsets[1] - data_bytes} bytes past the end of the file: "
                             "the file is truncated, or its header is wrong")
        if math.prod(shape) * _ST_DTYPES[meta["dtype"]].itemsize != offsets[1] - offsets[0]:
            raise ValueError(f"tensor {key!r} of shape {shape} and dtype {meta['dtype']} does not fill its "
                             f"{offsets[1] - offsets[0]} bytes")
        entries[key] = meta
    end = 0
    for key, meta in sorted(entries.items(), key=lambda kv: tuple(kv[1]["data_offsets"])):
        start, stop = meta["data_offsets"]
        if start < end and stop > start:
            raise ValueError(f"tensor {key!r} overlaps the bytes of another tensor")
        end = max(end, stop)
    return entries


class _Tensors:
    """A safetensors file read one tensor at a time with plain file reads.

    safetensors' own readers memory-map the file, and mapped pages that were read count in the
    process's resident memory until the file is closed, so loading a checkpoint that way peaks
    at the model plus its files. Here each tensor is read into its own buffer (the header is
    safetensors' documented one: a little-endian u64 length, then JSON with each tensor's dtype,
    shape and byte range), and a float tensor loaded as another float dtype is converted in
    slices of at most CHUNK bytes, so the float32 copy of a large table never exists whole.
    """

    CHUNK = 64 << 20
    MAX_HEADER = 100 << 20  # bytes of JSON header, the limit safetensors itself sets

    def __init__(self, f: Path):
        self.path = f
        try:
            self._fh = open(f, "rb")  # noqa: SIM115 - held open for reads; closed by close()
        except OSError as e:
            raise CheckpointError(f"{f} could not be opened ({e})") from None
        try:
            size = os.fstat(self._fh.fileno()).st_size
            n = int.from_bytes(self._fh.read(8), "little")
            if not 0 < n <= min(size - 8, self.MAX_HEADER):
                raise ValueError(f"a header length of {n} bytes does not fit a file of {size}")
            header = json.loads(self._fh.read(n))
            self._meta = _check_header(header, size - 8 - n)
        except (OSError, ValueError, RecursionError) as e:
            self._fh.close()
            raise CheckpointError(f"{f} could not be read as safetensors ({e}); re-run `lowbit quantize` "
                                  "or copy the checkpoint again") from None
        self._base = 8 + n
        self.keys = list(self._meta)

    def shape(self, key: str) -> tuple[int, ...] | None:
        meta = self._meta.get(key)
        return None if meta is None else tuple(meta["shape"])

    def get(self, key: str, dtype: torch.dtype | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
        """The tensor `key`, converted to `dtype` when given and it is a float tensor; `out`: a
        contiguous tensor of its stored dtype and shape to read it into."""
        try:
            meta = self._meta[key]
            stored = _ST_DTYPES[meta["dtype"]]
            start, end = meta["data_offsets"]
            shape = tuple(meta["shape"])
        except KeyError as e:
            raise CheckpointError(f"{self.path}: tensor {key} is missing or has an unknown dtype ({e})") from None
        out_dtype = dtype if dtype is not None and stored.is_floating_point else stored
        if out is not None and (out.dtype != stored or tuple(out.shape) != shape or not out.is_contiguous()):
            raise ValueError(f"{key}: a {stored} {shape} buffer is needed")
        out = torch.empty(shape, dtype=out_dtype) if out is None else out
        if out.numel() * stored.itemsize != end - start:
            raise CheckpointError(f"{self.path}: tensor {key} has {end - start} bytes for shape {shape}")
        self._fh.seek(self._base + start)
        if out_dtype == stored:
            self._read_into(out.reshape(-1).view(torch.uint8), key)
            return out
        flat, step = out.reshape(-1), max(1, self.CHUNK // stored.itemsize)
        buf = torch.empty(min(step, flat.numel()), dtype=stored)
        for i in range(0, flat.numel(), step):
            part = buf[: min(step, flat.numel() - i)]
            self._read_into(part.view(torch.uint8), key)
            flat[i:i + part.numel()].copy_(part)
        return out

    def mapped(self, key: str) -> torch.Tensor:
        """The tensor `key` as a view of the file, memory-mapped (copy-on-write: writing to it never
        changes the file): its pages are read from disk when they are first touched."""
        import numpy as np

        meta = self._meta.get(key)
        if meta is None or meta.get("dtype") not in _ST_DTYPES:
            raise CheckpointError(f"{self.path}: tensor {key} is missing or has an unknown dtype")
        stored = _ST_DTYPES[meta["dtype"]]
        start, end = meta["data_offsets"]
        shape = tuple(meta["shape"])
        if math.prod(shape) * stored.itemsize != end - start or (self._base + start) % stored.itemsize:
            raise CheckpointError(f"{self.path}: tensor {key} has {end - start} bytes for shape {shape}")
        if self._base + end > self.path.stat().st_size:
            raise CheckpointError(f"{self.path}: tensor {key} is cut short; the file is truncated")
        raw = np.memmap(self.path, dtype=np.uint8, mode="c", offset=self._base + start, shape=(end - start,))
        return torch.from_numpy(raw).view(stored).reshape(shape)

    def close(self) -> None:
        self._fh.close()

    def _read_into(self, dst: torch.Tensor, key: str) -> None:
        if dst.numel() and self._fh.readinto(memoryview(dst.numpy())) != dst.numel():
            raise CheckpointError(f"{self.path}: tensor {key} is cut short; the file is truncated")


RUNTIMES = ("reference", "packed")


def release_freed_memory() -> None:
    """Hand memory that loading freed (read buffers, conversion slices, pre-fusion copies) back
    to the system: glibc keeps freed heap blocks mapped, which otherwise stay in the resident
    size for the life of the process. A no-op where the C library has no malloc_trim."""
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _fusion_buffers(layers: dict[str, Any], by_layer: dict[str, list[str]], quant: _Tensors) -> dict[str, torch.Tensor]:
    """For each group of a block's projections that read one input (models.arch.LAYOUTS) and are
    stored alike (one uniform format, the same packed row length): one uint8 buffer holding all
    their packed codes, as a view per layer name."""
    from lowbit.models.arch import LAYOUTS

    views: dict[str, torch.Tensor] = {}
    blocks = {name.rsplit(".", 2)[0] for name in layers if name.count(".") >= 2}
    for block in blocks:
        for layout in LAYOUTS.values():
            for group in layout:
                names = [f"{block}.{member}" for member in group]
                if len(names) < 2 or not all(n in layers and "codes" in by_layer.get(n, []) for n in names):
                    continue
                metas = [layers[n] for n in names]
                shapes = [quant.shape(f"{n}.codes") for n in names]
                fmts = {(m.get("bits"), m.get("group_size"), m.get("symmetric"), m.get("scale_bits", 0)) for m in metas}
                if len(fmts) != 1 or any(len(sh) != 2 for sh in shapes) or len({sh[1] for sh in shapes}) != 1 \
                        or any("group_bits" in by_layer.get(n, []) for n in names):
                    continue
                buf = torch.empty(sum(sh[0] for sh in shapes), shapes[0][1], dtype=torch.uint8)
                start = 0
                for n, sh in zip(names, shapes):
                    views[n] = buf[start:start + sh[0]]
                    start += sh[0]
    return views


def _mapped_embedding(model: nn.Module, dense: _Tensors, dtype: torch.dtype) -> tuple[str, nn.Module] | None:
    """(name, MappedEmbedding) for the model's input embedding read from `dense` on demand
    (runtime/embedding.py), or None where it is tied to the output head or is not a plain
    nn.Embedding (e.g. Gemma's scaled one)."""
    from lowbit.runtime.embedding import MappedEmbedding

    emb = model.get_input_embeddings()
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    if type(emb) is not nn.Embedding or getattr(config, "tie_word_embeddings", False):
        return None
    name = next((n for n, m in model.named_modules() if m is emb), None)
    if name is None or dense.shape(f"{name}.weight") is None:
        return None
    table = dense.mapped(f"{name}.weight")
    if not table.is_floating_point() or tuple(table.shape) != (emb.num_embeddings, emb.embedding_dim):
        return None
    return name, MappedEmbedding(table, dtype, emb.padding_idx)


def _read_config(path: Path) -> Any:
    """The model config from the checkpoint's config.json, lowbit's quantization_config removed
    (transformers would otherwise look for a quantizer named lowbit) and built from transformers'
    own classes only: no code from the folder runs."""
    from transformers import CONFIG_MAPPING

    f = path / CONFIG_FILE
    config = _read_json(f, "model config")
    if not isinstance(config, dict):
        raise CheckpointError(f"{f} holds a JSON {type(config).__name__}, not an object; re-run `lowbit quantize`")
    q = config.pop("quantization_config", None)
    if not (isinstance(q, dict) and q.get("quant_method") == QUANT_METHOD):
        raise CheckpointError(f"{f}: quantization_config does not name lowbit ({q!r}); the checkpoint is damaged, "
                              "re-run `lowbit quantize`")
    config.pop("auto_map", None)  # classes from the folder's own code, which lowbit never runs
    model_type = config.get("model_type")
    if not isinstance(model_type, str) or model_type not in CONFIG_MAPPING:
        raise CheckpointError(f"{f}: model_type {model_type!r} is not an architecture transformers "
                              f"knows; upgrade transformers or re-run `lowbit quantize`")
    try:
        return CONFIG_MAPPING[model_type].from_dict(config)
    except (ValueError, TypeError, KeyError, AttributeError) as e:
        raise CheckpointError(f"{f} is not a valid {model_type} config ({e}); re-run `lowbit quantize`") from None


def _read_tokenizer(path: Path) -> Any:
    """The checkpoint's tokenizer through AutoTokenizer, with no code from the folder."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path, trust_remote_code=False)
    except Exception as e:  # noqa: BLE001 - transformers and tokenizers raise many types on bad files
        raise CheckpointError(f"{path}: the tokenizer files could not be loaded ({type(e).__name__}: {e}); "
                              "re-run `lowbit quantize`") from None


def _layer_parts(quant: _Tensors, layers: dict[str, Any]) -> dict[str, list[str]]:
    """{layer name: the parts stored for it (codes, scales, codes.b3, bias...)}; a tensor in
    quantized.safetensors that is no part of a layer in the manifest is an error."""
    by_layer: dict[str, list[str]] = {}
    for k in quant.keys:
        name, _, part = k.rpartition(".")
        if part.startswith("b") and part[1:].isdigit():  # codes.b3 / zeros.b3
            name, _, kind = name.rpartition(".")
            part = f"{kind}.{part}"
        if name not in layers or not (_PART.fullmatch(part) or part == "bias"):
            raise CheckpointError(f"{quant.path}: tensor {k!r} is not part of a quantized layer in the manifest; "
                                  "the checkpoint is damaged, re-run `lowbit quantize`")
        by_layer.setdefault(name, []).append(part)
    return by_layer


def _check_layer_tensors(name: str, meta: dict[str, Any], parts: list[str], quant: _Tensors) -> None:
    """The stored tensors of layer `name` have the shapes its manifest entry implies (checked from
    the header, before any of them is read)."""
    from lowbit.formats import affine, pack

    out, n_in = meta["shape"]
    fmt = QuantFormat.from_dict(meta)
    g = affine.n_groups(n_in, fmt.group_size)
    want: dict[str, tuple[int, ...]] = {"scales": (out, g)}
    if fmt.scale_bits:
        want["scale_mult"] = (out,)
    if meta.get("perm"):
        want["perm"] = (n_in,)
    if meta.get("bias"):
        want["bias"] = (out,)
    if "group_bits" in meta:
        want["group_bits"] = (g,)
    else:
        want["codes"] = (out, pack.packed_length(n_in, fmt.bits))
        if not fmt.symmetric:
            want["zeros"] = (pack.packed_length(out * g, fmt.bits),)
    wrong = [f"{p} {quant.shape(f'{name}.{p}')} (expected {s})" for p, s in want.items()
             if quant.shape(f"{name}.{p}") != s]
    if "group_bits" in meta:  # per-width parts: [out, packed row] codes, flat zeros
        widths = {p for p in parts if p.startswith("codes.b")}
        wrong += [f"{p} {quant.shape(f'{name}.{p}')}" for p in widths if len(quant.shape(f"{name}.{p}")) != 2
                  or quant.shape(f"{name}.{p}")[0] != out]
        if not widths:
            wrong.append("no codes")
    extra = sorted(set(parts) - set(want) - {p for p in parts if ".b" in p})
    if wrong or extra:
        raise CheckpointError(f"{quant.path}: layer {name} does not match its manifest entry (shape {meta['shape']}, "
                              f"{'; '.join(wrong + [f'unexpected {p}' for p in extra])}); the checkpoint is "
                              "damaged, re-run `lowbit quantize`")


def _check_against_model(model: nn.Module, layers: dict[str, Any], dense: _Tensors, path: Path) -> None:
    """Every manifest layer replaces an nn.Linear of its shape in the model built from config.json,
    and every tensor in the dense file is a model tensor of its shape: checked on the empty model,
    before any tensor is read."""
    for name, meta in layers.items():
        try:
            lin = model.get_submodule(name)
        except AttributeError:
            lin = None
        if not isinstance(lin, nn.Linear) or [lin.out_features, lin.in_features] != meta["shape"]:
            found = f"{lin.out_features}x{lin.in_features}" if isinstance(lin, nn.Linear) else type(lin).__name__
            raise CheckpointError(f"{path}: the manifest's layer {name} ({meta['shape'][0]}x{meta['shape'][1]}) is "
                                  f"not a linear layer of the model config.json describes ({found}); re-run "
                                  "`lowbit quantize`")
    expected = {k: tuple(t.shape) for k, t in model.state_dict().items()}
    for k in dense.keys:
        if expected.get(k) != dense.shape(k):
            what = ("is not a tensor of the model" if k not in expected
                    else f"has shape {dense.shape(k)}, the model {expected[k]}")
            raise CheckpointError(f"{dense.path}: {k} {what}; the checkpoint is damaged, re-run `lowbit quantize`")


def verify_checkpoint(path: str | os.PathLike, cache: Path | None = None) -> dict[str, Any]:
    """Everything load_checkpoint checks short of building the model, for `lowbit info --verify`:
    the manifest, the listing, sizes and sha256 of every file (hashed anew unless `cache`), the
    config, both tensor headers and each layer's tensors. Returns the manifest."""
    path = Path(path)
    manifest = read_manifest(path)
    verify_files(path, manifest, True, cache)
    _read_config(path)
    _check_tokenizer_files(path, manifest)
    for fname in (QUANT_FILE, DENSE_FILE):
        tensors = _Tensors(path / fname)
        try:
            if fname == QUANT_FILE:
                by_layer = _layer_parts(tensors, manifest["layers"])
                for name, meta in manifest["layers"].items():
                    _check_layer_tensors(name, meta, by_layer.get(name, []), tensors)
        finally:
            tensors.close()
    return manifest


def _check_tokenizer_files(path: Path, manifest: dict[str, Any]) -> bool:
    """Whether the checkpoint has a tokenizer; one without tokenizer.json is an error, as lowbit
    saves fast tokenizers only and transformers would otherwise look for other formats."""
    files = manifest["files"]
    if not any(n.startswith("tokenizer") or n == "special_tokens_map.json" for n in files):
        return False
    if TOKENIZER_FILE not in files:
        raise CheckpointError(f"{path}: the manifest lists tokenizer files but not {TOKENIZER_FILE}; the "
                              "checkpoint is incomplete, re-run `lowbit quantize`")
    return True


def load_checkpoint(path: str | os.PathLike, dtype: torch.dtype | None = None, verify: bool | str = True,
                    runtime: str = "reference", int8_activations: bool = False) -> LoadedCheckpoint:
    """Rebuild the quantized model. `dtype` converts the dense tensors (default: as saved).

    Nothing in the folder is parsed before it is checked: first the manifest's structure, then that
    the folder holds exactly the files it lists (verify_files), then their sizes and, with `verify`,
    their sha256; then config.json (without its quantization_config, with no code from the folder),
    each tensor file's header (dtypes, shapes and byte ranges) and every layer's tensor shapes,
    and only then is anything allocated.

    `verify`: True checks every file's size and sha256 against the manifest, the hash taken from
    a stamp in lowbit's cache (paths.cache_dir) when the file is unchanged since it was last
    hashed (same size and modification time); "full" hashes every file regardless; False checks
    sizes only.

    runtime "reference": every quantized layer a QuantLinear (one byte per code, dequantize then
    matmul). "packed": a PackedLinear built straight from the stored packed codes (runtime/packed.py,
    the native kernels), tensor by tensor, so peak memory stays near the packed model's size.
    `int8_activations` (packed only): activations quantized per token and integer products
    (runtime/w8a8.py): 8-bit per-channel symmetric layers run as W8A8Linear (oneDNN int8 GEMM),
    4-bit Integer Scale layers as W4A8Linear (VNNI kernel); other formats are refused.
    """
    if runtime not in RUNTIMES:
        raise CheckpointError(f"runtime {runtime!r}: choose one of {', '.join(RUNTIMES)}")
    if verify not in (True, False, "full"):
        raise ConfigError(f"verify={verify!r}: use True (hashes, remembered while files are unchanged), "
                          "'full' (hash every file) or False (sizes only)")
    if int8_activations and runtime != "packed":
        raise CheckpointError("int8 activations run in the packed runtime; load with runtime='packed'")
    path = Path(path)
    manifest = read_manifest(path)
    verify_files(path, manifest, hashes=bool(verify), cache=None if verify == "full" else cache_dir())
    config = _read_config(path)
    # the tokenizer in a thread beside the weights: transformers parses tokenizer.json in Python
    # (about a second for a 150k vocabulary) while the loop below mostly waits on reads and copies
    # that let go of the GIL
    tokenizer = _Background(_read_tokenizer, path) if _check_tokenizer_files(path, manifest) else None
    quant = _Tensors(path / QUANT_FILE)
    dense = None
    try:
        dense = _Tensors(path / DENSE_FILE)
        model = _build(path, manifest, config, quant, dense, dtype or getattr(torch, manifest["dtype"]),
                       runtime, int8_activations)
    finally:
        quant.close()
        if dense is not None:
            dense.close()
    if tokenizer is not None:
        tokenizer = tokenizer.result()
    release_freed_memory()
    return LoadedCheckpoint(model, tokenizer, manifest, path)


def _build(path: Path, manifest: dict[str, Any], config: Any, quant: _Tensors, dense: _Tensors, dtype: torch.dtype,
           runtime: str, int8_activations: bool) -> nn.Module:
    """load_checkpoint's model from checked files: the empty model from `config`, its shapes
    checked against the manifest and both headers, then filled tensor by tensor."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    if runtime == "packed":
        from lowbit.runtime import w8a8
        from lowbit.runtime.packed import PackedLinear, kernels_fit
        from lowbit.runtime.w8a8 import W4A8Linear, W8A8Linear
    try:
        with init_empty_weights(include_buffers=False):
            model = AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=False)
    except ValueError as e:  # an architecture with no causal-LM class
        raise CheckpointError(f"{path / CONFIG_FILE}: transformers cannot build a causal language model from "
                              f"it ({e})") from None
    layers = manifest["layers"]
    by_layer = _layer_parts(quant, layers)
    for name, meta in layers.items():
        _check_layer_tensors(name, meta, by_layer.get(name, []), quant)
    _check_against_model(model, layers, dense, path)
    float_layers: list[str] = []  # int8_activations: layers whose format has no integer path
    reference_layers: list[str] = []  # packed runtime: layers whose groups the kernels cannot run
    # packed runtime: the codes of projections that will share one decode GEMV (runtime/packed.py:
    # fuse_projections) are read into one buffer, so fusing them later copies nothing
    into = _fusion_buffers(layers, by_layer, quant) if runtime == "packed" and not int8_activations else {}
    for name, meta in layers.items():
        fmt = QuantFormat.from_dict(meta)
        parts = {p: quant.get(f"{name}.{p}", out=into.get(name) if p == "codes" else None)
                 for p in by_layer.get(name, []) if _PART.fullmatch(p)}
        bias = quant.get(f"{name}.bias") if "bias" in by_layer.get(name, []) else None
        shape = tuple(meta["shape"])
        try:
            if runtime == "packed" and not kernels_fit(fmt, shape[1]):
                layer = QuantLinear.from_quantized(QuantizedWeight.from_packed(parts, fmt, shape), bias, dtype=dtype)
                reference_layers.append(name)
            elif int8_activations:
                qw = QuantizedWeight.from_packed(parts, fmt, shape)
                if w8a8.supports_w4a8(qw):
                    layer = W4A8Linear(qw, bias)
                elif w8a8.supports(qw):
                    layer = W8A8Linear(qw, bias)
                else:  # e.g. an 8-bit group-wise output head: stays on the weight-only kernels
                    layer = PackedLinear(qw, bias)
                    float_layers.append(name)
            elif runtime == "packed":
                layer = PackedLinear.from_packed(parts, fmt, shape, bias)
                if layer.bias is not None:
                    layer.bias.data = layer.bias.data.to(dtype)
            else:
                layer = QuantLinear.from_quantized(QuantizedWeight.from_packed(parts, fmt, shape), bias, dtype=dtype)
        except ConfigError as e:  # a runtime that cannot run this layer's format
            raise CheckpointError(f"{path}: layer {name}: {e}") from None
        except (KeyError, ValueError, ShapeError) as e:
            raise CheckpointError(f"{path}: layer {name} is inconsistent with its manifest entry ({e})") from None
        model.set_submodule(name, layer)
    if int8_activations and len(float_layers) == len(layers):
        raise CheckpointError(
            f"{path}: int8 activations need 8-bit per-channel symmetric layers (W8A8) or 4-bit layers with "
            "integer scales (W4A8, --integer-scale 8); this checkpoint has neither. Quantize with --bits 8 "
            "--group-size -1 --sym or --bits 4 --integer-scale 8, or run without --activations int8")
    if reference_layers:
        log.warning("%d layer(s) have groups the packed kernels cannot run (a multiple of 8 columns that tiles "
                    "the input is needed) and run on the slower reference path: %s", len(reference_layers),
                    ", ".join(reference_layers[:4]) + (" ..." if len(reference_layers) > 4 else ""))
    if float_layers:
        log.warning("%d layer(s) have no int8-activation format and run weight-only: %s", len(float_layers),
                    ", ".join(float_layers[:4]) + (" ..." if len(float_layers) > 4 else ""))
    release_freed_memory()
    # packed runtime: an input embedding that is not the output head stays in the file, mapped
    mapped = _mapped_embedding(model, dense, dtype) if runtime == "packed" else None
    state = {k: dense.get(k, dtype) for k in dense.keys if mapped is None or k != f"{mapped[0]}.weight"}
    model.load_state_dict(state, strict=False, assign=True)
    del state
    model.tie_weights()
    if mapped is not None:
        model.set_submodule(*mapped)
    if runtime == "packed":
        from lowbit.runtime.attention import use_fast_attention

        use_fast_attention(model)  # single-query decode attention without torch's CPU flash kernel
    if runtime == "packed" and not int8_activations:
        from lowbit.runtime.packed import fuse_projections

        fuse_projections(model)  # one decode GEMV for q/k/v and one for gate/up (bfloat16 path)
    still_empty = [n for n, p in model.named_parameters() if p.device.type == "meta"]
    if still_empty:
        raise CheckpointError(f"{path}: no tensors for {still_empty[:5]}; the checkpoint is incomplete")
    model.eval()
    return model
