"""The scale search of lowbit's K-quant encoder, vectorised over all super-blocks at once.

A K-quant super-block stores a float16 scale d (and min scale dmin) and, per sub-block j, small
integers sc[j] (and m[j]); weight i of sub-block j decodes to d*sc[j] * k - dmin*m[j], where the
level k is the code (types with mins) or the code minus a fixed zero (the symmetric types). The
objective is sum imp * (w - value)^2 with the values as stored. The search, in three steps:

1. per sub-block, a float (scale, min) (or a signed scale alone): a grid of range factors (and,
   with mins, offsets) around the sub-block's min/max, each rounded and refitted by weighted least
   squares, the best kept (this module);
2. the integers against d (and dmin): many d, dmin candidates scored on a quadratic model of the
   error around the float optimum (cheap: one number per sub-block), the best kept (this module);
3. on the exact stored values: alternate a weighted least-squares refit of (d, dmin) with the
   integers and levels fixed, and a +-1 search of each sub-block's integers with d fixed, keeping
   every super-block's best so far (kquants_refine.py).

CPU note: torch.where and boolean masks cost several times a multiply here, so choices between
candidates are made as 0/1 interpolations (`pick`) of finite values.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

F16_MAX = 65504.0


@dataclass(frozen=True)
class KGrid:
    """A K quant's geometry, and how hard the search looks."""

    sub: int          # weights per sub-block
    nmax: int         # largest code
    zero: int         # the level of code c is c - zero (0 for the types with mins)
    sc_lo: int        # range of the integer sub-scale
    sc_hi: int
    m_hi: int         # integer mins in 0..m_hi; 0: a symmetric type, no mins
    span: tuple[float, float]  # step 1: range factors (1 + t), `count` t evenly in span, relative
    count: int                 # to the plain min/max (or largest weight) mapping,
    shifts: tuple[float, ...] = (0.0,)  # times these offsets of the rounding, in levels (with mins)
    both_ends: bool = True     # symmetric types: the largest weight also tried at the top level
    polish: int = 1            # then re-rounds at the best scale (and min), each refitted
    rounds: int = 3            # step 3: alternations of refit and integer search

    @property
    def has_min(self) -> bool:
        return self.m_hi > 0

    @property
    def k_lo(self) -> int:
        return -self.zero

    @property
    def k_hi(self) -> int:
        return self.nmax - self.zero


@dataclass
class KFit:
    """The stored scales: d, dmin float16 [N]; sc, m integers [N, S] (int16 once the search is
    done; dmin, m zero without mins)."""

    d: torch.Tensor
    dmin: torch.Tensor
    sc: torch.Tensor
    m: torch.Tensor


def to_f16(x: torch.Tensor) -> torch.Tensor:
    """float32 -> float16, never inf or nan."""
    return x.nan_to_num(0.0, F16_MAX, -F16_MAX).clamp(-F16_MAX, F16_MAX).to(torch.float16)


def div0(a: torch.Tensor | float, b: torch.Tensor) -> torch.Tensor:
    """a / b, 0 where b is 0."""
    zero = (b == 0).float()
    return a * (1 - zero) / (b + zero)


def pick(better: torch.Tensor, new: torch.Tensor, old: torch.Tensor) -> torch.Tensor:
    """torch.where(better, new, old) for finite floats, as an exact 0/1 interpolation."""
    return torch.lerp(old, new, better.to(old.dtype))


def _keep(best, cand):
    """Element-wise the better of two candidates (err, ...) by their first entry."""
    if best is None:
        return cand
    m = (cand[0] < best[0]).float()
    return tuple(torch.lerp(o, c, m) for c, o in zip(cand, best))


# -- step 1: one float (scale, min) per sub-block ---------------------------------------------------

def _factors_of(g: KGrid) -> list[float]:
    return [1.0 + float(t) for t in torch.linspace(g.span[0], g.span[1], g.count)]


def _affine_refit(w, wx, k, base):
    """Weighted least squares of x ~ scale * k - mn (scale, mn >= 0) over each sub-block, levels
    fixed; base = (sum w, sum wx, sum wxx). -> (err, scale, mn, sum wkk, sum wk, sum w), each [M]."""
    s1, sx, sxx = base
    wk = w * k
    sk, skk, skx = wk.sum(-1), (wk * k).sum(-1), (wx * k).sum(-1)
    det = s1 * skk - sk * sk
    # finite even where det is a rounding residue (and unused there): pick interpolates
    scale_u = div0(s1 * skx - sx * sk, det).nan_to_num_(0.0, 0.0, 0.0)
    off_u = div0(skk * sx - sk * skx, det).nan_to_num_(0.0, 0.0, 0.0)
    free = (det > 1e-6 * s1 * skk) & (off_u <= 0) & (scale_u >= 0)
    # else the min at 0 (or, where every level is 0, the min alone)
    scale = pick(free, scale_u, div0(skx, skk).clamp(min=0.0))
    off = pick(free, off_u, div0(sx, s1).clamp(max=0.0) * (skk == 0))
    err = sxx - 2 * scale * skx - 2 * off * sx + scale * scale * skk + 2 * scale * off * sk + off * off * s1
    return err, scale, -off, skk, sk, s1


def float_affine(x: torch.Tensor, w: torch.Tensor, g: KGrid) -> tuple[torch.Tensor, ...]:
    """x, w [M, n] -> scale, mn [M] (values scale*k - mn, mn >= 0) and the level sums
    (sum wkk, sum wk, sum w) of the chosen levels, for the quadratic model of step 2."""
    lo = x.amin(-1, keepdim=True).clamp(max=0.0)
    inv = div0(torch.ones_like(lo), x.amax(-1, keepdim=True) - lo)
    xl, wx = x - lo, w * x
    base = (w.sum(-1), wx.sum(-1), (wx * x).sum(-1))
    best = None
    for t in _factors_of(g):
        c = inv * (g.nmax * t)
        for u in g.shifts:
            k = (xl * c).add_(u).round_().clamp_(0, g.nmax)
            best = _keep(best, _affine_refit(w, wx, k, base))
    for _ in range(g.polish):                            # re-round at the refitted scale and min
        k = (x + best[2][:, None]).mul_(div0(1.0, best[1])[:, None]).round_().clamp_(0, g.nmax)
        best = _keep(best, _affine_refit(w, wx, k, base))
    return best[1:]


def _scale_refit(w, wx, k, sxx):
    """Weighted least squares of x ~ scale * k, levels fixed. -> (err, scale, sum wkk), each [M]."""
    skk, skx = (w * k * k).sum(-1), (wx * k).sum(-1)
    scale = div0(skx, skk)
    return sxx - scale * skx, scale, skk


def float_symmetric(x: torch.Tensor, w: torch.Tensor, g: KGrid) -> tuple[torch.Tensor, ...]:
    """x, w [M, n] -> signed scale [M] (values scale*k, k in k_lo..k_hi) and (sum wkk,) of the
    chosen levels. The largest-magnitude weight goes near the bottom level (and the top one)."""
    big = x.gather(-1, x.abs().argmax(-1, keepdim=True))
    inv = div0(torch.ones_like(big), big)
    wx = w * x
    sxx = (wx * x).sum(-1)
    best = None
    for end in (g.k_lo, g.k_hi) if g.both_ends else (g.k_lo,):
        for t in _factors_of(g):
            k = (x * (inv * (end * t))).round_().clamp_(g.k_lo, g.k_hi)
            best = _keep(best, _scale_refit(w, wx, k, sxx))
    for _ in range(g.polish):
        k = (x * div0(1.0, best[1])[:, None]).round_().clamp_(g.k_lo, g.k_hi)
        best = _keep(best, _scale_refit(w, wx, k, sxx))
    return best[1:]


# -- step 2: the integers, on a quadratic model of the error ----------------------------------------

def _model_error(ds, dm, hkk, hk, h1):
    """The weighted error a sub-block gains when its (scale, min) move by (ds, dm)."""
    return hkk * ds * ds - 2 * hk * ds * dm + h1 * dm * dm


def _floor_ceil(a: torch.Tensor, hi: int) -> tuple[torch.Tensor, torch.Tensor]:
    f = a.floor()
    return f.clamp(0, hi), (f + 1).clamp(0, hi)


def round_affine(s, mn, d, dmin, h, g: KGrid) -> tuple[torch.Tensor, torch.Tensor]:
    """The best (sc, m) of floor/ceil of s/d, mn/dmin on the model; d, dmin broadcast to s."""
    scs, ms = _floor_ceil(div0(s, d), g.sc_hi), _floor_ceil(div0(mn, dmin), g.m_hi)
    best = None
    for sc in scs:
        for m in ms:
            best = _keep(best, (_model_error(d * sc - s, dmin * m - mn, *h), sc, m))
    return best[1], best[2]


def _model_floor(s, mn, d, dmin, h, g: KGrid) -> torch.Tensor:
    """The model error of round_affine's choice (the least over floor/ceil), summed over sub-blocks."""
    scs, ms = _floor_ceil(div0(s, d), g.sc_hi), _floor_ceil(div0(mn, dmin), g.m_hi)
    ds = [d * sc - s for sc in scs]
    dm = [dmin * m - mn for m in ms]
    return torch.stack([_model_error(a, b, *h) for a in ds for b in dm]).amin(0).sum(-1)


TOP = 11  # the index of the plain "largest sub-scale / top integer" among the candidates


def _divisors(top: int) -> torch.Tensor:
    """Candidate divisors t: d = (largest sub-scale) / t, from 3/4 of the top integer to just past
    it (past it, the largest sub-scale clips to the top integer)."""
    return torch.cat([torch.linspace(0.75 * top, top, TOP + 1), top + torch.tensor([0.25, 0.5, 0.75, 1.0])])


def _f16_grid(d: torch.Tensor) -> torch.Tensor:
    """Candidates as float16 will store them, but never rounded to 0 from a value that is not."""
    return to_f16(d.sign() * d.abs().clamp(min=2.0 ** -24)).float()


def integers_affine(s, mn, h, g: KGrid) -> tuple[torch.Tensor, torch.Tensor]:
    """s, mn, h [N, S] -> d, dmin float32 [N]: coordinate search over candidates on the model."""
    d_all = _f16_grid(s.amax(-1, keepdim=True)[:, None] / _divisors(g.sc_hi)[None, :, None])  # [N, K, 1]
    dm_all = _f16_grid(mn.amax(-1, keepdim=True)[:, None] / _divisors(g.m_hi)[None, :, None])
    hk = tuple(v[:, None] for v in h)
    dmin = dm_all[:, TOP]
    for _ in range(2):
        e = _model_floor(s[:, None], mn[:, None], d_all, dmin[:, None], hk, g)
        d = d_all.squeeze(-1).gather(1, e.argmin(1, keepdim=True))
        e = _model_floor(s[:, None], mn[:, None], d[:, None], dm_all, hk, g)
        dmin = dm_all.squeeze(-1).gather(1, e.argmin(1, keepdim=True))
    return d.squeeze(1), dmin.squeeze(1)


def integers_symmetric(s, hkk, g: KGrid) -> torch.Tensor:
    """s, hkk [N, S] -> d float32 [N]: the largest-magnitude sub-scale tried near either end."""
    big = s.gather(-1, s.abs().argmax(-1, keepdim=True))             # [N, 1]
    t = torch.cat([-_divisors(-g.sc_lo), _divisors(g.sc_hi)])[None, :]   # [1, K]
    d_all = _f16_grid(big / t)                                       # [N, K]
    sc = div0(s[:, None], d_all[..., None]).round().clamp(g.sc_lo, g.sc_hi)
    e = (hkk[:, None] * (d_all[..., None] * sc - s[:, None]) ** 2).sum(-1)
    return d_all.gather(1, e.argmin(1, keepdim=True)).squeeze(1)
