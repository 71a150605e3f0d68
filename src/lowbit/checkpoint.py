"""Save and load quantized models: safetensors + a JSON manifest, no pickle.

A checkpoint folder holds
    manifest.json           format version, lowbit version, recipe, source model and its sha256,
                            calibration set and seed, per-layer format, sha256 of every tensor file
    quantized.safetensors   per quantized layer: packed codes, float16 scales, packed zeros,
                            optional permutation and bias
    model.safetensors       every other tensor (embeddings, norms, an untied LM head)
    config.json, tokenizer files   so loading needs nothing but this folder
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
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

import lowbit
from lowbit.errors import CheckpointError, ConfigError, ShapeError
from lowbit.models.hashing import external_stamp, sha256_file, stamped_sha256
from lowbit.paths import cache_dir
from lowbit.qtensor import QuantFormat, QuantizedWeight
from lowbit.runtime.qlinear import QuantLinear

log = logging.getLogger(__name__)

FORMAT = "lowbit-checkpoint"
FORMAT_VERSION = 1
# tensors of one quantized layer in quantized.safetensors (bias aside); codes.b<w> / zeros.b<w>
# hold the groups of width w of a mixed-precision layer
_PART = re.compile(r"codes|scales|scale_mult|zeros|perm|group_bits|(codes|zeros)\.b[1-8]")
MANIFEST = "manifest.json"
QUANT_FILE = "quantized.safetensors"
DENSE_FILE = "model.safetensors"


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
    report: str | None = None,
    overwrite: bool = False,
) -> Path:
    """Write the checkpoint atomically: into a temporary folder, then renamed into place.

    `info` goes into the manifest (recipe, source, calibration, stats...).
    """
    out = Path(out_dir)
    if out.exists() and not overwrite:
        raise CheckpointError(f"{out} already exists; choose another -o path or pass --force to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        quant, dense, layers = _split_state(model)
        save_file(quant, tmp / QUANT_FILE, metadata={"format": FORMAT})
        save_file(dense, tmp / DENSE_FILE, metadata={"format": FORMAT})
        cfg = model.config
        cfg.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        manifest = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "lowbit_version": lowbit.__version__,
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
            **info,
            "layers": layers,
            "files": {f: {"bytes": (tmp / f).stat().st_size, "sha256": sha256_file(tmp / f)}
                      for f in (QUANT_FILE, DENSE_FILE)},
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=False) + "\n")
        if report is not None:
            (tmp / "REPORT.md").write_text(report)
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


@dataclass
class LoadedCheckpoint:
    model: nn.Module
    tokenizer: Any
    manifest: dict[str, Any]
    path: Path


def read_manifest(path: str | os.PathLike) -> dict[str, Any]:
    path = Path(path)
    mpath = path / MANIFEST
    if not path.is_dir() or not mpath.is_file():
        raise CheckpointError(f"{path} is not a lowbit checkpoint (no {MANIFEST}); create one with `lowbit quantize`")
    try:
        manifest = json.loads(mpath.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{mpath} is not valid JSON ({e}); the checkpoint is corrupt, re-run `lowbit quantize`") from None
    if manifest.get("format") != FORMAT:
        raise CheckpointError(f"{mpath} is not a lowbit manifest (format={manifest.get('format')!r})")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(
            f"{path}: checkpoint format version {manifest.get('format_version')} is not supported by "
            f"lowbit {lowbit.__version__} (reads version {FORMAT_VERSION})"
        )
    return manifest


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
    """Every file the manifest lists is there with its size and (with `hashes`) its sha256.

    With a `cache` folder, a file's hash is remembered there (models.hashing: a stamp keyed by its
    path, trusted while its size and modification time are unchanged), so a checkpoint loaded
    again is not read twice; without one, every file is hashed."""
    for fname, meta in manifest["files"].items():
        f = path / fname
        if not f.is_file():
            raise CheckpointError(f"{f} is missing; the checkpoint is incomplete, re-run `lowbit quantize`")
        size = f.stat().st_size
        if size != meta["bytes"]:
            raise CheckpointError(
                f"{f} is {size} bytes but the manifest says {meta['bytes']}: the file is truncated or "
                "was replaced; re-run `lowbit quantize` or copy the checkpoint again"
            )
        if not hashes:
            continue
        sha = sha256_file(f) if cache is None else stamped_sha256(f, external_stamp(f, cache))
        if sha != meta["sha256"]:
            raise CheckpointError(
                f"{f} does not match the sha256 in {MANIFEST}: it was modified after saving; "
                "re-run `lowbit quantize` or copy the checkpoint again"
            )


_ST_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "U8": torch.uint8,
              "I8": torch.int8, "I16": torch.int16, "I32": torch.int32, "I64": torch.int64, "BOOL": torch.bool}


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

    def __init__(self, f: Path):
        self.path = f
        try:
            self._fh = open(f, "rb")  # noqa: SIM115 - held open for reads; closed by close()
            n = int.from_bytes(self._fh.read(8), "little")
            if not 0 < n <= f.stat().st_size - 8:
                raise ValueError(f"header length {n} does not fit the file")
            header = json.loads(self._fh.read(n))
        except (OSError, ValueError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{f} could not be read as safetensors ({e}); re-run `lowbit quantize` "
                                  "or copy the checkpoint again") from None
        self._base = 8 + n
        self._meta = {k: v for k, v in header.items() if k != "__metadata__"}
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


def load_checkpoint(path: str | os.PathLike, dtype: torch.dtype | None = None, verify: bool | str = True,
                    runtime: str = "reference", int8_activations: bool = False) -> LoadedCheckpoint:
    """Rebuild the quantized model. `dtype` converts the dense tensors (default: as saved).

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
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    if runtime not in RUNTIMES:
        raise CheckpointError(f"runtime {runtime!r}: choose one of {', '.join(RUNTIMES)}")
    if verify not in (True, False, "full"):
        raise ConfigError(f"verify={verify!r}: use True (hashes, remembered while files are unchanged), "
                          "'full' (hash every file) or False (sizes only)")
    if int8_activations and runtime != "packed":
        raise CheckpointError("int8 activations run in the packed runtime; load with runtime='packed'")
    if runtime == "packed":
        from lowbit.runtime import w8a8
        from lowbit.runtime.packed import PackedLinear
        from lowbit.runtime.w8a8 import W4A8Linear, W8A8Linear
    path = Path(path)
    manifest = read_manifest(path)
    verifier = None
    if verify:  # sizes now; the sha256 of every file in a thread beside the load (hashlib lets go of the GIL)
        verify_files(path, manifest, hashes=False)
        verifier = _Background(verify_files, path, manifest, True, None if verify == "full" else cache_dir())
    quant = _Tensors(path / QUANT_FILE)
    dense = _Tensors(path / DENSE_FILE)
    saved_dtype = getattr(torch, manifest["dtype"])
    dtype = dtype or saved_dtype

    # the tokenizer in a thread beside the weights: transformers parses tokenizer.json in Python
    # (about a second for a 150k vocabulary) while the loop below mostly waits on reads and copies
    # that let go of the GIL
    tokenizer = (_Background(AutoTokenizer.from_pretrained, path)
                 if (path / "tokenizer_config.json").exists() else None)
    config = AutoConfig.from_pretrained(path)
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    float_layers: list[str] = []  # int8_activations: layers whose format has no integer path
    by_layer: dict[str, list[str]] = {}
    for k in quant.keys:
        name, _, part = k.rpartition(".")
        if part.startswith("b") and part[1:].isdigit():  # codes.b3 / zeros.b3
            name, _, kind = name.rpartition(".")
            part = f"{kind}.{part}"
        by_layer.setdefault(name, []).append(part)
    # packed runtime: the codes of projections that will share one decode GEMV (runtime/packed.py:
    # fuse_projections) are read into one buffer, so fusing them later copies nothing
    into = _fusion_buffers(manifest["layers"], by_layer, quant) if runtime == "packed" and not int8_activations else {}
    for name, meta in manifest["layers"].items():
        fmt = QuantFormat.from_dict(meta)
        parts = {p: quant.get(f"{name}.{p}", out=into.get(name) if p == "codes" else None)
                 for p in by_layer.get(name, []) if _PART.fullmatch(p)}
        bias = quant.get(f"{name}.bias") if "bias" in by_layer.get(name, []) else None
        shape = tuple(meta["shape"])
        try:
            if int8_activations:
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
    if int8_activations and len(float_layers) == len(manifest["layers"]):
        raise CheckpointError(
            f"{path}: int8 activations need 8-bit per-channel symmetric layers (W8A8) or 4-bit layers with "
            "integer scales (W4A8, --integer-scale 8); this checkpoint has neither. Quantize with --bits 8 "
            "--group-size -1 --sym or --bits 4 --integer-scale 8, or run without --activations int8")
    if float_layers:
        log.warning("%d layer(s) have no int8-activation format and run weight-only: %s", len(float_layers),
                    ", ".join(float_layers[:4]) + (" ..." if len(float_layers) > 4 else ""))
    release_freed_memory()
    # packed runtime: an input embedding that is not the output head stays in the file, mapped
    mapped = _mapped_embedding(model, dense, dtype) if runtime == "packed" else None
    state = {k: dense.get(k, dtype) for k in dense.keys if mapped is None or k != f"{mapped[0]}.weight"}
    quant.close()
    dense.close()
    result = model.load_state_dict(state, strict=False, assign=True)
    del state
    if result.unexpected_keys:
        raise CheckpointError(f"{path}: tensors {result.unexpected_keys[:5]} do not belong to the model")
    model.tie_weights()
    if mapped is not None:
        model.set_submodule(*mapped)
    if verifier is not None:
        verifier.result()  # a mismatch raises here, before the model is handed out
    if tokenizer is not None:
        tokenizer = tokenizer.result()
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
    release_freed_memory()
    return LoadedCheckpoint(model, tokenizer, manifest, path)


def is_checkpoint(path: str | os.PathLike) -> bool:
    return (Path(path) / MANIFEST).is_file()
