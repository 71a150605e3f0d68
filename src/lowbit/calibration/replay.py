"""Skip the parts of a block's forward pass that a calibration pass already computed.

Calibrating a block "true sequentially" runs its calibration samples through it once per group
of linear layers (q/k/v, o, gate/up, down) and once more at the end, each time after more layers
are quantized. Most of that is repeated work: once q/k/v and o are quantized, the attention
sub-module gives the same output in every later pass (its input, the block's input through the
norm, does not change either), yet the gate/up pass, the down pass and the final forward each
compute it again, attention scores included.

ChildReplay keeps, per batch, the output of each direct child of the block (self_attn, mlp, ...)
that can no longer change, and returns it in later passes instead of running the child. A child's
output is final once no layer still to be quantized lies in it or in any child called before it
in that pass: a child is a function of the block's input and the outputs of the children called
before it, and nothing but the quantized layers changes a block while it is calibrated. Only
children holding a linear layer are kept (norms cost less to recompute than to store); on a
Llama-style block that is the attention output, one tensor the size of the block's input.

Replayed outputs are the very tensors the child returned for the same batch, so a job with
replay gives bit-identical records to one without (tests/calibration/test_replay.py).
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

from torch import nn


class ChildReplay:
    """The final outputs of `block`'s children, per batch index; `pending` are the layer names
    (relative to the block) still to be quantized."""

    def __init__(self, block: nn.Module, pending: Iterable[str]):
        self.block = block
        self.pending = set(pending)
        self._linears = {name: {f"{name}.{sub}" for sub, m in child.named_modules() if isinstance(m, nn.Linear)}
                         for name, child in block.named_children()}
        self.outputs: dict[str, dict[int, Any]] = {}  # child -> batch index -> what its forward returned
        self.batch = 0
        self._called: list[str] = []
        self._n_batches: int | None = None

    def quantized(self, names: Iterable[str]) -> None:
        """Layers `names` are quantized: they no longer make their children's outputs provisional."""
        self.pending -= set(names)

    def _final(self, child: str) -> bool:
        return not (self._linears[child] & self.pending)

    def _kept(self, child: str) -> bool:
        return self._n_batches is not None and len(self.outputs.get(child, {})) == self._n_batches

    @contextmanager
    def active(self, n_batches: int) -> Iterator[None]:
        """Within this context, children whose outputs are kept for all `n_batches` batches are
        replayed; the others run, and their outputs are kept when final. Call start(j) before
        running batch j."""
        self._n_batches = n_batches
        handles, patched = [], []
        for name, child in self.block.named_children():
            handles.append(child.register_forward_pre_hook(functools.partial(self._before, name)))
            if self._linears[name]:
                handles.append(child.register_forward_hook(functools.partial(self._after, name)))
            if self._kept(name):
                child.forward = functools.partial(self._replayed, name)
                patched.append(child)
        try:
            yield
        finally:
            for h in handles:
                h.remove()
            for child in patched:
                del child.forward

    def start(self, batch: int) -> None:
        self.batch = batch
        self._called.clear()

    def _before(self, name: str, module: nn.Module, args: tuple) -> None:
        self._called.append(name)

    def _after(self, name: str, module: nn.Module, args: tuple, output: Any) -> None:
        if not self._kept(name) and all(self._final(c) for c in self._called):
            self.outputs.setdefault(name, {})[self.batch] = output

    def _replayed(self, name: str, *args: Any, **kwargs: Any) -> Any:
        return self.outputs[name][self.batch]
