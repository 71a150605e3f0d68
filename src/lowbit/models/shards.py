"""The weights of a Hugging Face model folder, written into safetensors shards as the tensors come.

    shards = ShardWriter(folder, max_bytes=1 << 30)
    shards.make_room(nbytes)      # before making a tensor of nbytes: writes out what is held if need be
    shards.add(name, tensor)      # held until its shard is full
    weight_map = shards.finish()  # model.safetensors, or model-0000i-of-0000n.safetensors + the index

At most one shard's tensors are held at a time: a shard is written (safetensors' save_file) as soon
as the next tensor would take it past `max_bytes`; a tensor bigger than that gets a shard of its
own. The layout is the one `save_pretrained` writes and `from_pretrained` (and weights.py) read: a
single model.safetensors when everything fits in one shard, otherwise numbered shards and
model.safetensors.index.json with `metadata.total_size` (bytes of all tensors) and `weight_map`
(tensor name -> shard file).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from lowbit.models.weights import INDEX, SINGLE


def _nbytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


class ShardWriter:
    """Safetensors shards of at most `max_bytes` each (but for a single bigger tensor) in `folder`."""

    def __init__(self, folder: str | Path, max_bytes: int):
        if max_bytes <= 0:
            raise ValueError(f"max_bytes must be positive, got {max_bytes}")
        self.folder = Path(folder)
        self.max_bytes = max_bytes
        self._held: dict[str, torch.Tensor] = {}
        self._held_bytes = 0
        self._written: list[tuple[Path, list[str]]] = []  # (file under a provisional name, its tensors)
        self.total_bytes = 0

    def make_room(self, nbytes: int) -> None:
        """Write out the tensors held if `nbytes` more would take their shard past max_bytes."""
        if self._held and self._held_bytes + nbytes > self.max_bytes:
            self._write_held()

    def add(self, name: str, tensor: torch.Tensor) -> None:
        """Hold `tensor` for the shard being filled (written once it is full, or by finish)."""
        if name in self._held or any(name in names for _, names in self._written):
            raise ValueError(f"tensor {name} was added twice")
        nbytes = _nbytes(tensor)
        self.make_room(nbytes)
        self._held[name] = tensor.contiguous()
        self._held_bytes += nbytes
        self.total_bytes += nbytes

    def finish(self) -> dict[str, str]:
        """Write what is held, give the shards their final names (and write the index when there
        are several); returns {tensor name: shard file name}."""
        if self._held or not self._written:
            self._write_held()
        n = len(self._written)
        weight_map = {}
        for i, (path, names) in enumerate(self._written, start=1):
            final = SINGLE if n == 1 else f"model-{i:05d}-of-{n:05d}.safetensors"
            path.rename(self.folder / final)
            weight_map.update(dict.fromkeys(names, final))
        if n > 1:
            index = {"metadata": {"total_size": self.total_bytes}, "weight_map": weight_map}
            (self.folder / INDEX).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
        return weight_map

    def _write_held(self) -> None:
        path = self.folder / f".shard-{len(self._written) + 1:05d}.safetensors.part"
        save_file(self._held, path, metadata={"format": "pt"})
        self._written.append((path, list(self._held)))
        self._held = {}
        self._held_bytes = 0
