"""Integer affine quantization by groups: pure tensor functions.

A weight row of `in_features` values is cut into `in_features // group_size` contiguous groups;
each group has one scale and (asymmetric) one integer zero point:

    code = clamp(round(w / scale) + zero, 0, 2**bits - 1)        # unsigned codes
    w'   = (code - zero) * scale

Symmetric formats use the fixed zero 2**(bits-1) and scale = amax / (2**(bits-1) - 1), so the
codes span [-(2**(bits-1)), 2**(bits-1) - 1] around it and +-amax are exactly representable.
Asymmetric formats map [min, max] (always containing 0) onto [0, 2**bits - 1] with an integer
zero point, as GPTQ does.

Scales are rounded to float16 when chosen (the dtype the checkpoint stores), so codes computed
here are exactly the codes a reloaded checkpoint dequantizes.

Shapes: w [out, in] -> grouped [out, n_groups, group_size]; scales, zeros [out, n_groups].

Widths not divisible by the group size: n_groups = ceil(in / group_size) and the last group of
each row is shorter (in % group_size columns). Internally the row is padded with zeros to a
whole number of groups; a zero never changes a group's range (asymmetric ranges always contain
0, symmetric ones are set by |w|) and is represented exactly, so padding equals a short group.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from lowbit.errors import ConfigError, ShapeError

SUPPORTED_BITS = range(1, 9)
SCALE_DTYPE = torch.float16
# Smallest scale we store: a positive normal float16. Groups of all-zero weights get it.
MIN_SCALE = 2.0**-14


def check_bits(bits: int) -> None:
    if not isinstance(bits, int) or bits not in SUPPORTED_BITS:
        raise ConfigError(f"bits={bits!r} is not supported; use an integer from 1 to 8")


def resolve_group_size(in_features: int, group_size: int) -> int:
    """`group_size` <= 0 (or >= in_features) means one group per row (per-channel)."""
    if group_size <= 0 or group_size >= in_features:
        return in_features
    return group_size


def n_groups(in_features: int, group_size: int) -> int:
    return -(-in_features // resolve_group_size(in_features, group_size))


def group_view(w: torch.Tensor, group_size: int) -> torch.Tensor:
    """w [out, in] -> [out, ceil(in / gs), gs]: a view, or a zero-padded copy for a short last group."""
    if w.dim() != 2:
        raise ShapeError(f"expected a 2-D weight [out, in], got shape {tuple(w.shape)}")
    gs = resolve_group_size(w.shape[1], group_size)
    pad = -w.shape[1] % gs
    if pad:
        w = torch.nn.functional.pad(w, (0, pad))
    return w.reshape(w.shape[0], -1, gs)


def ungroup(wg: torch.Tensor, in_features: int) -> torch.Tensor:
    """[out, G, gs] -> [out, in_features], dropping the padding of a short last group."""
    return wg.reshape(wg.shape[0], -1)[:, :in_features]


def qrange(bits: int) -> tuple[int, int]:
    """Unsigned code range [0, 2**bits - 1]."""
    check_bits(bits)
    return 0, (1 << bits) - 1


def choose_qparams(
    wg: torch.Tensor,
    bits: int,
    symmetric: bool,
    shrink: torch.Tensor | float = 1.0,
    scale_round: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and integer zero point per group.

    wg: [..., group_size] values of each group; shrink: [...] or scalar in (0, 1], the fraction
    of the group's range kept (1.0 = min/max, smaller clips outliers); scale_round: how a scale
    is rounded up to what is stored (default: float16, round_scale_up; integer scales:
    formats/integer_scale.round_scale).
    Returns scale (representable, in float32) and zero (float32 holding integers), both [...].
    """
    _, qmax = qrange(bits)
    wg = wg.float()
    if symmetric:
        amax = wg.abs().amax(dim=-1) * shrink
        half = 1 << (bits - 1)
        # 1-bit symmetric has no positive level; use the full step so +-amax round to 0 / -1.
        scale = amax / max(half - 1, 1)
        zero = torch.full_like(scale, float(half))
    else:
        wmin = wg.amin(dim=-1).clamp(max=0) * shrink
        wmax = wg.amax(dim=-1).clamp(min=0) * shrink
        scale = (wmax - wmin) / qmax
    scale = (scale_round or round_scale_up)(scale.clamp(min=MIN_SCALE))
    if not symmetric:
        zero = torch.round(-wmin / scale).clamp(0, qmax)
    return scale, zero


def round_scale_up(scale: torch.Tensor) -> torch.Tensor:
    """The smallest float16 value >= scale, returned as float32.

    Rounding the scale up (not to nearest) keeps the group's whole range representable, so no
    value is clipped by more than half a step because of the storage dtype.
    """
    s16 = scale.to(SCALE_DTYPE)
    below = s16.float() < scale
    s16 = torch.where(below, torch.nextafter(s16, torch.tensor(float("inf"), dtype=SCALE_DTYPE)), s16)
    return s16.float()


def quantize_groups(
    wg: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int
) -> torch.Tensor:
    """wg [..., gs], scale/zero [...] -> uint8 codes [..., gs]."""
    _, qmax = qrange(bits)
    q = torch.round(wg.float() / scale.unsqueeze(-1)) + zero.unsqueeze(-1)
    return q.clamp_(0, qmax).to(torch.uint8)


def dequantize_groups(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """codes [..., gs] uint8, scale/zero [...] -> float32 [..., gs]."""
    return (codes.float() - zero.float().unsqueeze(-1)) * scale.float().unsqueeze(-1)


def quantize(
    w: torch.Tensor,
    bits: int,
    group_size: int,
    symmetric: bool = False,
    shrink: torch.Tensor | float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Round-to-nearest of a whole weight. w [out, in] -> codes [out, in], scale, zero [out, G]."""
    wg = group_view(w, group_size)
    scale, zero = choose_qparams(wg, bits, symmetric, shrink)
    codes = quantize_groups(wg, scale, zero, bits)
    return ungroup(codes, w.shape[1]), scale, zero


def dequantize(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, group_size: int) -> torch.Tensor:
    """codes [out, in], scale/zero [out, G] -> float32 [out, in]."""
    n_in = codes.shape[1]
    return ungroup(dequantize_groups(group_view(codes, group_size), scale, zero), n_in)


def search_shrink(
    w: torch.Tensor,
    bits: int,
    group_size: int,
    symmetric: bool = False,
    grid: int = 20,
    max_shrink: float = 0.8,
    norm: float = 2.4,
    weight: torch.Tensor | None = None,
    scale_round: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """Clipping search: per group, the range shrink in [1 - max_shrink, 1] minimizing error.

    The error of a group is sum(|w - w'|**norm * weight) over its elements, where `weight`
    ([in] or [out, in], e.g. a Hessian diagonal) defaults to 1. Ties keep the larger range.
    Returns shrink factors [out, G].
    """
    if grid < 1 or not 0.0 <= max_shrink < 1.0:
        raise ConfigError(f"clip search needs grid >= 1 and 0 <= max_shrink < 1, got {grid}, {max_shrink}")
    wg = group_view(w.float(), group_size)
    if weight is not None:
        weight = group_view(weight.float().expand(w.shape), group_size)
    best_err = torch.full(wg.shape[:2], float("inf"))
    best = torch.ones(wg.shape[:2])
    _, qmax = qrange(bits)
    for i in range(grid + 1):
        ratio = 1.0 - max_shrink * i / grid
        scale, zero = choose_qparams(wg, bits, symmetric, ratio, scale_round)
        s, z = scale.unsqueeze(-1), zero.unsqueeze(-1)
        # |dequantize(quantize(wg)) - wg| ** norm, in place on one temporary
        err = torch.div(wg, s).round_().add_(z).clamp_(0, qmax).sub_(z).mul_(s).sub_(wg).abs_().pow_(norm)
        if weight is not None:
            err.mul_(weight)
        err = err.sum(-1)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best = torch.where(better, torch.full_like(best, ratio), best)
    return best
