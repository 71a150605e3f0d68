"""A size budget from end to end (steps 1-6 of lowbit.budget): plan_budget (affine levels, for a
lowbit checkpoint) and plan_block_budget (llama.cpp block types, for a GGUF file) return the
Allocation (each layer's Level, by exact name) and a BudgetReport of what was chosen and why."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Any

import torch
from tqdm.auto import tqdm

from lowbit.budget.costs import (
    WITHIN,
    BudgetError,
    budget_bytes,
    layer_bytes,
)
from lowbit.budget.rounding import AffineRounding, BlockRounding
from lowbit.budget.scorer import Scorer, clearly_better
from lowbit.budget.search import evolve, greedy, only_allocation, start_candidates
from lowbit.budget.sensitivity import kl_scaled, probe_level, sensitivity
from lowbit.data import calibration_samples
from lowbit.errors import ConfigError
from lowbit.levels import Allocation
from lowbit.methods import METHODS
from lowbit.models.load import LoadedModel
from lowbit.recipes import Recipe

log = logging.getLogger(__name__)


def _confirmed(confirm: dict[str, float], kept: str) -> str:
    """The confirmation step of a budget report, in words."""
    if not confirm:
        return "no offspring beat the start, so it was kept"
    return f"on unseen windows {confirm['start']:.4f} -> {confirm['searched']:.4f}, kept the {kept}"


@dataclass
class BudgetReport:
    target: str
    budget_bytes: int
    used_bytes: int
    bits_per_weight: float
    choice: dict[str, str]                      # layer -> level name (str(Level)): the Allocation, as recorded
    counts: dict[str, int]                      # level name -> layers
    start: str | None = None                    # which candidate the search started from
    starts: dict[str, float] = field(default_factory=dict)  # candidate -> held-out KL
    start_kl: float | None = None
    final_kl: float | None = None                # the search's best, on the windows it searched on
    accepted: int = 0
    history: list[float] = field(default_factory=list)
    confirm: dict[str, float] = field(default_factory=dict)  # start / searched KL on unseen windows
    kept: str | None = None                      # "searched", or "start" when the search did not confirm
    only_fit: bool = False                       # the smallest levels were the only allocation that fits

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items()}

    def summary(self) -> str:
        counts = ", ".join(f"{k}: {v}" for k, v in sorted(self.counts.items()))
        kl = ""
        if self.start_kl is not None:
            kl = (f"; search from {self.start} (best of {len(self.starts)} starts): KL {self.start_kl:.4f} -> "
                  f"{self.final_kl:.4f} ({self.accepted} improvements); {_confirmed(self.confirm, self.kept)}")
        if self.only_fit:
            kl = "; the only allocation that fits (no layer can move up a level), so nothing was searched"
        return (f"budget {self.target}: {self.used_bytes / 1e6:.2f} of {self.budget_bytes / 1e6:.2f} MB for the "
                f"quantized layers, {self.bits_per_weight:.3f} bits/weight; levels {counts}{kl}")


def held_out_ids(loaded: LoadedModel, recipe: Recipe, data_dir: str | None = None, which: int = 1) -> torch.Tensor:
    """Calibration windows that score allocations, disjoint from those that calibrate: which=1
    the search set (search_tokens), which=2 the confirmation set (four times as many tokens)."""
    c = recipe.calibration
    n_eval = max(1, recipe.budget.search_tokens // c.seqlen) * (4 if which == 2 else 1)
    return calibration_samples(loaded.tokenizer, c.dataset, n_eval, c.seqlen, c.seed + which, data_dir=data_dir)


def _choose(loaded: LoadedModel, recipe: Recipe, names: list[str], rounding: AffineRounding | BlockRounding,
            costs: torch.Tensor, budget: int, data_dir: str | None, progress: bool,
            ) -> tuple[list[int], dict[str, Any]]:
    """Steps 2-6 of lowbit.budget's docstring: the allocation, and what the search saw."""
    cfg, model, c = recipe.budget, loaded.model, recipe.calibration
    levels = rounding.levels
    ids = calibration_samples(loaded.tokenizer, c.dataset, c.n_samples, c.seqlen, c.seed, data_dir=data_dir)
    errors, rounding = sensitivity(loaded, names, levels, recipe, ids, progress, rounding=rounding)
    if cfg.generations <= 0:
        return greedy(costs, errors, budget), {}
    score = Scorer(model, names, levels, recipe, rounding, search=held_out_ids(loaded, recipe, data_dir, 1),
                   confirm=held_out_ids(loaded, recipe, data_dir, 2))
    try:
        kl_errors = None
        if cfg.probe_tokens > 0:
            k = probe_level(costs, budget)
            kl_errors = kl_scaled(errors, score.probe(k, cfg.probe_tokens, progress), k)
        candidates = start_candidates(costs, errors, budget, levels, kl_errors)
        starts = {name: score(choice) for name, choice in
                  tqdm(candidates.items(), desc="budget starts", unit="start", disable=not progress)}
        start = min(starts, key=starts.get)
        log.info("budget search starts: %s", ", ".join(f"{k} {v:.4f}" for k, v in starts.items()))
        choice, final_kl, accepted, history = evolve(score, levels, costs, candidates[start], starts[start],
                                                     budget, cfg, progress)
        # A few windows can be fitted: the search's result must also beat its start, clearly,
        # on windows it never saw, or the start is kept.
        # (Nothing to confirm when no offspring beat the start: the start is the result.)
        score.drop("search")
        confirm, kept = {}, "start"
        if accepted:
            before, after = score.windows(candidates[start], "confirm"), score.windows(choice, "confirm")
            confirm = {"start": sum(before) / len(before), "searched": sum(after) / len(after)}
            kept = "searched" if clearly_better(after, before) else "start"
        if kept == "start":
            choice = candidates[start]
    finally:
        score.restore()
    return choice, {"start": start, "starts": starts, "start_kl": starts[start], "final_kl": final_kl,
                  "accepted": accepted, "history": history, "confirm": confirm, "kept": kept}


def plan_budget(loaded: LoadedModel, recipe: Recipe, names: list[str], data_dir: str | None = None,
                progress: bool = True) -> tuple[Allocation, BudgetReport]:
    """Choose an affine level per layer for recipe.budget; returns each layer's level and the report."""
    cfg = recipe.budget
    if cfg.block_types:
        raise ConfigError(f"budget levels {', '.join(map(str, cfg.levels))} are llama.cpp block types, which only "
                          "a GGUF file holds: write one with --format gguf -o FILE.gguf (lowbit.to_gguf)")
    budget = budget_bytes(loaded.model, names, cfg, recipe)
    return _plan(loaded, recipe, names, AffineRounding(recipe, cfg.parsed_levels()), budget, data_dir, progress)


def plan_block_budget(loaded: LoadedModel, recipe: Recipe, names: list[str], other_bytes: int,
                      data_dir: str | None = None, progress: bool = True) -> tuple[Allocation, BudgetReport]:
    """Choose a llama.cpp block type per layer for recipe.budget, whose levels are block types.

    `other_bytes`: what every tensor outside `names` takes in the file (embeddings, output head,
    norms), counted against a target size. A type whose block does not divide a layer's rows is
    offered to that layer as the 32-weight type llama.cpp would store it in (costs.stored_level), and
    the allocation names the type each layer is stored in. Each (layer, type) is measured and
    scored rounded by ggml_rtn, with the data-free importance for RTN and the Hessian's diagonal
    for the methods that calibrate (budget/rounding.py)."""
    cfg = recipe.budget
    if not cfg.block_types:
        raise ConfigError(f"budget levels {', '.join(map(str, cfg.levels))} are affine; a GGUF file needs "
                          "llama.cpp block types (BudgetConfig.on_block_types)")
    budget = budget_bytes(loaded.model, names, cfg, recipe, other_bytes=other_bytes)
    rounding = BlockRounding(cfg.parsed_levels(), hessian_importance=METHODS[recipe.method].needs_data)
    return _plan(loaded, recipe, names, rounding, budget, data_dir, progress)


def _plan(loaded: LoadedModel, recipe: Recipe, names: list[str], rounding: AffineRounding | BlockRounding,
          budget: int, data_dir: str | None, progress: bool) -> tuple[Allocation, BudgetReport]:
    cfg = recipe.budget
    model = loaded.model
    levels = rounding.levels
    finer, smaller = ("IQ4_XS, Q3_K", "Q2_K") if cfg.block_types else ("more group sizes", "w2g-1")
    costs = layer_bytes(model, names, levels, recipe)
    n_q = sum(model.get_submodule(n).weight.numel() for n in names)
    top = int(costs.max(dim=1).values.sum())
    if top < budget * (1 - WITHIN):
        raise BudgetError(f"the budget allows {budget} bytes for the quantized layers but the largest level everywhere "
                          f"takes only {top} ({8 * top / n_q:.2f} bits/weight); lower the target or add wider levels")
    low = int(costs.min(dim=1).values.sum())
    if low > budget:
        least = math.ceil(8000 * low / n_q) / 1000
        raise BudgetError(f"the smallest allocation takes {low} bytes for the quantized layers "
                          f"({8 * low / n_q:.3f} bits/weight), more than the budget of {budget} "
                          f"({8 * budget / n_q:.3f}){_replaced(model, names, rounding, costs)}; raise the target to at "
                          f"least {least:.3f} bits/weight or add smaller levels (e.g. {smaller})")
    forced = only_allocation(costs, budget)
    if forced is None:
        choice, report_kls = _choose(loaded, recipe, names, rounding, costs, budget, data_dir, progress)
    else:
        choice, report_kls = forced, {"only_fit": True}
    used = sum(int(costs[i, k]) for i, k in enumerate(choice))
    if used < budget * (1 - WITHIN):
        raise BudgetError(f"could not get within {WITHIN:.0%} of the budget with levels {', '.join(map(str, cfg.levels))}: "
                          f"{used} of {budget} bytes; add finer levels (e.g. {finer})")
    if forced is not None:
        log.warning("budget: only the smallest level in every layer fits, so there was nothing to search; "
                    "add smaller levels (e.g. %s) to give the allocation room", smaller)
    allocation = {n: rounding.option(k, model.get_submodule(n).in_features) for n, k in zip(names, choice)}
    chosen = {n: str(lv) for n, lv in allocation.items()}
    counts: dict[str, int] = {}
    for lv in chosen.values():
        counts[lv] = counts.get(lv, 0) + 1
    target = f"{cfg.target_bpw} bits/weight" if cfg.target_bpw is not None else f"{cfg.target_bytes / 1e6:.1f} MB"
    report = BudgetReport(target, budget, used, 8 * used / n_q, chosen, counts, **report_kls)
    return allocation, report


def _replaced(model, names: list[str], rounding: AffineRounding | BlockRounding, costs: torch.Tensor) -> str:
    """Where layers cannot take the smallest level (a block type replaced for their width), in words."""
    k = int(costs.sum(0).argmin())
    widths = sorted({model.get_submodule(n).in_features for n in names
                     if rounding.option(k, model.get_submodule(n).in_features) != rounding.levels[k]})
    if not widths:
        return ""
    stored = rounding.option(k, widths[0])
    return (f" (rows of {', '.join(map(str, widths))} weights are not whole {rounding.levels[k]} blocks, so those "
            f"layers take {stored} instead, as llama.cpp stores them)")
