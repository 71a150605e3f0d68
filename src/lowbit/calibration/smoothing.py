"""AWQ on one decoder block: record its inputs, search and fold the smoothing scales.

Called by the sequential pipeline before a block's layers are quantized (pipeline.py); the
numerics live in algorithms/awq.py (its awq_rtn_quantize is `--method awq`'s quantizer after
smoothing), the module layout in models/arch.py.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from lowbit.algorithms import awq
from lowbit.calibration.activations import record_inputs
from lowbit.models.arch import (
    norm_weight_offset,
    sequential_linear_groups,
    smoothing_groups,
)
from lowbit.recipes import AWQConfig, LayerSpec

if TYPE_CHECKING:
    from lowbit.calibration.distributed import Communicator


@dataclass
class SmoothedLayer:
    inputs: torch.Tensor                 # sampled calibration inputs [n, in], as the layer now sees them
    report: dict[str, Any] = field(default_factory=dict)


def search_bits(spec: LayerSpec) -> int:
    """The round-to-nearest width the smoothing search quantizes with. For an average width (awq-slim)
    it is one above the average's floor, the width SliM gives the salient groups: the milder smoothing
    that width asks for suits mixed widths better than the strong one a uniform floor would take.
    Chosen in a one-off comparison on tiny models with outlier channels (logit error against the
    unquantized model): searching at the floor did worse than plain slim at 2 and 2.5 bits; one above
    it did better at 2.5 and 3, and at 2 on llama but not on qwen2. The 3-bit case is kept as a test
    (tests/test_pipeline.py, test_awq_slim_beats_slim_with_outlier_channels); on the real models see
    BENCHMARKS.md."""
    return math.floor(spec.average_bits) + 1 if spec.average_bits is not None else spec.fmt.bits


def smooth_block(
    block: nn.Module,
    run: Callable[[], None],
    total_tokens: int,
    cfg: AWQConfig,
    prefix: str,
    specs: Mapping[str, LayerSpec],
    comm: Communicator | None = None,
) -> dict[str, SmoothedLayer]:
    """Smooth `block` in place; returns, per linear layer to quantize (name in block; `specs` holds
    every layer to quantize by full name), its sampled inputs after smoothing and what was chosen
    (alpha, loss with and without). With `comm`, `run` feeds this rank's shard of the samples and
    the statistics are combined over the ranks before the search (calibration/distributed.py)."""
    groups = sequential_linear_groups(block)
    first_of = {name: g[0] for g in groups for name in g}
    firsts = {g[0]: block.get_submodule(g[0]) for g in groups}
    recs = record_inputs(firsts, run, total_tokens, cfg.search_tokens, comm.token_offset if comm else 0)
    if comm is not None:
        comm.combine_inputs(recs, prefix)
    scales = {g[0]: None for g in groups}
    reports: dict[str, dict[str, Any]] = {}
    for sg in smoothing_groups(block):
        targets = [n for n in sg.linears if f"{prefix}.{n}" in specs]
        if not targets:
            continue
        rec = recs[first_of[sg.linears[0]]]
        z = awq.compress_inputs(rec.sample)
        linears = [block.get_submodule(n) for n in sg.linears]
        # layers sharing an input may differ in width under a rule; the first one's settings rule the search
        spec = specs[f"{prefix}.{targets[0]}"]
        found = awq.search_scales(z, rec.mean_abs, [block.get_submodule(n).weight.detach() for n in targets],
                                  search_bits(spec), spec.fmt.group_size, spec.fmt.symmetric, cfg.grid,
                                  cfg.duo_scaling)
        if found.alpha is not None:
            prev = block.get_submodule(sg.prev)
            awq.fold_scales(prev, linears, found.scales, norm_weight_offset(prev))
            scales[first_of[sg.linears[0]]] = found.scales
        for n in targets:
            reports[n] = {"awq_alpha": found.alpha, "awq_loss": found.loss, "awq_loss_unsmoothed": found.identity_loss}
    out = {}
    for name, first in first_of.items():
        if f"{prefix}.{name}" not in specs:
            continue
        x = recs[first].sample
        if scales[first] is not None:
            x = x / scales[first]
        out[name] = SmoothedLayer(x, reports.get(name, {}))
    return out
