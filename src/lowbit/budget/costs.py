"""Step 1 of a size budget: what each (layer, level) costs in packed bytes, and how many bytes the
quantized layers may take."""

from __future__ import annotations

import math

import torch
from torch import nn

from lowbit.errors import ConfigError
from lowbit.levels import Level
from lowbit.qtensor import format_nbytes
from lowbit.recipes import BudgetConfig, Recipe

WITHIN = 0.01  # the budget must be met from below within this fraction


class BudgetError(ConfigError):
    """The budget cannot be met with the given levels."""


def layer_bytes(model: nn.Module, names: list[str], levels: list[Level], recipe: Recipe) -> torch.Tensor:
    """[L, K] packed bytes of each layer at each level."""
    rows = []
    for name in names:
        lin = model.get_submodule(name)
        rows.append([format_nbytes(lin.out_features, lin.in_features, recipe.level_format(lv, lin.in_features))
                     for lv in levels])
    return torch.tensor(rows, dtype=torch.int64)


def dense_bytes(model: nn.Module, names: list[str], recipe: Recipe | None = None) -> int:
    """Bytes of every parameter outside the quantized layers, at 16 bits (tied tensors once); an
    output head the recipe rounds (recipe.head_bits) at its packed size."""
    quantized = {id(model.get_submodule(n).weight) for n in names}
    head = model.get_output_embeddings() if recipe is not None and recipe.head_bits else None
    seen, total = set(), 0
    for p in model.parameters():
        if id(p) in quantized or p.untyped_storage().data_ptr() in seen:
            continue
        seen.add(p.untyped_storage().data_ptr())
        if head is not None and p is head.weight:
            total += format_nbytes(head.out_features, head.in_features, recipe.head_format(head.in_features))
        else:
            total += 2 * p.numel()
    return total


def budget_bytes(model: nn.Module, names: list[str], budget: BudgetConfig, recipe: Recipe | None = None) -> int:
    """Bytes the quantized layers may take (a target size counts the other tensors as `recipe`
    stores them: dense at 16 bits, the output head packed when the recipe rounds it)."""
    n_q = sum(model.get_submodule(n).weight.numel() for n in names)
    if budget.target_bpw is not None:
        return math.floor(budget.target_bpw * n_q / 8 + 1e-6)  # a bpw printed from a size meets that size
    dense = dense_bytes(model, names, recipe)
    if budget.target_bytes <= dense:
        raise BudgetError(f"target size {budget.target_bytes / 1e6:.1f} MB is below the {dense / 1e6:.1f} MB of "
                          "tensors outside the decoder blocks (embeddings and norms at 16 bits, the output head as the recipe stores it); raise --target-size")
    return budget.target_bytes - dense


def over_budget(used: int, budget: int) -> BudgetError:
    return BudgetError(f"the smallest allocation takes {used} bytes for the quantized layers, more than the "
                       f"budget of {budget}; raise the budget or add smaller levels")
