"""Step 1 of a size budget: what each (layer, level) costs in stored bytes (packed affine codes,
or a llama.cpp block type's blocks: the bytes a GGUF file holds), and how many bytes the quantized
layers may take."""

from __future__ import annotations

import math

import torch
from torch import nn

from lowbit.errors import ConfigError, ShapeError
from lowbit.formats.ggml import BLOCK_TYPES
from lowbit.formats.ggml.mixes import fallback_type
from lowbit.levels import Level
from lowbit.qtensor import format_nbytes
from lowbit.recipes import BudgetConfig, Recipe

WITHIN = 0.01  # the budget must be met from below within this fraction


class BudgetError(ConfigError):
    """The budget cannot be met with the given levels."""


def stored_level(level: Level, in_features: int) -> Level:
    """The level a layer `in_features` wide holds when given `level`: itself, except a block type
    whose block does not divide the row, which becomes the 32-weight type llama.cpp stores such
    rows in (Q4_K -> Q5_0, Q6_K -> Q8_0, IQ4_XS -> IQ4_NL: formats/ggml/mixes.fallback_type).
    ShapeError when not even that fits (a row that is not a multiple of 32)."""
    if not level.is_block_type or in_features % level.group_size == 0:
        return level
    stored = fallback_type(level.block_type, in_features)
    if stored not in BLOCK_TYPES:
        raise ShapeError(f"a row of {in_features} weights is not a whole number of {level} blocks nor of any "
                         f"32-weight type's: llama.cpp keeps such a tensor at {stored}")
    return Level.of_type(stored)


def level_bytes(out_features: int, in_features: int, level: Level, recipe: Recipe) -> int:
    """Bytes of an [out, in] weight at `level`: packed in the recipe's affine format, or the
    blocks of the block type rows this wide are stored in (stored_level): rows * cols / block *
    type_size."""
    if level.is_block_type:
        bt = BLOCK_TYPES[stored_level(level, in_features).block_type]
        return out_features * (in_features // bt.block) * bt.type_size
    return format_nbytes(out_features, in_features, recipe.level_format(level, in_features))


def layer_bytes(model: nn.Module, names: list[str], levels: list[Level], recipe: Recipe) -> torch.Tensor:
    """[L, K] stored bytes of each layer at each level."""
    rows = []
    for name in names:
        lin = model.get_submodule(name)
        rows.append([level_bytes(lin.out_features, lin.in_features, lv, recipe) for lv in levels])
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


def budget_bytes(model: nn.Module, names: list[str], budget: BudgetConfig, recipe: Recipe | None = None,
                 other_bytes: int | None = None) -> int:
    """Bytes the quantized layers may take. A target size counts the other tensors as stored:
    `other_bytes` when the caller knows it (a GGUF file's types), else as `recipe` stores them
    (dense at 16 bits, the output head packed when the recipe rounds it)."""
    n_q = sum(model.get_submodule(n).weight.numel() for n in names)
    if budget.target_bpw is not None:
        return math.floor(budget.target_bpw * n_q / 8 + 1e-6)  # a bpw printed from a size meets that size
    if other_bytes is not None:
        dense, how = other_bytes, "embeddings, output head and norms as the file stores them"
    else:
        dense = dense_bytes(model, names, recipe)
        how = "embeddings and norms at 16 bits, the output head as the recipe stores it"
    if budget.target_bytes <= dense:
        raise BudgetError(f"target size {budget.target_bytes / 1e6:.1f} MB is below the {dense / 1e6:.1f} MB of "
                          f"tensors outside the decoder blocks ({how}); raise --target-size")
    return budget.target_bytes - dense


def over_budget(used: int, budget: int) -> BudgetError:
    return BudgetError(f"the smallest allocation takes {used} bytes for the quantized layers, more than the "
                       f"budget of {budget}; raise the budget or add smaller levels")
