"""Step 2 of a size budget: each (layer, level)'s output error tr(D H D^T) for its round-to-nearest
error D, the clipping factors found on the way, and the probe's rescaling of those errors into
model KL."""

from __future__ import annotations

import re

import torch
from torch import nn

from lowbit.algorithms.rtn import rtn_quantize, rtn_shrink
from lowbit.algorithms.slim import output_error
from lowbit.calibration.sequential import run_sequential
from lowbit.levels import Level
from lowbit.models.load import LoadedModel
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


def sensitivity(
    loaded: LoadedModel, names: list[str], levels: list[Level], recipe: Recipe, ids: torch.Tensor,
    progress: bool = True,
) -> tuple[torch.Tensor, ShrinkStore]:
    """[L, K] output error tr(D H D^T) of each layer's round-to-nearest error D at each level, and
    the clipping factors the round-to-nearest found (so that scoring need not search again)."""
    model = loaded.model
    index = {n: i for i, n in enumerate(names)}
    errors = torch.full((len(names), len(levels)), float("nan"))
    shrinks = ShrinkStore()
    clip = recipe.clip if recipe.clip.enabled else None
    prefixes = _block_prefixes(model, names)

    def measure(i: int, linears: dict[str, nn.Linear], hessians: dict[str, torch.Tensor]) -> dict:
        for name, lin in linears.items():
            full = f"{prefixes[i]}.{name}"
            if full not in index:
                continue
            w = lin.weight.detach().float()
            H = hessians[name]
            for k, level in enumerate(levels):
                fmt = recipe.level_format(level, w.shape[1])
                shrink = rtn_shrink(w, fmt, clip)
                shrinks.put(full, k, shrink)
                q = rtn_quantize(w, fmt, clip, shrink).dequantize()
                errors[index[full], k] = output_error(w, q, H)
        return {}

    run_sequential(model, ids, measure, true_sequential=False, progress=progress,
                   dtype=recipe.calibration.dtype)
    return errors, shrinks


def _block_prefixes(model: nn.Module, names: list[str]) -> dict[int, str]:
    out = {}
    for n in names:
        m = re.match(r"(.*\.(\d+))\.", n)
        out[int(m.group(2))] = m.group(1)
    return out


def probe_level(costs: torch.Tensor, budget: int) -> int:
    """The widest level that fits the budget everywhere (the cheapest if none does)."""
    totals = costs.sum(0)
    fitting = [k for k in range(costs.shape[1]) if int(totals[k]) <= budget]
    return max(fitting, key=lambda k: int(totals[k])) if fitting else int(totals.argmin())


def kl_scaled(errors: torch.Tensor, probe_kl: torch.Tensor, k: int) -> torch.Tensor:
    """Per-layer output errors put in units of model KL: layer i's row scaled so that its error at
    level k equals the KL measured with layer i alone quantized at k. The output error ranks a
    layer's levels; the probe says what that layer's error costs at the model's output."""
    scale = probe_kl.clamp_min(1e-12) / errors[:, k].clamp_min(1e-30)
    return errors * scale[:, None]
