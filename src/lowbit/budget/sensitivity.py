"""Step 2 of a size budget: each (layer, level)'s output error tr(D H D^T) for its round-to-nearest
error D (rounded as budget/rounding.py says, which keeps what it found on the way), and the
probe's rescaling of those errors into model KL."""

from __future__ import annotations

import re

import torch
from torch import nn

from lowbit.algorithms.slim import output_error
from lowbit.budget.rounding import AffineRounding, BlockRounding, ShrinkStore  # noqa: F401 - ShrinkStore re-exported
from lowbit.calibration.sequential import run_sequential
from lowbit.levels import Level
from lowbit.models.load import LoadedModel
from lowbit.recipes import Recipe


def sensitivity(
    loaded: LoadedModel, names: list[str], levels: list[Level], recipe: Recipe, ids: torch.Tensor,
    progress: bool = True, rounding: AffineRounding | BlockRounding | None = None,
) -> tuple[torch.Tensor, AffineRounding | BlockRounding]:
    """[L, K] output error tr(D H D^T) of each layer's round-to-nearest error D at each level, and
    the rounding (default: the recipe's affine format at each level) holding what it found, so
    that scoring need not search again."""
    model = loaded.model
    index = {n: i for i, n in enumerate(names)}
    errors = torch.full((len(names), len(levels)), float("nan"))
    rounding = rounding if rounding is not None else AffineRounding(recipe, levels)
    prefixes = _block_prefixes(model, names)

    def measure(i: int, linears: dict[str, nn.Linear], hessians: dict[str, torch.Tensor]) -> dict:
        for name, lin in linears.items():
            full = f"{prefixes[i]}.{name}"
            if full not in index:
                continue
            w = lin.weight.detach().float()
            H = hessians[name]
            rounding.observe(full, H)
            for k in range(len(levels)):
                errors[index[full], k] = output_error(w, rounding.dequantized(full, w, k), H)
        return {}

    run_sequential(model, ids, measure, true_sequential=False, progress=progress,
                   dtype=recipe.calibration.dtype)
    return errors, rounding


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
