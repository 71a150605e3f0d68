"""Budgeted allocation across layers: which bit width and group size each linear layer gets so
that the model meets a size budget (average bits per weight, or total bytes) with the least loss.

1. Cost of every (layer, level): exact packed bytes (qtensor.format_nbytes).
2. Sensitivity of every (layer, level), Q-BERT style but measured: the layer's output error
   tr(D H D^T) for the round-to-nearest error D at that level, H from one calibration pass.
3. Greedy allocations: from a floor (the smallest level everywhere, or one uniform level that
   fits), repeatedly take the upgrade with the best error reduction per byte (lower convex hull
   per layer) while it fits the budget.
4. Start of the search: several allocations are scored by the KL divergence of the whole
   model's next-token distribution (layers fake-quantized at their levels) to the unquantized
   model on held-out calibration windows, and the best is the start: the greedy from the smallest
   level; each uniform level that fits, topped up greedily; both again on errors rescaled into
   model KL by a probe (one forward pass per layer with that layer alone quantized); and each
   uniform level that alone meets the budget. The output error of step 2 ranks one layer's levels
   but does not say what a layer's error costs at the model's output: on smollm2-135m at the size
   of w3g128 (RTN) the plain greedy scored KL 2.37, uniform w3g128 1.58, and the probed greedy
   from w2g64 1.16. With the uniform levels among the starts the search never ends worse than a
   uniform level that fits, on the windows it is scored on.
5. Evolutionary search (EvoPress style): offspring of the current allocation switch levels in a
   few layers (one up, one down, keeping the budget), scored by the same KL; the best offspring
   replaces the parent when it is better.
6. Confirmation: a few thousand tokens can be fitted (on smollm2-135m, RTN at the size of
   w3g128, a search that cut the searched windows' KL by 12% raised WikiText-2's by 9%), so the
   search's result is kept only if it also beats its start on four times as many windows it never
   saw, by more than two standard errors of the paired per-window difference. (When no offspring
   beat the start, the start is the result and nothing needs confirming.)

When no layer can move up a level from the smallest allocation within the budget (a budget at
the size of the smallest level, say), that allocation is the only one: steps 2-6 are skipped and
the report says so.

The result is a list of per-layer rules (recipes.Rule) the normal pipeline then quantizes with
(GPTQ, AWQ...), and a report of what was chosen and why.
"""

from __future__ import annotations

import heapq
import logging
import math
import random
import re
from dataclasses import dataclass, field, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from lowbit.algorithms.rtn import resolve_format, rtn_quantize, rtn_shrink
from lowbit.algorithms.slim import output_error
from lowbit.calibration.capture import base_model, capture_block_inputs
from lowbit.calibration.sequential import run_sequential
from lowbit.data import calibration_samples
from lowbit.errors import ConfigError
from lowbit.models.arch import decoder_layers
from lowbit.models.load import LoadedModel
from lowbit.qtensor import format_nbytes
from lowbit.recipes import BudgetConfig, Recipe, Rule

log = logging.getLogger(__name__)

WITHIN = 0.01  # the budget must be met from below within this fraction
# The scorer's reference log-probabilities are held in float16: half the memory of float32 (2.5
# GB instead of 4.9 for qwen's confirmation set), about 3 decimal digits, and the same rounded
# reference for every allocation compared.
REF_DTYPE = torch.float16


class BudgetError(ConfigError):
    """The budget cannot be met with the given levels."""


def level_name(level: tuple[int, int]) -> str:
    return f"w{level[0]}g{level[1]}"


def layer_bytes(model: nn.Module, names: list[str], levels: list[tuple[int, int]], recipe: Recipe) -> torch.Tensor:
    """[L, K] packed bytes of each layer at each level."""
    rows = []
    for name in names:
        lin = model.get_submodule(name)
        rows.append([format_nbytes(lin.out_features, lin.in_features,
                                   resolve_format(lin.in_features, b, g, recipe.symmetric, recipe.integer_scale))
                     for b, g in levels])
    return torch.tensor(rows, dtype=torch.int64)


def dense_bytes(model: nn.Module, names: list[str]) -> int:
    """Bytes of every parameter outside the quantized layers, at 16 bits (tied tensors once)."""
    quantized = {id(model.get_submodule(n).weight) for n in names}
    seen, total = set(), 0
    for p in model.parameters():
        if id(p) in quantized or p.untyped_storage().data_ptr() in seen:
            continue
        seen.add(p.untyped_storage().data_ptr())
        total += 2 * p.numel()
    return total


def budget_bytes(model: nn.Module, names: list[str], budget: BudgetConfig) -> int:
    """Bytes the quantized layers may take."""
    n_q = sum(model.get_submodule(n).weight.numel() for n in names)
    if budget.target_bpw is not None:
        return math.floor(budget.target_bpw * n_q / 8 + 1e-6)  # a bpw printed from a size meets that size
    dense = dense_bytes(model, names)
    if budget.target_bytes <= dense:
        raise BudgetError(f"target size {budget.target_bytes / 1e6:.1f} MB is below the {dense / 1e6:.1f} MB of "
                          "tensors that stay at 16 bits (embeddings, norms, head); raise --target-size")
    return budget.target_bytes - dense


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
    loaded: LoadedModel, names: list[str], levels: list[tuple[int, int]], recipe: Recipe, ids: torch.Tensor,
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
            for k, (b, g) in enumerate(levels):
                shrink = rtn_shrink(w, b, g, recipe.symmetric, clip, recipe.integer_scale)
                shrinks.put(full, k, shrink)
                q = rtn_quantize(w, b, g, recipe.symmetric, clip, shrink, recipe.integer_scale).dequantize()
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


def _over_budget(used: int, budget: int) -> BudgetError:
    return BudgetError(f"the smallest allocation takes {used} bytes for the quantized layers, more than the "
                       f"budget of {budget}; raise the budget or add smaller levels")


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
        raise _over_budget(used, budget)
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
        raise _over_budget(used, budget)
    for i in range(costs.shape[0]):
        if int((costs[i] == low.values[i]).sum()) > 1:
            return None  # two levels of the same size: a choice by error
        up = costs[i][costs[i] > low.values[i]]
        if up.numel() and used + int(up.min() - low.values[i]) <= budget:
            return None
    return [int(k) for k in low.indices]


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
    choice: dict[str, str]                      # layer -> level name
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


class _FakeQuantModel:
    """The model with each layer's weight replaced by its round-to-nearest weight at a level."""

    def __init__(self, model: nn.Module, names: list[str], levels, recipe: Recipe, cache_bytes: int = 2 << 30,
                 shrinks: ShrinkStore | None = None):
        self.model, self.names, self.levels, self.recipe = model, names, levels, recipe
        self.shrinks = shrinks if shrinks is not None else ShrinkStore()
        # set() swaps whole tensors in and never writes into one: the originals need no copy
        self.orig = {n: model.get_submodule(n).weight.detach() for n in names}
        self.current: dict[str, int | None] = {n: None for n in names}
        self.cache: dict[tuple[str, int], torch.Tensor] = {}
        self.cache_bytes, self.cached = cache_bytes, 0

    def weight(self, name: str, k: int) -> torch.Tensor:
        key = (name, k)
        if key not in self.cache:
            b, g = self.levels[k]
            r = self.recipe
            clip = r.clip if r.clip.enabled else None
            if key not in self.shrinks:  # searched once; re-quantizing with the factors is exact and fast
                self.shrinks.put(name, k, rtn_shrink(self.orig[name], b, g, r.symmetric, clip, r.integer_scale))
            w = rtn_quantize(self.orig[name], b, g, r.symmetric, clip, self.shrinks.get(name, k),
                             r.integer_scale).dequantize(self.orig[name].dtype)
            size = w.numel() * w.element_size()
            if self.cached + size <= self.cache_bytes:
                self.cache[key] = w
                self.cached += size
            return w
        return self.cache[key]

    def set(self, choice: list[int | None]) -> None:
        """Each layer at its level; None keeps the layer's original weight."""
        for name, k in zip(self.names, choice):
            if self.current[name] != k:
                self.model.get_submodule(name).weight.data = self.orig[name] if k is None else self.weight(name, k)
                self.current[name] = k

    def restore(self) -> None:
        for name in self.names:
            self.model.get_submodule(name).weight.data = self.orig[name]


def _log_probs(model: nn.Module, row: torch.Tensor, dtype: str) -> torch.Tensor:
    """Next-token log-probabilities of one window; dtype "bfloat16" runs it under CPU autocast
    (the calibration's dtype: recipes.CalibrationConfig.dtype)."""
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bfloat16"):
        return F.log_softmax(model(row.unsqueeze(0)).logits[0].float(), -1)


def _kl(ref: torch.Tensor, logp: torch.Tensor) -> float:
    """Mean KL(ref || logp) per token of one window."""
    ref = ref.float()
    return float((ref.exp() * (ref - logp)).sum()) / ref.shape[0]


def _window_kls(model: nn.Module, ids: torch.Tensor, ref_logp: list[torch.Tensor], dtype: str) -> list[float]:
    """Mean KL per token of each window."""
    return [_kl(ref, _log_probs(model, row, dtype)) for row, ref in zip(ids, ref_logp)]


def _block_output(out: torch.Tensor | tuple) -> torch.Tensor:
    return out[0] if isinstance(out, tuple) else out


class _Tails:
    """The unquantized model's hidden state entering each decoder block, on a few windows, so a
    forward with layers of one block changed can start at that block: the blocks before it would
    compute exactly these states again. The probe changes one layer at a time, so this saves
    about half of its block forwards."""

    def __init__(self, model: nn.Module, ids: torch.Tensor, dtype: str):
        self.model, self.dtype = model, dtype
        self.layers = decoder_layers(model)
        self.block_of = {id(m): b for b, block in enumerate(self.layers) for m in block.modules()}
        with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bfloat16"):
            cap = capture_block_inputs(model, self.layers, ids)
            self.args, self.kwargs = cap.layer_args, cap.layer_kwargs
            h, self.inputs = cap.hidden, []
            for b, block in enumerate(self.layers):
                self.inputs.append(h)
                h = torch.cat([_block_output(block(h[j:j + 1], *self.args[b], **self.kwargs[b]))
                               for j in range(h.shape[0])])

    @staticmethod
    def usable(model: nn.Module) -> bool:
        """Whether the model's output is its final norm then its LM head (no logit soft-capping
        or other step this class would skip)."""
        return (isinstance(getattr(model, "lm_head", None), nn.Module)
                and isinstance(getattr(base_model(model), "norm", None), nn.Module)
                and getattr(getattr(model, "config", None), "final_logit_softcapping", None) is None)

    def log_probs(self, j: int, start: int) -> torch.Tensor:
        """Next-token log-probabilities of window j, running blocks from `start` on."""
        with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.dtype == "bfloat16"):
            h = self.inputs[start][j:j + 1]
            for b in range(start, len(self.layers)):
                h = _block_output(self.layers[b](h, *self.args[b], **self.kwargs[b]))
            logits = self.model.lm_head(base_model(self.model).norm(h))
            return F.log_softmax(logits[0].float(), -1)


def clearly_better(new: list[float], old: list[float], z: float = 2.0) -> bool:
    """Paired test over windows: is `new` lower than `old` by more than z standard errors?"""
    d = [o - n for n, o in zip(new, old)]
    if len(d) < 2:
        return sum(d) > 0
    mean = sum(d) / len(d)
    sd = math.sqrt(sum((x - mean) ** 2 for x in d) / (len(d) - 1))
    return mean > z * sd / math.sqrt(len(d))


class _Scorer:
    """KL(model || model with each layer fake-quantized at its level) on sets of held-out windows."""

    def __init__(self, model: nn.Module, names: list[str], levels, recipe: Recipe,
                 shrinks: ShrinkStore | None = None, **sets: torch.Tensor):
        self.dtype = recipe.calibration.dtype
        self.ids = sets
        self._ref: dict[str, list[torch.Tensor]] = {}
        self.model = model
        self.fq = _FakeQuantModel(model, names, levels, recipe, shrinks=shrinks)

    def _set(self, on: str) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """The windows of set `on` and the unquantized model's log-probabilities on them, computed
        on first use: a set's reference takes windows x tokens x vocabulary float16 values (0.6 GB
        for 2048 tokens of a 150k vocabulary), so only the sets in use are held (see drop)."""
        if on not in self._ref:
            keep = [self.fq.current[n] for n in self.fq.names]
            self.fq.set([None] * len(keep))
            self._ref[on] = [_log_probs(self.model, row, self.dtype).to(REF_DTYPE) for row in self.ids[on]]
            self.fq.set(keep)
        return self.ids[on], self._ref[on]

    def drop(self, on: str) -> None:
        self._ref.pop(on, None)

    def __call__(self, choice: list[int], on: str = "search") -> float:
        kls = self.windows(choice, on)
        return sum(kls) / len(kls)

    def probe(self, k: int, tokens: int, progress: bool = True, reuse_prefix: bool = True) -> torch.Tensor:
        """[L] KL with one layer at a time quantized at level k, the others unquantized, on the
        first `tokens` tokens of the search set. With reuse_prefix (and a model _Tails can
        replay) each forward starts at the changed layer's block."""
        ids, ref_logp = self._set("search")
        n = max(1, min(len(ids), tokens // ids.shape[1]))
        names = self.fq.names
        self.fq.set([None] * len(names))
        tails = _Tails(self.model, ids[:n], self.dtype) if reuse_prefix and _Tails.usable(self.model) else None
        out = torch.empty(len(names))
        for i in tqdm(range(len(names)), desc="budget probes", unit="layer", disable=not progress):
            self.fq.set([k if j == i else None for j in range(len(names))])
            start = None if tails is None else tails.block_of.get(id(self.model.get_submodule(names[i])))
            if start is None:
                out[i] = sum(_window_kls(self.model, ids[:n], ref_logp[:n], self.dtype)) / n
            else:
                out[i] = sum(_kl(ref_logp[j], tails.log_probs(j, start)) for j in range(n)) / n
        self.fq.set([None] * len(names))
        return out

    def windows(self, choice: list[int], on: str = "search") -> list[float]:
        ids, ref_logp = self._set(on)
        self.fq.set(choice)
        return _window_kls(self.model, ids, ref_logp, self.dtype)

    def restore(self) -> None:
        self.fq.restore()


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
            out[f"uniform {level_name(levels[k])}"] = [k] * L
        for p, e in proxies.items():
            out[f"{level_name(levels[k])} + {p}"] = greedy(costs, e, budget, floor=[k] * L)
    seen, unique = set(), {}
    for name, choice in out.items():
        if tuple(choice) not in seen:
            seen.add(tuple(choice))
            unique[name] = choice
    return unique


def evolve(
    score: _Scorer, levels, costs: torch.Tensor, start: list[int], start_kl: float, budget: int,
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


def held_out_ids(loaded: LoadedModel, recipe: Recipe, data_dir: str | None = None, which: int = 1) -> torch.Tensor:
    """Calibration windows that score allocations, disjoint from those that calibrate: which=1
    the search set (search_tokens), which=2 the confirmation set (four times as many tokens)."""
    c = recipe.calibration
    n_eval = max(1, recipe.budget.search_tokens // c.seqlen) * (4 if which == 2 else 1)
    return calibration_samples(loaded.tokenizer, c.dataset, n_eval, c.seqlen, c.seed + which, data_dir=data_dir)


def _choose(loaded: LoadedModel, recipe: Recipe, names: list[str], levels, costs: torch.Tensor, budget: int,
            data_dir: str | None, progress: bool) -> tuple[list[int], dict[str, Any]]:
    """Steps 2-6 of the module docstring: the allocation, and what the search saw."""
    cfg, model, c = recipe.budget, loaded.model, recipe.calibration
    ids = calibration_samples(loaded.tokenizer, c.dataset, c.n_samples, c.seqlen, c.seed, data_dir=data_dir)
    errors, shrinks = sensitivity(loaded, names, levels, recipe, ids, progress)
    if cfg.generations <= 0:
        return greedy(costs, errors, budget), {}
    score = _Scorer(model, names, levels, recipe, shrinks, search=held_out_ids(loaded, recipe, data_dir, 1),
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
                progress: bool = True) -> tuple[Recipe, BudgetReport]:
    """Choose a level per layer for recipe.budget; returns the recipe with one exact rule per layer."""
    cfg = recipe.budget
    model = loaded.model
    levels = cfg.parsed_levels()
    costs = layer_bytes(model, names, levels, recipe)
    budget = budget_bytes(model, names, cfg)
    n_q = sum(model.get_submodule(n).weight.numel() for n in names)
    top = int(costs.max(dim=1).values.sum())
    if top < budget * (1 - WITHIN):
        raise BudgetError(f"the budget allows {budget} bytes for the quantized layers but the largest level everywhere "
                          f"takes only {top} ({8 * top / n_q:.2f} bits/weight); lower the target or add wider levels")
    forced = only_allocation(costs, budget)
    if forced is None:
        choice, report_kls = _choose(loaded, recipe, names, levels, costs, budget, data_dir, progress)
    else:
        choice, report_kls = forced, {"only_fit": True}
    used = sum(int(costs[i, k]) for i, k in enumerate(choice))
    if used < budget * (1 - WITHIN):
        raise BudgetError(f"could not get within {WITHIN:.0%} of the budget with levels {', '.join(cfg.levels)}: "
                          f"{used} of {budget} bytes; add finer levels (e.g. more group sizes)")
    if forced is not None:
        log.warning("budget: only the smallest level in every layer fits, so there was nothing to search; "
                    "add smaller levels (e.g. w2g-1) to give the allocation room")
    chosen = {n: level_name(levels[k]) for n, k in zip(names, choice)}
    counts: dict[str, int] = {}
    for lv in chosen.values():
        counts[lv] = counts.get(lv, 0) + 1
    target = f"{cfg.target_bpw} bits/weight" if cfg.target_bpw is not None else f"{cfg.target_bytes / 1e6:.1f} MB"
    report = BudgetReport(target, budget, used, 8 * used / n_q, chosen, counts, **report_kls)
    rules = tuple(Rule(pattern=f"^{re.escape(n)}$", bits=levels[k][0], group_size=levels[k][1])
                  for n, k in zip(names, choice))
    return replace(recipe, rules=rules + recipe.rules), report
