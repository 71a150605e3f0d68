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

Tails: when a child's only unquantized layer L is the one whose input a pass collects (o_proj in
the attention, down_proj in the MLP), that input is kept too (within `tail_bytes`). Once L is
quantized, the child's output is L's output on the kept input if L is the child's last step; that
is checked on the first batch of the next pass (the child runs in full and the two must be equal),
and the other batches then run L alone. That spares the next pass the attention scores (o_proj)
or the gate and up projections (down_proj).

Lean (`lean=True`, the streamed job): once a tail stands in for its child, the child's output is
not kept as well when it is no smaller than the tail (the attention's output and o_proj's input
are the same size): the later passes run the tail's layer again instead, and one tensor the size
of the block's inputs is held instead of two.

Replayed outputs are the very tensors the child returned for the same batch, and a tail runs the
same layer on the same input with the same batch shape, so a job with replay gives bit-identical
records to one without (tests/calibration/test_replay.py).
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn


class ChildReplay:
    """The final outputs of `block`'s children, per batch index; `pending` are the layer names
    (relative to the block) still to be quantized; at most `tail_bytes` of layer inputs are kept
    as tails."""

    def __init__(self, block: nn.Module, pending: Iterable[str], tail_bytes: float = 0.0, lean: bool = False):
        self.block = block
        self.pending = set(pending)
        self.tail_bytes = tail_bytes
        self.lean = lean
        self._linears = {name: {f"{name}.{sub}" for sub, m in child.named_modules() if isinstance(m, nn.Linear)}
                         for name, child in block.named_children()}
        self.outputs: dict[str, dict[int, Any]] = {}  # child -> batch index -> what its forward returned
        self.tails: dict[str, tuple[str, dict[int, torch.Tensor]]] = {}  # child -> (its last layer, inputs)
        self._tail_ok: dict[str, bool] = {}
        self._rest: dict[str, tuple | None] = {}  # child -> the rest of its tuple output (None: not a tuple)
        self._keep = True
        self.batch = 0
        self._called: list[str] = []
        self._n_batches: int | None = None
        self._patched: list[nn.Module] = []

    def quantized(self, names: Iterable[str]) -> None:
        """Layers `names` are quantized: they no longer make their children's outputs provisional."""
        self.pending -= set(names)

    def _final(self, child: str) -> bool:
        return not (self._linears[child] & self.pending)

    def _complete(self, per_batch: dict[int, Any]) -> bool:
        return self._n_batches is not None and len(per_batch) == self._n_batches

    def _kept(self, child: str) -> bool:
        return self._complete(self.outputs.get(child, {}))

    def _tail_ready(self, child: str) -> bool:
        return child in self.tails and self._complete(self.tails[child][1]) and self._final(child)

    @contextmanager
    def active(self, n_batches: int, keep: bool = True) -> Iterator[None]:
        """Within this context, children whose outputs are kept for all `n_batches` batches are
        replayed; the others run, and their outputs are kept when final (unless not `keep`: the
        last pass). Call start(j) before running batch j."""
        self._n_batches, self._keep = n_batches, keep
        handles = []
        for name, child in self.block.named_children():
            handles.append(child.register_forward_pre_hook(functools.partial(self._before, name)))
            if not self._linears[name]:
                continue
            handles.append(child.register_forward_hook(functools.partial(self._after, name)))
            if self._kept(name):
                self._patch(child, self._replayed, name)
            elif self._tail_ready(name) and self._tail_ok.get(name):
                self._patch(child, self._from_tail, name)
            pending = self._linears[name] & self.pending
            if len(pending) == 1 and self.tail_bytes > 0 and not self._all_tails_gone(name):
                layer = next(iter(pending))
                handles.append(self.block.get_submodule(layer).register_forward_pre_hook(
                    functools.partial(self._keep_input, name, layer), prepend=True))
        try:
            yield
        finally:
            for h in handles:
                h.remove()
            for child in self._patched:
                del child.forward
            self._patched.clear()

    def _all_tails_gone(self, child: str) -> bool:
        return self._kept(child) or self._tail_ok.get(child) is False

    def _patch(self, child: nn.Module, fn, name: str) -> None:
        child.forward = functools.partial(fn, name)
        self._patched.append(child)

    def start(self, batch: int) -> None:
        self.batch = batch
        self._called.clear()

    def _before(self, name: str, module: nn.Module, args: tuple) -> None:
        self._called.append(name)

    def _after(self, name: str, module: nn.Module, args: tuple, output: Any) -> None:
        if self._kept(name) or not all(self._final(c) for c in self._called):
            return
        if self._tail_ready(name) and name not in self._tail_ok:
            # the first batch ran in full: the tail stands in for the child if it gives the same
            self._rest[name] = output[1:] if isinstance(output, tuple) else None
            self._tail_ok[name] = _same(output, self._from_tail(name))
            if self._tail_ok[name]:
                self._patch(module, self._from_tail, name)
        tail_instead = self.lean and self._tail_ok.get(name) and self._tail_no_larger(name, output)
        if self._keep and not tail_instead:
            self.outputs.setdefault(name, {})[self.batch] = output
        if self._kept(name) or (self._tail_ok.get(name) and self.batch == self._n_batches - 1 and not tail_instead):
            self.tails.pop(name, None)

    def _tail_no_larger(self, name: str, output: Any) -> bool:
        y = output[0] if isinstance(output, tuple) else output
        return _nbytes(self.tails[name][1][self.batch]) <= _nbytes(y)

    def _keep_input(self, child: str, layer: str, module: nn.Module, args: tuple) -> None:
        if self._tail_ok.get(child) is False:
            return
        kept = self.tails.setdefault(child, (layer, {}))[1]
        x = args[0]
        if not kept and x.numel() * x.element_size() * self._n_batches > self._room():
            self.tails.pop(child)
            self._tail_ok[child] = False
            return
        kept[self.batch] = x

    def _room(self) -> float:
        return self.tail_bytes - sum(_nbytes(t) for _, kept in self.tails.values() for t in kept.values())

    def _replayed(self, name: str, *args: Any, **kwargs: Any) -> Any:
        return self.outputs[name][self.batch]

    def _from_tail(self, name: str, *args: Any, **kwargs: Any) -> Any:
        """The child's output as its last layer's output on the kept input (the rest of a tuple
        output, e.g. attention weights, as the first batch's)."""
        layer, kept = self.tails[name]
        y = self.block.get_submodule(layer)(kept[self.batch])
        rest = self._rest[name]
        return y if rest is None else (y, *rest)


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _same(full: Any, tail: Any) -> bool:
    """Whether the child's full output and the tail's are the same: equal tensors, and a tuple's
    other members no tensors (the tail copies them from the first batch)."""
    if isinstance(full, tuple):
        return (isinstance(tail, tuple) and len(full) == len(tail) and torch.equal(full[0], tail[0])
                and not any(isinstance(t, torch.Tensor) for t in full[1:]))
    return isinstance(full, torch.Tensor) and torch.equal(full, tail)
