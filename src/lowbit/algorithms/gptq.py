"""GPTQ: column-by-column quantization that compensates each column's error on the columns not
yet quantized, using the inverse Hessian of the layer's reconstruction loss (Frantar et al., 2022).

    H = 2/n * sum_x x x^T        (accumulated by calibration/hessian.py)
    for each column j (in blocks, lazily updating the rest of the matrix):
        q_j = quant(w_j);  e = (w_j - q_j) / [H^-1]_jj;  w_{k>j} -= e * [H^-1]_jk

Options: dampening (escalated when the Cholesky factorization fails), act-order (columns by
decreasing diag(H)), static groups (group params fixed from the unmodified weight, so act-order
needs no stored permutation) and block-wise lazy updates.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch

from lowbit.algorithms.rtn import group_qparams, integer_scale_grid
from lowbit.dtypes import all_finite
from lowbit.errors import ConfigError, ShapeError
from lowbit.formats import affine
from lowbit.qtensor import QuantFormat, QuantizedWeight
from lowbit.recipes import ClipConfig, GPTQConfig

log = logging.getLogger(__name__)

DAMP_ESCALATION = (1, 10, 100)  # multiples of the configured damp tried in turn


@dataclass(frozen=True)
class GPTQResult:
    qweight: QuantizedWeight
    loss: float        # sum over columns of err^2 / [H^-1]_jj (GPTQ's proxy loss)
    damp_used: float   # fraction of mean(diag H) finally added; differs from the config if escalated;
                       # inf when the Hessian never factorized (see fallback)

    @property
    def fallback(self) -> bool:
        """True when the Hessian would not factorize at any damping, so the layer was quantized
        with the identity in its place: plain round-to-nearest, no error compensation."""
        return not math.isfinite(self.damp_used)


def inverse_hessian_cholesky(H: torch.Tensor, damp: float) -> tuple[torch.Tensor, float]:
    """Upper Cholesky factor of (H + damp * mean(diag H) * I)^-1, escalating damp on failure;
    a zero on H's diagonal (a dead input column) counts as 1. H is not changed.

    The factorization, inversion and second factorization run in place on one copy of H, held
    column-major (the layout LAPACK works in, so torch makes no copy of its own): one [n, n]
    matrix besides H at any time, where the plain chain holds three (0.32 GB each for a 1.5B
    model's down_proj, 1.4 GB for a 7B's).

    Returns (U, damp_used). If every escalation fails (a singular or non-finite H), returns the
    identity and damp_used = inf: plain round-to-nearest for this layer. The caller must report
    that (GPTQResult.fallback; the quantize pipeline records it per layer and in its exit status).
    """
    n = H.shape[0]
    diag = torch.diag(H).float()
    diag[diag == 0] = 1.0
    mean_diag = torch.mean(diag).item()
    if not mean_diag > 0:
        mean_diag = 1.0
    work = torch.empty(n, n, dtype=torch.float32)
    col = work.mT  # column-major view: LAPACK's layout
    info = torch.empty((), dtype=torch.int32)
    for mult in DAMP_ESCALATION:
        d = damp * mult
        col.copy_(H)
        col.diagonal().copy_(diag + d * mean_diag)
        torch.linalg.cholesky_ex(col, out=(col, info))
        if info == 0:
            torch.cholesky_inverse(col, out=col)
            torch.linalg.cholesky_ex(col, upper=True, out=(col, info))
            if info == 0 and all_finite(work):
                if mult > 1:
                    log.warning("Hessian not positive definite at damp=%g; succeeded with damp=%g", damp, d)
                return transpose_square_(work), d
    log.info(
        "Hessian would not factorize even with damp=%g; using the identity (round-to-nearest) for this layer",
        damp * DAMP_ESCALATION[-1],
    )
    return torch.eye(n, dtype=torch.float32), float("inf")


def transpose_square_(m: torch.Tensor, block: int = 512) -> torch.Tensor:
    """Transpose the square row-major matrix m in place, swapping blocks of `block` x `block`
    (one block of scratch memory instead of a second matrix); returns m."""
    n = m.shape[0]
    for i in range(0, n, block):
        for j in range(i, n, block):
            upper = m[i:i + block, j:j + block].clone()
            if j != i:
                m[i:i + block, j:j + block] = m[j:j + block, i:i + block].T
            m[j:j + block, i:i + block] = upper.T
    return m


def feed_back(W1: torch.Tensor, Err1: torch.Tensor, Hinv1: torch.Tensor, i: int, dq: torch.Tensor,
              loss: torch.Tensor) -> None:
    """GPTQ's step after column i of the lazy batch W1 is rounded to dq: its scaled error goes into
    Err1 (for the later batches) and onto the batch's remaining columns; loss accumulates (in place)."""
    wcol = W1[:, i]
    d = Hinv1[i, i]
    err = (wcol - dq) / d
    loss += (wcol - dq) ** 2 / d**2
    W1[:, i:] -= err.unsqueeze(1) * Hinv1[i, i:].unsqueeze(0)
    Err1[:, i] = err


def gptq_quantize(
    w: torch.Tensor,
    H: torch.Tensor,
    fmt: QuantFormat,
    config: GPTQConfig = GPTQConfig(),  # noqa: B008 - frozen
    clip: ClipConfig | None = None,
    group_bits: torch.Tensor | None = None,
    clip_weight: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
) -> GPTQResult:
    """w [out, in], H [in, in] (float32), fmt (resolved for w's width) -> GPTQResult holding the
    QuantizedWeight.

    group_bits (uint8 [G], optional): each column group's own width (mixed precision); the
    record's fmt.bits is then the widest of them. clip_weight(values [out, gs], d [gs]) -> [out, gs]
    (optional): weights of the clipping search's error for one group, given its current values
    and the diagonal d of the Cholesky factor for its columns (SliM-LLM's salience-weighted
    quantizer calibration). Integer scales (fmt.scale_bits): each row's multiplier is fixed up
    front from the round-to-nearest scales of the unmodified weight, and every group scale GPTQ
    picks is rounded up onto that row's integer grid.
    """
    out_f, in_f = w.shape
    if fmt.grid != "affine":
        raise ConfigError(f"GPTQ updates weights for affine codes; grid {fmt.grid!r} is quantized by round-to-nearest")
    if group_bits is not None:
        if config.act_order and not config.static_groups:
            raise ConfigError("per-group widths need the original column order: with act_order, "
                              "also set static_groups (gptq.static_groups = true)")
        fmt = replace(fmt, bits=int(group_bits.max()))
    if affine.resolve_group_size(in_f, fmt.group_size) != fmt.group_size:
        raise ShapeError(f"format group size {fmt.group_size} is not resolved for a weight {in_f} wide")
    bits, gs, symmetric = fmt.bits, fmt.group_size, fmt.symmetric
    mult = scale_round = None
    if fmt.scale_bits:
        mult, scale_round = integer_scale_grid(w, fmt, clip, group_bits)

    def width(g: int) -> int:
        return bits if group_bits is None else int(group_bits[g])
    W = w.detach().float().clone()
    H = H.detach().float()  # read, never written: inverse_hessian_cholesky works on its own copy
    dead = torch.diag(H) == 0
    W[:, dead] = 0.0

    static: tuple[torch.Tensor, torch.Tensor] | None = None
    if config.act_order and config.static_groups:
        wg = affine.group_view(W, gs)
        static = (torch.zeros(wg.shape[:2]), torch.zeros(wg.shape[:2]))  # [out, G] each
        for g in range(wg.shape[1]):
            s_, z_ = group_qparams(wg[:, g : g + 1], width(g), symmetric, clip, scale_round=scale_round)
            static[0][:, g], static[1][:, g] = s_[:, 0], z_[:, 0]

    perm = None
    if config.act_order:
        diag = torch.diag(H)
        diag[dead] = 1.0
        perm = torch.argsort(diag, descending=True)
        W, H = W[:, perm], H[perm][:, perm]

    Hinv, damp_used = inverse_hessian_cholesky(H, config.damp)

    codes = torch.zeros(out_f, in_f, dtype=torch.uint8)     # in processing order
    scales = torch.zeros(out_f, affine.n_groups(in_f, gs))
    zeros = torch.zeros(out_f, affine.n_groups(in_f, gs))
    loss = torch.zeros(out_f)
    scale = zero = None
    B = config.block_size
    for i1 in range(0, in_f, B):
        i2 = min(i1 + B, in_f)
        W1 = W[:, i1:i2].clone()
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = i1 + i
            if static is not None:
                g = int(perm[col]) // gs
                scale, zero = static[0][:, g], static[1][:, g]
            elif col % gs == 0:
                g = col // gs
                # the group's current (error-updated) values: rest of this block, then later blocks
                cur = torch.cat([W1[:, i:], W[:, i2:i2 + gs]], dim=1)[:, :gs]
                weight = None
                if clip_weight is not None:
                    weight = clip_weight(cur, torch.diag(Hinv)[col : col + cur.shape[1]]).unsqueeze(1)
                s, z = group_qparams(cur.unsqueeze(1), width(g), symmetric, clip, weight, scale_round)
                scale, zero = s[:, 0], z[:, 0]
                scales[:, g], zeros[:, g] = scale, zero
            wcol = W1[:, i]
            q = affine.quantize_groups(wcol.unsqueeze(1), scale, zero, width(g))[:, 0]
            codes[:, col] = q
            dq = (q.float() - zero) * scale
            feed_back(W1, Err1, Hinv1, i, dq, loss)
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]

    if static is not None:
        # codes back to the original column order; groups were defined in that order
        inv = torch.argsort(perm)
        codes = codes[:, inv]
        scales, zeros = static
        perm = None
    qw = QuantizedWeight.from_float_qparams(codes, scales, zeros, fmt, perm=perm, group_bits=group_bits,
                                            scale_mult=mult)
    return GPTQResult(qw, float(loss.sum()) / 2, damp_used)
