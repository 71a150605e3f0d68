"""The folder a streamed quantize job writes while it runs, block by block, so it can be resumed.

    -o folder/
      lowbit-partial.json        the progress record (marks.PARTIAL_RECORD): format, the command
                                 that started the job, the job's identity (source sha256, recipe,
                                 dtype, calibration samples' sha256), the number of blocks, and per
                                 finished block its file's size and sha256 and its layers' manifest
                                 entries and reports
      block-00000.safetensors    one finished block: its records' packed parts ("quantized/<name>.<part>")
      block-00001.safetensors    and its other tensors ("dense/<name>"), as split_state splits them
      .lowbit-lock               held (flock: folder_lock) by the process writing the folder

A block file is written under a temporary name, flushed to disk and renamed into place, and only
then added to the record (itself replaced in one rename): a block file the record does not list,
or whose size or sha256 differs from it, is half-written or damaged and is redone, with every
block after it. The folder carries no manifest.json until the job's last step replaces it with
the finished checkpoint (write.py: write_checkpoint), so every reader refuses it as incomplete
(marks.incomplete_message says how to resume).
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from lowbit.checkpoint.tensors import LazyTensors, _Tensors
from lowbit.errors import CheckpointError, ConfigError
from lowbit.marks import (
    PARTIAL_FORMAT,
    PARTIAL_RECORD,
    partial_record,
)
from lowbit.models.hashing import sha256_file
from lowbit.outputs import write_atomically

log = logging.getLogger(__name__)

PARTIAL_VERSION = 1
LOCK_FILE = ".lowbit-lock"
_QUANT, _DENSE = "quantized/", "dense/"


def block_file(i: int) -> str:
    return f"block-{i:05d}.safetensors"


@dataclass
class FinishedBlock:
    """One finished block as the progress record lists it."""

    index: int
    file: str
    bytes: int
    sha256: str
    layers: dict[str, dict[str, Any]]  # {layer name: {"entry": LayerEntry.to_dict(), "report": {...}}}

    def to_dict(self) -> dict[str, Any]:
        return {"index": self.index, "file": self.file, "bytes": self.bytes, "sha256": self.sha256,
                "layers": self.layers}

    @classmethod
    def from_dict(cls, d: Any, where: Path) -> FinishedBlock:
        try:
            block = cls(int(d["index"]), str(d["file"]), int(d["bytes"]), str(d["sha256"]), dict(d["layers"]))
        except (KeyError, TypeError, ValueError) as e:
            raise CheckpointError(f"{where}: a block entry is damaged ({e!r}); start the job again with --force "
                                  "instead of --resume") from None
        if block.file != block_file(block.index):
            raise CheckpointError(f"{where}: block {block.index} names the file {block.file!r}; start the job "
                                  "again with --force instead of --resume")
        return block


class PartialCheckpoint:
    """An unfinished streamed job's folder: what it has finished, and writing the next block."""

    def __init__(self, path: Path, job: dict[str, Any], command: str, n_blocks: int,
                 blocks: list[FinishedBlock] | None = None):
        self.path, self.job, self.command, self.n_blocks = path, job, command, n_blocks
        self.blocks: list[FinishedBlock] = blocks or []

    # ------------------------------------------------------------ starting and resuming
    @classmethod
    def start(cls, path: Path, job: dict[str, Any], command: str, n_blocks: int) -> PartialCheckpoint:
        """A new folder at `path` (which must not exist), recorded as holding no block yet."""
        path.mkdir(parents=True)
        partial = cls(path, job, command, n_blocks)
        partial._write_record()
        return partial

    @classmethod
    def resume(cls, path: Path, job: dict[str, Any], command: str) -> PartialCheckpoint:
        """The folder at `path` as a job identical to `job` left it: its blocks checked in order,
        the first half-written or damaged one and everything after it deleted to be redone.
        Refuses (ConfigError) a folder started by another job. Call it holding folder_lock."""
        record = partial_record(path)
        if record is None:
            raise ConfigError(f"{path} holds no unfinished streamed job ({PARTIAL_RECORD} is missing or damaged); "
                              "run without --resume (with --force to replace what is there)")
        if record.get("version") != PARTIAL_VERSION:
            raise ConfigError(f"{path} was started by a lowbit that records progress as version "
                              f"{record.get('version')!r}, this one reads {PARTIAL_VERSION}; start again with --force")
        differs = _differences(record.get("job"), json.loads(json.dumps(job)))
        if differs:
            raise ConfigError(f"{path} was started by another job ({'; '.join(differs)}); resume it with the command "
                              f"that started it ({record.get('command')}), or start this one over with --force or "
                              "another -o")
        where = path / PARTIAL_RECORD
        blocks = [FinishedBlock.from_dict(b, where) for b in record.get("blocks") or []]
        partial = cls(path, job, command, int(record.get("n_blocks", 0)), [])
        for k, block in enumerate(blocks):
            problem = partial._check_block(block, k)
            if problem is not None:
                log.warning("block %d of %s %s; redoing it and the %d blocks after it", k, path, problem,
                            len(blocks) - k - 1)
                break
            partial.blocks.append(block)
        partial._remove_unlisted()
        partial._write_record()
        return partial

    def _check_block(self, block: FinishedBlock, k: int) -> str | None:
        f = self.path / block.file
        if block.index != k:
            return f"is recorded as block {block.index}"
        if not f.is_file():
            return f"({block.file}) is missing"
        if f.stat().st_size != block.bytes:
            return f"({block.file}) is {f.stat().st_size} bytes, not the {block.bytes} written: it is truncated"
        if sha256_file(f) != block.sha256:
            return f"({block.file}) does not match the sha256 written: it is damaged"
        return None

    def _remove_unlisted(self) -> None:
        """Delete what no finished block accounts for: half-written blocks, temporary files."""
        keep = {b.file for b in self.blocks} | {PARTIAL_RECORD, LOCK_FILE}
        for f in self.path.iterdir():
            if f.name not in keep and f.is_file():
                f.unlink()

    # ------------------------------------------------------------ blocks
    @property
    def n_finished(self) -> int:
        return len(self.blocks)

    def write_block(self, i: int, quant: Mapping[str, torch.Tensor], dense: Mapping[str, torch.Tensor],
                    layers: dict[str, dict[str, Any]]) -> None:
        """Block `i`'s tensors (split_state's quantized parts and dense tensors) written atomically,
        then recorded as finished with its layers' entries and reports."""
        if i != self.n_finished:
            raise ValueError(f"block {i} written after {self.n_finished} finished blocks")
        name = block_file(i)
        tmp = self.path / f".{name}.tmp-{os.getpid()}"
        tensors = {**{_QUANT + k: t.contiguous() for k, t in quant.items()},
                   **{_DENSE + k: t.detach().contiguous() for k, t in dense.items()}}
        try:
            save_file(tensors, tmp, metadata={"format": PARTIAL_FORMAT, "block": str(i)})
            _fsync(tmp)
            sha, size = sha256_file(tmp), tmp.stat().st_size
            os.replace(tmp, self.path / name)
            _fsync(self.path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        self.blocks.append(FinishedBlock(i, name, size, sha, layers))
        self._write_record()

    def read_block(self, i: int) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """Finished block `i`'s (quantized parts, dense tensors), as write_block was given them."""
        block = self.blocks[i]
        tensors = load_file(self.path / block.file)
        quant = {k[len(_QUANT):]: t for k, t in tensors.items() if k.startswith(_QUANT)}
        dense = {k[len(_DENSE):]: t for k, t in tensors.items() if k.startswith(_DENSE)}
        return quant, dense

    @contextmanager
    def joined(self) -> Iterator[tuple[LazyTensors, LazyTensors]]:
        """Every finished block's (quantized parts, dense tensors) together, as LazyTensors read
        one tensor at a time from the block files (plain reads: nothing mapped piles up)."""
        files = [_Tensors(self.path / b.file) for b in self.blocks]
        try:
            where = {key: f for f in files for key in f.keys}

            def part(prefix: str) -> LazyTensors:
                layout = {k[len(prefix):]: f.meta(k) for k, f in where.items() if k.startswith(prefix)}
                return LazyTensors(layout, lambda name: where[prefix + name].get(prefix + name))

            yield part(_QUANT), part(_DENSE)
        finally:
            for f in files:
                f.close()

    def _write_record(self) -> None:
        record = {"format": PARTIAL_FORMAT, "version": PARTIAL_VERSION, "command": self.command, "job": self.job,
                  "n_blocks": self.n_blocks, "blocks": [b.to_dict() for b in self.blocks]}
        write_atomically(self.path / PARTIAL_RECORD, json.dumps(record, indent=1) + "\n")


@contextmanager
def folder_lock(path: Path) -> Iterator[None]:
    """Held while this process writes (or deletes) the unfinished folder `path`; a second process
    is refused, so one run's files are never cleaned away or redone under another."""
    fd = os.open(path / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ConfigError(f"another lowbit process is writing {path}; wait for it to finish or stop it "
                              "first") from None
        yield
    finally:
        os.close(fd)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _differences(recorded: Any, job: dict[str, Any]) -> list[str]:
    """What differs between the job recorded in a folder and this one, field by field."""
    if not isinstance(recorded, dict):
        return ["its record names no job"]
    out = []
    for key in sorted(set(recorded) | set(job)):
        a, b = recorded.get(key), job.get(key)
        if a == b:
            continue
        if isinstance(a, dict) and isinstance(b, dict):
            fields = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
            out.append(f"{key}: " + ", ".join(f"{k} {a.get(k)!r} there, {b.get(k)!r} here" for k in fields[:4]))
        else:
            out.append(f"{key}: {a!r} there, {b!r} here")
    return out
