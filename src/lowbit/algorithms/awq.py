"""Activation-aware smoothing (AWQ, Lin et al. 2023; SmoothQuant+ style scale form).

A linear layer y = x W^T is unchanged by y = (x / s) (W diag(s))^T for any per-input-channel
s > 0. Quantizing W diag(s) instead of W protects the input channels that carry large
activations: their weights get larger before rounding, so their relative rounding error shrinks.
The division x / s is folded into the op that produces x (a norm's weight, or the rows of the
previous linear layer), so the smoothed model computes exactly what the original did.

    a_j = mean |x_j| over calibration tokens,   w_j = mean over rows of |W_ij| / max_group |W|
    s_j(alpha) = a_j^alpha / w_j^(1 - alpha)    (duo scaling; a_j^alpha without the w term)

alpha is searched on a grid per group of layers that share an input, minimizing the output
error sum_l || X (Q(W_l diag(s)) diag(s)^-1 - W_l)^T ||^2 on calibration tokens; s = 1 is
always a candidate, so smoothing never increases the searched loss. After smoothing, AWQ's
clipping search picks, per group of weights, the range shrink with the least output error.

Tensor functions here; `fold_scales` is the one place that edits modules. `awq_rtn_quantize` is
`--method awq`'s quantizer of a smoothed layer.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from lowbit.algorithms.rtn import rtn_quantize
from lowbit.errors import ShapeError
from lowbit.formats import affine
from lowbit.qtensor import QuantFormat, QuantizedWeight
from lowbit.recipes import ClipConfig


def compress_inputs(x: torch.Tensor) -> torch.Tensor:
    """x [n, in] -> Z with Z^T Z = x^T x and at most `in` rows (the R factor of x when n > in).

    Every output-error loss below is ||Z D^T||^2 for some weight difference D, so this keeps the
    losses exact while bounding their cost by in * min(n, in) per output row.
    """
    x = x.float()
    if x.shape[0] > x.shape[1]:
        return torch.linalg.qr(x, mode="r").R
    return x


def output_error(z: torch.Tensor, delta: torch.Tensor) -> float:
    """sum over tokens and outputs of (x . delta_row)^2, with z from compress_inputs."""
    return float((z @ delta.T).pow(2).sum())


def fake_quantize(w: torch.Tensor, bits: int, group_size: int, symmetric: bool = False) -> torch.Tensor:
    """Round-to-nearest (min/max range) and back: the quantizer the scale search assumes.

    Asymmetric groups take the lean path below (the search calls this ~20 times per layer; it
    skips the float16 rounding of the stored scales, which moves results by < 0.1%).
    """
    if symmetric:
        codes, scale, zero = affine.quantize(w, bits, group_size, symmetric)
        return affine.dequantize(codes, scale, zero, affine.resolve_group_size(w.shape[1], group_size))
    qmax = (1 << bits) - 1
    wg = affine.group_view(w.float(), group_size)
    lo = wg.amin(dim=-1, keepdim=True).clamp_(max=0)
    hi = wg.amax(dim=-1, keepdim=True).clamp_(min=0)
    scale = hi.sub_(lo).div_(qmax).clamp_(min=affine.MIN_SCALE)
    zero = lo.div_(scale).neg_().round_()
    q = wg.div(scale).round_().add_(zero).clamp_(0, qmax).sub_(zero).mul_(scale)
    return affine.ungroup(q, w.shape[1])


def weight_statistic(weights: list[torch.Tensor], group_size: int) -> torch.Tensor:
    """w_j: mean over all rows of the layers of |W_ij| / (max |W| of its group) -> [in]."""
    parts = []
    for w in weights:
        wg = affine.group_view(w.float().abs(), group_size)
        wg = wg / wg.amax(dim=-1, keepdim=True).clamp(min=1e-12)
        parts.append(affine.ungroup(wg, w.shape[1]))
    return torch.cat(parts, 0).mean(0)


def smooth_scales(act: torch.Tensor, wstat: torch.Tensor | None, alpha: float) -> torch.Tensor:
    """s = a^alpha / w^(1-alpha) (or a^alpha when wstat is None), normalized so that
    max(s) * min(s) = 1 (the geometric middle of the range stays put)."""
    a = act.float().clamp(min=act.max().item() * 1e-5 + 1e-12)
    s = a.pow(alpha)
    if wstat is not None:
        w = wstat.float().clamp(min=wstat.max().item() * 1e-5 + 1e-12)
        s = s / w.pow(1 - alpha)
    s = s / (s.max() * s.min()).sqrt()
    return s.clamp(1e-4, 1e4)


@dataclass(frozen=True)
class ScaleSearch:
    scales: torch.Tensor     # [in], 1 where no smoothing won
    alpha: float | None      # None: s = 1 (no smoothing) had the least error
    loss: float              # output error at the chosen scales
    identity_loss: float     # output error without smoothing


def search_scales(
    z: torch.Tensor,
    act: torch.Tensor,
    weights: list[torch.Tensor],
    bits: int,
    group_size: int,
    symmetric: bool = False,
    grid: int = 20,
    duo_scaling: bool = True,
) -> ScaleSearch:
    """The per-input-channel scales for layers sharing one input.

    z: compressed calibration inputs (compress_inputs), act: mean |x| per channel [in],
    weights: the layers' weights [out_l, in]. The quantizer is round-to-nearest at bits/group_size.
    """
    n_in = act.shape[0]
    if any(w.shape[1] != n_in for w in weights) or z.shape[1] != n_in:
        raise ShapeError(f"scale search: inputs have {z.shape[1]} channels, act {n_in}, weights "
                         f"{[tuple(w.shape) for w in weights]}")
    weights = [w.float() for w in weights]
    wstat = weight_statistic(weights, group_size) if duo_scaling else None

    def loss_at(s: torch.Tensor) -> float:
        return sum(output_error(z, fake_quantize(w * s, bits, group_size, symmetric) / s - w) for w in weights)

    identity = loss_at(torch.ones(n_in))
    best = ScaleSearch(torch.ones(n_in), None, identity, identity)
    for i in range(grid):
        alpha = i / grid
        s = smooth_scales(act, wstat, alpha)
        loss = loss_at(s)
        if loss < best.loss:
            best = ScaleSearch(s, alpha, loss, identity)
    return best


@torch.no_grad()
def fold_scales(prev: nn.Module, linears: list[nn.Linear], s: torch.Tensor, norm_offset: float = 0.0) -> None:
    """Divide prev's output channels by s and multiply the linears' input channels by s, in place.

    prev is a norm (output = normalized * (norm_offset + weight) [+ bias]) or an nn.Linear.
    The composed function is unchanged up to float rounding.
    """
    s = s.float()
    if isinstance(prev, nn.Linear):
        prev.weight.data = (prev.weight.float() / s[:, None]).to(prev.weight.dtype)
    else:
        w = prev.weight.float()
        prev.weight.data = ((norm_offset + w) / s - norm_offset).to(prev.weight.dtype)
    bias = getattr(prev, "bias", None)
    if bias is not None:
        bias.data = (bias.float() / s).to(bias.dtype)
    for lin in linears:
        lin.weight.data = (lin.weight.float() * s).to(lin.weight.dtype)


def search_clip_output(
    w: torch.Tensor,
    z: torch.Tensor,
    bits: int,
    group_size: int,
    symmetric: bool = False,
    grid: int = 20,
    max_shrink: float = 0.5,
) -> torch.Tensor:
    """AWQ's clipping search: per (row, group), the range shrink in [1 - max_shrink, 1] with the
    least output error on the group's own inputs, sum_t (x_t,g . (w_g - q_g))^2.

    Uses the block-diagonal part of Z^T Z (one gs x gs block per group). Returns [out, G].
    """
    gs = affine.resolve_group_size(w.shape[1], group_size)
    wg = affine.group_view(w.float(), gs)                      # [out, G, gs]
    zg = affine.group_view(z.float(), gs)                      # [m, G, gs]
    hblocks = torch.einsum("mgi,mgj->gij", zg, zg)             # [G, gs, gs]
    best_err = torch.full(wg.shape[:2], float("inf"))
    best = torch.ones(wg.shape[:2])
    for i in range(grid + 1):
        ratio = 1.0 - max_shrink * i / grid
        scale, zero = affine.choose_qparams(wg, bits, symmetric, ratio)
        d = affine.dequantize_groups(affine.quantize_groups(wg, scale, zero, bits), scale, zero) - wg
        err = torch.einsum("ogi,gij,ogj->og", d, hblocks, d)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best = torch.where(better, torch.full_like(best, ratio), best)
    return best


def awq_rtn_quantize(
    w: torch.Tensor, inputs: torch.Tensor, fmt: QuantFormat, clip: ClipConfig | None, output_clip: bool = True
) -> QuantizedWeight:
    """Round-to-nearest in `fmt` of a smoothed layer w [out, in], its ranges from AWQ's output-error
    clipping search on its sampled inputs [n, in] (or, without `output_clip`, from the weight-error
    search `clip`)."""
    if not output_clip:
        return rtn_quantize(w, fmt, clip)
    shrink = search_clip_output(w, compress_inputs(inputs), fmt.bits, fmt.group_size, fmt.symmetric)
    return rtn_quantize(w, fmt, shrink=shrink)
