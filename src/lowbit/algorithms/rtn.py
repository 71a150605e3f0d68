"""Round-to-nearest quantization with an optional per-group clipping search."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import torch

from lowbit.errors import ShapeError
from lowbit.formats import affine, integer_scale
from lowbit.formats.grids import GRIDS
from lowbit.qtensor import QuantFormat, QuantizedWeight
from lowbit.recipes import ClipConfig

ScaleRound = Callable[[torch.Tensor], torch.Tensor]


ROW_BLOCK_VALUES = 1 << 24  # rtn_quantize rounds a block of rows of about this many values at a time


def integer_scale_grid(
    w: torch.Tensor,
    fmt: QuantFormat,
    clip: ClipConfig | None,
    group_bits: torch.Tensor | None = None,
) -> tuple[torch.Tensor, ScaleRound]:
    """The row multipliers [out] of an integer-scale format (fmt.scale_bits, fmt.scale_multiplier),
    set from the round-to-nearest float scales of w (each group at its own width when group_bits
    is given), and the rounding of any scale of those rows onto their integer grid.

    Works for scales of shape [out, G] and [out, 1] (one group at a time, as GPTQ chooses them)."""
    wg = affine.group_view(w.float(), fmt.group_size)
    if group_bits is None:
        scale, _ = group_qparams(wg, fmt.bits, fmt.symmetric, clip)
    else:
        scale = torch.zeros(wg.shape[:2])
        for b in group_bits.unique().tolist():
            sel = torch.nonzero(group_bits == b).flatten()
            scale[:, sel] = group_qparams(wg[:, sel], int(b), fmt.symmetric, clip)[0]
    mult = integer_scale.row_multiplier(scale, fmt.scale_bits, fmt.scale_multiplier)
    return mult, partial(integer_scale.round_scale, mult=mult.unsqueeze(1), bits=fmt.scale_bits)


def group_qparams(
    wg: torch.Tensor,
    bits: int,
    symmetric: bool,
    clip: ClipConfig | None,
    weight: torch.Tensor | None = None,
    scale_round: ScaleRound | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero [out, G] for grouped values wg [out, G, gs], clipped if `clip` is enabled.

    `weight` [out, G, gs] weights each element's error in the clipping search (default 1).
    """
    shrink = clip_shrink(wg, bits, symmetric, clip, weight, scale_round)
    return affine.choose_qparams(wg, bits, symmetric, 1.0 if shrink is None else shrink, scale_round)


def clip_shrink(
    wg: torch.Tensor,
    bits: int,
    symmetric: bool,
    clip: ClipConfig | None,
    weight: torch.Tensor | None = None,
    scale_round: ScaleRound | None = None,
) -> torch.Tensor | None:
    """The clipping search's range factors [out, G] for grouped values wg [out, G, gs]; None
    when `clip` is off (the full range)."""
    if clip is None or not clip.enabled:
        return None
    out, g, gs = wg.shape  # (zero padding of a short last group adds no error: 0 is exact)
    return affine.search_shrink(
        wg.reshape(out, g * gs), bits, gs, symmetric, clip.grid, clip.max_shrink, clip.norm,
        None if weight is None else weight.reshape(out, g * gs), scale_round,
    )


def rtn_quantize(
    w: torch.Tensor,
    fmt: QuantFormat,
    clip: ClipConfig | None = None,
    shrink: torch.Tensor | None = None,
) -> QuantizedWeight:
    """w [out, in] -> QuantizedWeight in `fmt` (resolved for w's width) by round-to-nearest: each
    value's nearest level of the format's grid (formats/grids.py) in its group's affine frame.

    Ranges are clipped by the weight-error search when `clip` is enabled, or by given per-group
    `shrink` factors [out, G] (e.g. from AWQ's output-error search, or `rtn_shrink`'s earlier
    search: the same shrink gives the same codes without searching again).
    """
    rows = max(1, ROW_BLOCK_VALUES // max(1, w.shape[1]))
    if fmt.scale_bits or w.shape[0] <= rows:
        codes, scale, zero, mult = _rtn_rows(w, fmt, clip, shrink)
        return QuantizedWeight.from_float_qparams(codes, scale, zero, fmt, scale_mult=mult)
    # rows are independent (Integer Scale's row multipliers aside, kept whole above): a block of
    # rows at a time bounds the search's float temporaries (a 7B model's head is 2.2 GB in float32)
    parts = [_rtn_rows(w[i:i + rows], fmt, clip, None if shrink is None else shrink[i:i + rows])
             for i in range(0, w.shape[0], rows)]
    codes, scale, zero = (torch.cat(t) for t in list(zip(*parts))[:3])
    return QuantizedWeight.from_float_qparams(codes, scale, zero, fmt)


def _rtn_rows(w: torch.Tensor, fmt: QuantFormat, clip: ClipConfig | None, shrink: torch.Tensor | None):
    """rtn_quantize's codes, scales, zeros and row multipliers for the rows of w."""
    wg, mult, scale_round = _rtn_grid(w, fmt, clip)
    if shrink is None:
        shrink = clip_shrink(wg, fmt.bits, fmt.symmetric, clip, scale_round=scale_round)
    scale, zero = affine.choose_qparams(wg, fmt.bits, fmt.symmetric, 1.0 if shrink is None else shrink, scale_round)
    codes = affine.ungroup(GRIDS[fmt.grid].codes(wg, scale, zero, fmt.bits), w.shape[1])
    return codes, scale, zero, mult


def rtn_shrink(w: torch.Tensor, fmt: QuantFormat, clip: ClipConfig | None = None) -> torch.Tensor | None:
    """The range factors [out, G] that `rtn_quantize` with these arguments finds by its clipping
    search (None with no search). Passed back as `shrink`, they reproduce its codes exactly."""
    wg, _, scale_round = _rtn_grid(w, fmt, clip)
    return clip_shrink(wg, fmt.bits, fmt.symmetric, clip, scale_round=scale_round)


def _rtn_grid(
    w: torch.Tensor, fmt: QuantFormat, clip: ClipConfig | None
) -> tuple[torch.Tensor, torch.Tensor | None, ScaleRound | None]:
    """The grouped weight and, for Integer Scale, the row multipliers and the rounding of scales
    onto their grid: what rtn_quantize and rtn_shrink both start from."""
    if affine.resolve_group_size(w.shape[1], fmt.group_size) != fmt.group_size:
        raise ShapeError(f"format group size {fmt.group_size} is not resolved for a weight {w.shape[1]} wide "
                         "(build formats with Recipe.layer_spec / Recipe.level_format)")
    wg = affine.group_view(w.float(), fmt.group_size)
    mult = scale_round = None
    if fmt.scale_bits:
        mult, scale_round = integer_scale_grid(w, fmt, clip)
    return wg, mult, scale_round
