"""A model's weights read from its safetensors folder one tensor at a time, for streamed jobs.

    weights = FolderWeights(folder)           # every shard's header checked, nothing else read
    w = weights.get("model.layers.3.mlp.up_proj.weight", torch.float32)

The folder is a Hugging Face one: model.safetensors, or shards listed by
model.safetensors.index.json. Shards are read with safetensors' safe_open (memory-mapped while a
group of tensors is read, unmapped after), and every shard's header is checked against the file's
size when the folder is opened, so a missing or truncated shard is refused, by name, before any
work.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Protocol

import torch
from safetensors import SafetensorError, safe_open

from lowbit.errors import ConfigError

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"


class NamedTensors(Protocol):
    """Where a streamed job reads a model's tensors from, by parameter name: FolderWeights, or an
    open checkpoint's (checkpoint/dequantized.py)."""

    def __contains__(self, name: str) -> bool: ...

    def shape(self, name: str) -> tuple[int, ...]: ...

    def get_many(self, names: Iterable[str], dtype: torch.dtype) -> dict[str, torch.Tensor]: ...


class FolderWeights:
    """The tensors of a safetensors model folder, by name, read on demand."""

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)
        self._where: dict[str, str] = {}  # tensor name -> shard file name
        self._shapes: dict[str, tuple[int, ...]] = {}
        for shard, names in self._listed_shards().items():
            with self._open(shard) as handle:
                present = set(handle.keys())
                missing = [n for n in names if n not in present] if names is not None else []
                if missing:
                    raise ConfigError(f"{self.folder / shard}: {INDEX} lists {len(missing)} tensors in this shard "
                                      f"that it does not hold (e.g. {missing[0]}); the shard is from another model or "
                                      "the download is incomplete: download the model again")
                for name in present:
                    self._where[name] = shard
                    self._shapes[name] = tuple(handle.get_slice(name).get_shape())

    def _listed_shards(self) -> dict[str, list[str] | None]:
        """{shard file: the tensors the index puts there (None: whatever it holds)}."""
        index = self.folder / INDEX
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
                if not isinstance(weight_map, dict):
                    raise TypeError("weight_map is not an object")
            except (OSError, ValueError, KeyError, TypeError) as e:
                raise ConfigError(f"{index} is not a readable safetensors index ({e}); download the model "
                                  "again") from None
            shards: dict[str, list[str] | None] = {}
            for name, shard in weight_map.items():
                if not isinstance(shard, str) or Path(shard).name != shard:
                    raise ConfigError(f"{index}: tensor {name} is in {shard!r}, not a file of this folder")
                shards.setdefault(shard, []).append(name)
            return shards
        if (self.folder / SINGLE).is_file():
            return {SINGLE: None}
        raise ConfigError(f"{self.folder} holds neither {SINGLE} nor {INDEX}; streaming reads a safetensors "
                          "model folder (quantize without --stream to load other layouts)")

    def _open(self, shard: str):
        """The shard opened by safe_open (a context manager: leaving it unmaps the file)."""
        path = self.folder / shard
        if not path.is_file():
            raise ConfigError(f"the model's shard {path} is missing; the download is incomplete: download the "
                              "model again")
        try:
            return safe_open(path, framework="pt")
        except (SafetensorError, OSError) as e:
            raise ConfigError(f"the model's shard {path} could not be read as safetensors ({e}): it is truncated "
                              "or damaged; download the model again") from None

    def keys(self) -> Iterable[str]:
        return self._where.keys()

    def __contains__(self, name: str) -> bool:
        return name in self._where

    def shape(self, name: str) -> tuple[int, ...]:
        return self._shapes[name]

    def shard(self, name: str) -> Path:
        return self.folder / self._where[name]

    def get(self, name: str, dtype: torch.dtype) -> torch.Tensor:
        """The tensor `name`, a float tensor converted to `dtype` (an integer one as stored)."""
        return self.get_many([name], dtype)[name]

    def get_many(self, names: Iterable[str], dtype: torch.dtype) -> dict[str, torch.Tensor]:
        """The tensors `names`, as get() gives them, each shard opened once. The shards are mapped
        only while they are read: pages of a mapped file count in the process's resident memory
        until it is unmapped, so a streamed job would otherwise end up holding the whole model.
        Every tensor is therefore a copy: one that viewed the file (a float32 tensor read as
        float32) would keep the whole file mapped as long as it lives, with every page read so far
        resident (a 1.5B model's final norm kept its 0.9 GB of embeddings in the resident size)."""
        by_shard: dict[str, list[str]] = {}
        for name in names:
            if name not in self._where:
                raise ConfigError(f"{self.folder} holds no tensor {name}; the folder does not match its config.json")
            by_shard.setdefault(self._where[name], []).append(name)
        out = {}
        for shard, wanted in by_shard.items():
            try:
                with self._open(shard) as handle:
                    for name in wanted:
                        t = handle.get_tensor(name)  # may be a view of the mapped file: copied
                        out[name] = t.to(dtype, copy=True) if t.is_floating_point() else t.clone()
            except SafetensorError as e:
                raise ConfigError(f"reading the model's shard {self.folder / shard} failed ({e}); the file changed "
                                  "or is damaged: download the model again") from None
        return out
