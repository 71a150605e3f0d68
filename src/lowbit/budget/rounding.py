"""How a budget rounds a layer at a level while it measures and scores (steps 1, 2 and 4-6 of
lowbit.budget): what the layer costs there and the weight it then holds.

Two kinds of level, one interface (option, observe, dequantized):

- AffineRounding: the recipe's affine format at the level (its symmetry and scales), rounded to
  nearest after the clipping search; the search's range factors are kept (ShrinkStore) so that a
  layer is rounded again at a level without searching again.
- BlockRounding: a llama.cpp block type (formats/ggml), rounded by ggml_rtn with the importance
  the final rounding uses: data-free for RTN (so the scored weights are the file's), the diagonal
  of the layer's Hessian for the methods that calibrate (GPTQ fits each block's scales with it).
  A type whose block does not divide a layer's rows is replaced for that layer by the 32-weight
  type llama.cpp stores such rows in (costs.stored_level). The records are kept (compact: at most
  8.5 bits a weight) so that scoring decodes them instead of searching the scales again.
"""

from __future__ import annotations

import torch

from lowbit.algorithms.ggml import ggml_rtn
from lowbit.algorithms.rtn import rtn_quantize, rtn_shrink
from lowbit.budget.costs import stored_level
from lowbit.levels import Level
from lowbit.qtensor import BlockWeight
from lowbit.recipes import Recipe


class ShrinkStore:
    """The clipping search's range factors of each (layer, level), kept so that a layer can be
    re-quantized at a level without searching again (rtn_shrink / rtn_quantize(shrink=...)).
    The factors take few distinct values (the search's grid): stored as one byte each."""

    def __init__(self) -> None:
        self._items: dict[tuple[str, int], tuple[torch.Tensor, torch.Tensor] | None] = {}

    def put(self, name: str, k: int, shrink: torch.Tensor | None) -> None:
        if shrink is None:
            self._items[(name, k)] = None
            return
        values, index = torch.unique(shrink, return_inverse=True)
        self._items[(name, k)] = (values, index.to(torch.uint8)) if len(values) <= 256 else (shrink, None)

    def __contains__(self, key: tuple[str, int]) -> bool:
        return key in self._items

    def get(self, name: str, k: int) -> torch.Tensor | None:
        item = self._items[(name, k)]
        if item is None:
            return None
        values, index = item
        return values if index is None else values[index.long()]


class AffineRounding:
    """Affine levels in the recipe's format, rounded to nearest with its clipping search."""

    def __init__(self, recipe: Recipe, levels: list[Level], shrinks: ShrinkStore | None = None):
        self.recipe, self.levels = recipe, levels
        self.shrinks = shrinks if shrinks is not None else ShrinkStore()

    def option(self, k: int, in_features: int) -> Level:
        """The level a layer this wide holds when given level k."""
        return self.levels[k]

    def observe(self, name: str, hessian: torch.Tensor) -> None:
        """The layer's Hessian, seen once by the sensitivity pass (unused here)."""

    def dequantized(self, name: str, w: torch.Tensor, k: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """w [out, in] rounded at level k, as `dtype`; the clipping search runs once per (layer, level)."""
        fmt = self.recipe.level_format(self.levels[k], w.shape[1])
        clip = self.recipe.clip if self.recipe.clip.enabled else None
        if (name, k) not in self.shrinks:
            self.shrinks.put(name, k, rtn_shrink(w, fmt, clip))
        return rtn_quantize(w, fmt, clip, self.shrinks.get(name, k)).dequantize(dtype)


class BlockRounding:
    """llama.cpp block-type levels, rounded by ggml_rtn; records kept up to `keep_bytes`."""

    def __init__(self, levels: list[Level], hessian_importance: bool, keep_bytes: int = 2 << 30):
        self.levels, self.hessian_importance = levels, hessian_importance
        self.importance: dict[str, torch.Tensor] = {}            # layer -> diag(H), when it weighs the fit
        self.records: dict[tuple[str, str], BlockWeight] = {}    # (layer, type) -> its rounding
        self.keep_bytes, self.kept = keep_bytes, 0

    def option(self, k: int, in_features: int) -> Level:
        return stored_level(self.levels[k], in_features)

    def observe(self, name: str, hessian: torch.Tensor) -> None:
        if self.hessian_importance:
            self.importance[name] = torch.diag(hessian).float().clone()

    def record(self, name: str, w: torch.Tensor, k: int) -> BlockWeight:
        """w [out, in] on level k's type for its width (kept while room is left)."""
        kind = self.option(k, w.shape[1]).block_type
        rec = self.records.get((name, kind))
        if rec is None:
            rec = ggml_rtn(w, kind, self.importance.get(name), name=name)
            if self.kept + rec.nbytes() <= self.keep_bytes:
                self.records[(name, kind)] = rec
                self.kept += rec.nbytes()
        return rec

    def dequantized(self, name: str, w: torch.Tensor, k: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return self.record(name, w, k).dequantize(dtype)
