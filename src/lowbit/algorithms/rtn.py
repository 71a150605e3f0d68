"""Round-to-nearest quantization with an optional per-group clipping search."""

from __future__ import annotations

import torch

from lowbit.formats import affine
from lowbit.qtensor import QuantFormat, QuantizedWeight
from lowbit.recipes import ClipConfig


def resolve_format(in_features: int, bits: int, group_size: int, symmetric: bool) -> QuantFormat:
    return QuantFormat(bits, affine.resolve_group_size(in_features, group_size), symmetric)


def group_qparams(
    wg: torch.Tensor,
    bits: int,
    symmetric: bool,
    clip: ClipConfig | None,
    weight: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero [out, G] for grouped values wg [out, G, gs], clipped if `clip` is enabled.

    `weight` [out, G, gs] weights each element's error in the clipping search (default 1).
    """
    shrink = 1.0
    if clip is not None and clip.enabled:
        out, g, gs = wg.shape  # (zero padding of a short last group adds no error: 0 is exact)
        shrink = affine.search_shrink(
            wg.reshape(out, g * gs), bits, gs, symmetric, clip.grid, clip.max_shrink, clip.norm,
            None if weight is None else weight.reshape(out, g * gs),
        )
    return affine.choose_qparams(wg, bits, symmetric, shrink)


def rtn_quantize(
    w: torch.Tensor,
    bits: int,
    group_size: int,
    symmetric: bool = False,
    clip: ClipConfig | None = None,
    shrink: torch.Tensor | None = None,
) -> QuantizedWeight:
    """w [out, in] -> QuantizedWeight by round-to-nearest.

    Ranges are clipped by the weight-error search when `clip` is enabled, or by given per-group
    `shrink` factors [out, G] (e.g. from AWQ's output-error search).
    """
    fmt = resolve_format(w.shape[1], bits, group_size, symmetric)
    wg = affine.group_view(w.float(), fmt.group_size)
    if shrink is not None:
        scale, zero = affine.choose_qparams(wg, bits, symmetric, shrink)
    else:
        scale, zero = group_qparams(wg, bits, symmetric, clip)
    codes = affine.ungroup(affine.quantize_groups(wg, scale, zero, bits), w.shape[1])
    return QuantizedWeight.from_float_qparams(codes, scale, zero, fmt)
