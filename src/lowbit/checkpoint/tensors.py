"""The bounded safetensors reader a checkpoint is loaded with: every header checked (known dtypes,
shapes that fill their byte ranges, ranges inside the file and apart) before anything it claims
is allocated, then one tensor read at a time; and write_tensors, which writes one tensor at a
time the very bytes safetensors' save_file writes."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lowbit.errors import CheckpointError


def _is_int(x: Any) -> bool:
    return type(x) is int  # bool is an int subclass, never a size


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

    def meta(self, key: str) -> torch.Tensor:
        """The tensor `key` on the meta device: its shape and dtype, nothing read or allocated."""
        meta = self._meta[key]
        return torch.empty(meta["shape"], dtype=_ST_DTYPES[meta["dtype"]], device="meta")

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


# safetensors' own save_file lays tensors out by dtype in this order, then by name; the header is
# compact JSON ("__metadata__" first, then the tensors in file order) padded with spaces to a
# multiple of 8 bytes. write_tensors follows it, so its files are byte-identical to save_file's
# (tests/checkpoint/test_tensors.py holds it to that).
_FILE_ORDER = ("I64", "F64", "F32", "I32", "BF16", "F16", "I16", "I8", "U8", "BOOL")
_ST_NAMES = {**{dtype: name for name, dtype in _ST_DTYPES.items()}, torch.float64: "F64"}


def write_tensors(path: Path, layout: Mapping[str, torch.Tensor], read: Callable[[str], torch.Tensor],
                  metadata: dict[str, str] | None = None) -> None:
    """Write a safetensors file of the tensors `layout` describes ({name: a tensor of its dtype and
    shape, on the meta device or not}), each one's data asked of `read(name)` only when it is
    written: the file is written with one tensor in memory at a time. safetensors' save_file
    holds every tensor and a bytes copy of each at once (twice a checkpoint's size)."""
    unknown = sorted(k for k, t in layout.items() if t.dtype not in _ST_NAMES)
    if unknown:
        raise ValueError(f"{unknown[0]}: dtype {layout[unknown[0]].dtype} has no safetensors name here")
    order = sorted(layout, key=lambda k: (_FILE_ORDER.index(_ST_NAMES[layout[k].dtype]), k))
    header: dict[str, Any] = {"__metadata__": dict(metadata)} if metadata else {}
    offset = 0
    for k in order:
        t = layout[k]
        n = t.numel() * t.element_size()
        header[k] = {"dtype": _ST_NAMES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(len(raw).to_bytes(8, "little"))
        f.write(raw)
        for k in order:
            t = read(k)
            if t.dtype != layout[k].dtype or t.shape != layout[k].shape:
                raise ValueError(f"{k}: read a {t.dtype} {tuple(t.shape)} tensor, the layout says "
                                 f"{layout[k].dtype} {tuple(layout[k].shape)}")
            f.write(memoryview(t.detach().contiguous().reshape(-1).view(torch.uint8).numpy()))


@dataclass(frozen=True)
class LazyTensors:
    """Tensors known by their layout ({name: tensor of their dtype and shape, e.g. on the meta
    device}) and read one at a time by `read(name)`: what write_tensors writes from without
    holding them all."""

    layout: Mapping[str, torch.Tensor]
    read: Callable[[str], torch.Tensor]

    @classmethod
    def of(cls, tensors: Mapping[str, torch.Tensor]) -> LazyTensors:
        """Tensors already in memory."""
        return cls(tensors, tensors.__getitem__)

    def with_tensors(self, more: Mapping[str, torch.Tensor]) -> LazyTensors:
        """These tensors and `more` (in memory) together."""
        return LazyTensors({**self.layout, **more}, lambda k: more[k] if k in more else self.read(k))
