"""Steps 3-5 of a size budget: greedy allocations along each layer's lower convex hull of (bytes,
error), the search's start candidates, and the evolutionary search scored by model KL."""

from __future__ import annotations

import heapq
import math
import random

import torch
from tqdm.auto import tqdm

from lowbit.budget.costs import WITHIN, over_budget
from lowbit.budget.scorer import Scorer
from lowbit.recipes import BudgetConfig


def greedy(costs: torch.Tensor, errors: torch.Tensor, budget: int, floor: list[int] | None = None) -> list[int]:
    """Level index per layer: cheapest everywhere (or `floor`, a level per layer), then the best
    error-per-byte upgrades that fit."""
    L, K = costs.shape
    hulls = []
    for i in range(L):
        if floor is None:
            order = sorted(range(K), key=lambda k: (int(costs[i, k]), float(errors[i, k])))
        else:  # the floor's level first, then only levels that cost more and err less
            f = floor[i]
            order = [f] + sorted((k for k in range(K) if int(costs[i, k]) > int(costs[i, f])
                                  and float(errors[i, k]) < float(errors[i, f])),
                                 key=lambda k: (int(costs[i, k]), float(errors[i, k])))
        hull: list[int] = []
        for k in order:  # lower convex hull of (bytes, error), error strictly decreasing
            if hull and float(errors[i, k]) >= float(errors[i, hull[-1]]):
                continue
            while len(hull) >= 2:
                a, b = hull[-2], hull[-1]
                # drop b if it lies above the segment a -> k
                if (float(errors[i, b]) - float(errors[i, a])) * (int(costs[i, k]) - int(costs[i, a])) >= \
                        (float(errors[i, k]) - float(errors[i, a])) * (int(costs[i, b]) - int(costs[i, a])):
                    hull.pop()
                else:
                    break
            hull.append(k)
        hulls.append(hull)
    pos = [0] * L
    used = sum(int(costs[i, hulls[i][0]]) for i in range(L))
    if used > budget:
        raise over_budget(used, budget)
    heap = []

    def push(i: int) -> None:
        if pos[i] + 1 < len(hulls[i]):
            a, b = hulls[i][pos[i]], hulls[i][pos[i] + 1]
            gain = float(errors[i, a] - errors[i, b]) / max(int(costs[i, b] - costs[i, a]), 1)
            heapq.heappush(heap, (-gain, i))

    for i in range(L):
        push(i)
    while heap:
        _, i = heapq.heappop(heap)
        a, b = hulls[i][pos[i]], hulls[i][pos[i] + 1]
        extra = int(costs[i, b] - costs[i, a])
        if used + extra <= budget:
            used += extra
            pos[i] += 1
            push(i)
    return [hulls[i][pos[i]] for i in range(L)]


def only_allocation(costs: torch.Tensor, budget: int) -> list[int] | None:
    """The smallest level per layer when no single upgrade fits beside it (then nothing else
    fits either: any other allocation moves some layer above its smallest level); None when
    there is a choice to make. Raises when even the smallest allocation is over the budget."""
    low = costs.min(dim=1)
    used = int(low.values.sum())
    if used > budget:
        raise over_budget(used, budget)
    for i in range(costs.shape[0]):
        if int((costs[i] == low.values[i]).sum()) > 1:
            return None  # two levels of the same size: a choice by error
        up = costs[i][costs[i] > low.values[i]]
        if up.numel() and used + int(up.min() - low.values[i]) <= budget:
            return None
    return [int(k) for k in low.indices]


def start_candidates(costs: torch.Tensor, errors: torch.Tensor, budget: int, levels,
                     kl_errors: torch.Tensor | None = None) -> dict[str, list[int]]:
    """Allocations to start the search from: the greedy from the smallest level; for each level
    that fits uniformly, that level everywhere topped up greedily; and each uniform level that
    alone gets within WITHIN of the budget. With `kl_errors` (kl_scaled), the greedy allocations
    again on those. Duplicates are dropped (first name kept)."""
    L, K = costs.shape
    lower = math.ceil(budget * (1 - WITHIN))
    proxies = {"greedy": errors} if kl_errors is None else {"greedy": errors, "kl-greedy": kl_errors}
    out: dict[str, list[int]] = {p: greedy(costs, e, budget) for p, e in proxies.items()}
    for k in sorted(range(K), key=lambda k: int(costs[:, k].sum())):
        total = int(costs[:, k].sum())
        if total > budget:
            continue
        if total >= lower:
            out[f"uniform {levels[k]}"] = [k] * L
        for p, e in proxies.items():
            out[f"{levels[k]} + {p}"] = greedy(costs, e, budget, floor=[k] * L)
    seen, unique = set(), {}
    for name, choice in out.items():
        if tuple(choice) not in seen:
            seen.add(tuple(choice))
            unique[name] = choice
    return unique


def evolve(
    score: Scorer, levels, costs: torch.Tensor, start: list[int], start_kl: float, budget: int,
    cfg: BudgetConfig, progress: bool = True,
) -> tuple[list[int], float, int, list[float]]:
    """(1 + offspring) evolutionary search over per-layer levels, scored by KL to the model.
    Returns the best allocation, its KL, the number of accepted offspring and the KL history."""
    rng = random.Random(cfg.seed)
    L = len(start)
    by_cost = [sorted(range(len(levels)), key=lambda k: int(costs[i, k])) for i in range(L)]
    rank = [{k: r for r, k in enumerate(by_cost[i])} for i in range(L)]
    lower = math.ceil(budget * (1 - WITHIN))

    def used(choice: list[int]) -> int:
        return sum(int(costs[i, k]) for i, k in enumerate(choice))

    def mutate(choice: list[int]) -> list[int] | None:
        child = list(choice)
        for _ in range(rng.randint(1, 3)):
            for _try in range(20):
                up, down = rng.randrange(L), rng.randrange(L)
                ru, rd = rank[up][child[up]], rank[down][child[down]]
                if up == down or ru + 1 >= len(levels) or rd == 0:
                    continue
                trial = list(child)
                trial[up], trial[down] = by_cost[up][ru + 1], by_cost[down][rd - 1]
                if lower <= used(trial) <= budget:
                    child = trial
                    break
        return child if child != choice else None

    parent, parent_kl, accepted, history = list(start), start_kl, 0, [start_kl]
    for _ in tqdm(range(cfg.generations), desc="budget search", unit="gen", disable=not progress):
        best, best_kl = None, parent_kl
        for _ in range(cfg.offspring):
            child = mutate(parent)
            if child is None:
                continue
            kl = score(child)
            if kl < best_kl:
                best, best_kl = child, kl
        if best is not None:
            parent, parent_kl, accepted = best, best_kl, accepted + 1
        history.append(parent_kl)
    return parent, parent_kl, accepted, history
