"""Read and check a GGUF file's header before anything else parses it.

A GGUF file is: magic "GGUF", version (u32), tensor count (u64), metadata count (u64), the
metadata (key string, value type u32, value), the tensor infos (name, n_dims u32, dims u64 each,
type u32, offset u64), padding to `general.alignment` (default 32), then the tensor data. Every
length is checked against the file's size as it is read, so a truncated or garbled file gives one
clear error and never a huge allocation; the header must also agree with its tensors: each
tensor's data lies inside the file, and the blocks `blk.N.*` present are exactly 0 ..
`<arch>.block_count` - 1.
"""

from __future__ import annotations

import mmap
import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from lowbit.errors import ConfigError

MAGIC = b"GGUF"
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9
_BLOCK = re.compile(r"blk\.(\d+)\.")


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]
    type: int     # GGMLQuantizationType value
    offset: int   # from the start of the tensor data
    nbytes: int


@dataclass(frozen=True)
class GGUFHeader:
    version: int
    metadata: dict[str, Any]  # scalars and strings as values; an array as ("array", length)
    tensors: list[TensorInfo]
    data_start: int


class _Damaged(Exception):
    """The header cannot be read; the message says where and why."""


class _Cursor:
    def __init__(self, buf: mmap.mmap | bytes) -> None:
        self.buf, self.pos = buf, 0

    def take(self, n: int, what: str) -> int:
        """Advance past n bytes; returns where they start."""
        if n < 0 or self.pos + n > len(self.buf):
            raise _Damaged(f"{what} at byte {self.pos} needs {n} bytes but the file has {len(self.buf) - self.pos} left")
        start, self.pos = self.pos, self.pos + n
        return start

    def scalar(self, fmt: str, what: str) -> Any:
        return struct.unpack_from(fmt, self.buf, self.take(struct.calcsize(fmt), what))[0]

    def string(self, what: str) -> str:
        n = self.scalar("<Q", f"length of {what}")
        start = self.take(n, what)
        try:
            return bytes(self.buf[start : start + n]).decode("utf-8")
        except UnicodeDecodeError:
            raise _Damaged(f"{what} at byte {start} is not UTF-8 text") from None

    def value(self, vtype: int, what: str, depth: int = 0) -> Any:
        if vtype in _SCALARS:
            return self.scalar(_SCALARS[vtype], what)
        if vtype == _STRING:
            return self.string(what)
        if vtype == _ARRAY and depth == 0:
            etype = self.scalar("<I", f"element type of {what}")
            count = self.scalar("<Q", f"length of {what}")
            if etype in _SCALARS:  # skipped in one step, bounds-checked
                self.take(count * struct.calcsize(_SCALARS[etype]), what)
            elif etype == _STRING:
                if count * 8 > len(self.buf) - self.pos:  # each string takes at least 8 bytes
                    raise _Damaged(f"{what} claims {count} strings, more than the file could hold")
                for _ in range(count):
                    self.string(f"an element of {what}")
            else:
                raise _Damaged(f"{what} has unsupported element type {etype}")
            return ("array", count)
        raise _Damaged(f"{what} has unknown value type {vtype}")


def read_gguf_header(path: Path) -> GGUFHeader:
    """The header of the GGUF file at `path`; ConfigError naming the file when it is not one."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            size = path.stat().st_size
            if size < 24:
                raise _Damaged(f"it is {size} bytes long, shorter than a GGUF header")
            with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
                return _parse(_Cursor(buf))
    except _Damaged as e:
        raise ConfigError(f"{path} is not a valid GGUF file: {e}. It is truncated or damaged; download or "
                          "export it again (and compare its sha256 with the publisher's)") from None
    except OSError as e:
        raise ConfigError(f"cannot read {path}: {e}") from None


def _parse(c: _Cursor) -> GGUFHeader:
    if bytes(c.buf[:4]) != MAGIC:
        raise _Damaged(f"it starts with {bytes(c.buf[:4])!r}, not the GGUF magic {MAGIC!r}")
    c.take(4, "magic")
    version = c.scalar("<I", "version")
    if version not in (2, 3):
        raise _Damaged(f"its version is {version}; lowbit reads GGUF versions 2 and 3")
    n_tensors = c.scalar("<Q", "tensor count")
    n_kv = c.scalar("<Q", "metadata count")
    left = len(c.buf) - c.pos
    if n_kv * 12 > left or n_tensors * 24 > left:  # smallest possible entries
        raise _Damaged(f"its header claims {n_kv} metadata entries and {n_tensors} tensors, more than "
                       f"its {len(c.buf)} bytes could hold")
    metadata: dict[str, Any] = {}
    for i in range(n_kv):
        key = c.string(f"metadata key {i}")
        vtype = c.scalar("<I", f"type of metadata {key!r}")
        metadata[key] = c.value(vtype, f"metadata {key!r}")
    infos = []
    for i in range(n_tensors):
        name = c.string(f"name of tensor {i}")
        n_dims = c.scalar("<I", f"dimension count of tensor {name!r}")
        if not 1 <= n_dims <= 4:
            raise _Damaged(f"tensor {name!r} has {n_dims} dimensions")
        shape = tuple(c.scalar("<Q", f"a dimension of tensor {name!r}") for _ in range(n_dims))
        ttype = c.scalar("<I", f"type of tensor {name!r}")
        offset = c.scalar("<Q", f"data offset of tensor {name!r}")
        infos.append((name, shape, ttype, offset))
    alignment = metadata.get("general.alignment", 32)
    if not isinstance(alignment, int) or alignment < 1:
        raise _Damaged(f"its general.alignment is {alignment!r}")
    data_start = -(-c.pos // alignment) * alignment
    tensors = []
    for name, shape, ttype, offset in infos:
        try:
            block, type_size = GGML_QUANT_SIZES[GGMLQuantizationType(ttype)]
        except (ValueError, KeyError):
            raise _Damaged(f"tensor {name!r} has unknown type {ttype}") from None
        n = 1
        for d in shape:
            n *= d
        if n % block:
            raise _Damaged(f"tensor {name!r} of shape {shape} is not a whole number of {block}-value blocks")
        nbytes = n // block * type_size
        if data_start + offset + nbytes > len(c.buf):
            raise _Damaged(f"tensor {name!r} ({nbytes} bytes at offset {offset}) ends past the end of the file "
                           f"({len(c.buf)} bytes)")
        tensors.append(TensorInfo(name, shape, ttype, offset, nbytes))
    return GGUFHeader(version, metadata, tensors, data_start)


def check_gguf(path: Path) -> GGUFHeader:
    """read_gguf_header, then refuse a header that disagrees with the tensors present."""
    header = read_gguf_header(path)
    arch = header.metadata.get("general.architecture")
    if not isinstance(arch, str):
        raise ConfigError(f"{path} has no general.architecture in its header; it is not a model GGUF file")
    count = header.metadata.get(f"{arch}.block_count")
    if count is not None:
        present = {int(m.group(1)) for t in header.tensors if (m := _BLOCK.match(t.name))}
        plausible = isinstance(count, int) and 0 <= count <= len(header.tensors)
        if not plausible or present != set(range(count)):
            missing = sorted(set(range(count)) - present) if plausible else []
            detail = f"blocks {_ranges(missing)} have no tensors" if missing else \
                f"it holds tensors for blocks {_ranges(sorted(present))}"
            raise ConfigError(
                f"{path}: its header says {arch}.block_count = {count!r}, but {detail}. The file is incomplete or "
                "its header was changed; lowbit will not fill the gaps with random weights. Use a complete copy"
            )
    return header


def _ranges(ids: list[int]) -> str:
    """[0, 1, 2, 5] -> '0-2, 5'."""
    out: list[list[int]] = []
    for i in ids:
        if out and out[-1][1] == i - 1:
            out[-1][1] = i
        else:
            out.append([i, i])
    return ", ".join(f"{a}" if a == b else f"{a}-{b}" for a, b in out) or "none"
