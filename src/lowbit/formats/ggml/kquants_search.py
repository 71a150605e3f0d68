"""The scale search of lowbit's K-quant encoder, vectorised over all super-blocks at once.

A K-quant super-block stores a float16 scale d (and min scale dmin) and, per sub-block j, small
integers sc[j] (and m[j]); weight i of sub-block j decodes to d*sc[j] * k - dmin*m[j], where the
level k is the code (types with mins) or the code minus a fixed zero (the symmetric types). The
objective is sum imp * (w - value)^2 with the values as stored. The search, in three steps:

1. per sub-block, a float (scale, min) (or a signed scale alone): several range factors around the
   sub-block's min/max, each rounded and refitted by weighted least squares, the best kept;
2. the integers against d (and dmin): many d, dmin candidates scored on a quadratic model of the
   error around the float optimum (cheap: one number per sub-block), the best kept;
3. on the exact stored values: alternate a weighted least-squares refit of (d, dmin) with the
   integers and levels fixed, and a +-1 search of each sub-block's integers with d fixed, keeping
   every super-block's best so far.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

F16_MAX = 65504.0


@dataclass(frozen=True)
class KGrid:
    """A K quant's geometry, as the search sees it."""

    sub: int          # weights per sub-block
    nmax: int         # largest code
    zero: int         # the level of code c is c - zero (0 for the types with mins)
    sc_lo: int        # range of the integer sub-scale
    sc_hi: int
    m_hi: int         # integer mins in 0..m_hi; 0: a symmetric type, no mins
    span: tuple[float, float]  # float search: the range factors tried, relative to the plain
    count: int                 # min/max mapping: (1 + t) for `count` t evenly in span
    polish: int = 1   # then re-rounds at the best scale (and min), each refitted
    rounds: int = 3   # alternations of refit and integer search

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
    """A search result: d, dmin float16 [N]; sc, m int16 [N, S] (dmin, m zero without mins)."""

    d: torch.Tensor
    dmin: torch.Tensor
    sc: torch.Tensor
    m: torch.Tensor


def to_f16(x: torch.Tensor) -> torch.Tensor:
    """float32 -> float16, never inf or nan."""
    return x.nan_to_num(0.0, F16_MAX, -F16_MAX).clamp(-F16_MAX, F16_MAX).to(torch.float16)


def _div(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a / b, 0 where b is 0."""
    ok = b != 0
    return torch.where(ok, a / torch.where(ok, b, 1.0), 0.0)


# -- step 1: one float (scale, min) per sub-block ---------------------------------------------------

def _sums(x: torch.Tensor, w: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """x, w, k [..., n] -> (sum w, sum wk, sum wkk, sum wx, sum wkx), each [...]."""
    wk = w * k
    return w.sum(-1), wk.sum(-1), (wk * k).sum(-1), (w * x).sum(-1), (wk * x).sum(-1)


def _span(g: KGrid) -> list[float]:
    return [1.0 + float(t) for t in torch.linspace(g.span[0], g.span[1], g.count)]


def _keep(best, cand):
    """Element-wise the better of two candidates (err, ...) by their first entry."""
    if best is None:
        return cand
    better = cand[0] < best[0]
    return tuple(torch.where(better, c, o) for c, o in zip(cand, best))


def _affine_refit(x, w, k, sxx):
    """Weighted least squares of x ~ scale * k - mn (mn >= 0) over each sub-block, levels fixed.
    -> (err, scale, mn, sum wkk, sum wk, sum w), each [M]."""
    s1, sk, skk, sx, skx = _sums(x, w, k)
    det = s1 * skk - sk * sk
    ok = det > 1e-6 * s1 * skk
    scale = _div(s1 * skx - sx * sk, det)
    off = _div(skk * sx - sk * skx, det)
    one = ~ok | (off > 0)                                 # the min is kept <= 0: the scale alone
    scale = torch.where(one, _div(skx, skk), scale).clamp(min=0.0)
    off = torch.where(one, torch.where(skk > 0, 0.0, _div(sx, s1).clamp(max=0.0)), off)
    err = sxx - 2 * scale * skx - 2 * off * sx + scale * scale * skk + 2 * scale * off * sk + off * off * s1
    return err, scale, -off, skk, sk, s1


def float_affine(x: torch.Tensor, w: torch.Tensor, g: KGrid) -> tuple[torch.Tensor, ...]:
    """x, w [M, n] -> scale, mn [M] (values scale*k - mn, mn >= 0) and the level sums
    (sum wkk, sum wk, sum w) of the chosen levels, for the quadratic model of step 2."""
    lo = x.amin(-1, keepdim=True).clamp(max=0.0)
    inv = _div(torch.ones_like(lo), x.amax(-1, keepdim=True) - lo)
    sxx = (w * x * x).sum(-1)
    best = None
    for t in _span(g):
        k = ((x - lo) * (inv * (g.nmax * t))).round().clamp(0, g.nmax)
        best = _keep(best, _affine_refit(x, w, k, sxx))
    for _ in range(g.polish):                            # re-round at the refitted scale and min
        scale, mn = best[1][:, None], best[2][:, None]
        k = torch.where(scale > 0, ((x + mn) / scale).round(), 0.0).clamp(0, g.nmax)
        best = _keep(best, _affine_refit(x, w, k, sxx))
    return best[1:]


def _scale_refit(x, w, k, sxx):
    """Weighted least squares of x ~ scale * k, levels fixed. -> (err, scale, sum wkk), each [M]."""
    wk = w * k
    skk, skx = (wk * k).sum(-1), (wk * x).sum(-1)
    scale = _div(skx, skk)
    return sxx - scale * skx, scale, skk


def float_symmetric(x: torch.Tensor, w: torch.Tensor, g: KGrid) -> tuple[torch.Tensor, ...]:
    """x, w [M, n] -> signed scale [M] (values scale*k, k in k_lo..k_hi) and (sum wkk,) of the
    chosen levels. The largest-magnitude weight is tried at either end of the levels."""
    big = x.gather(-1, x.abs().argmax(-1, keepdim=True))
    inv = _div(torch.ones_like(big), big)
    sxx = (w * x * x).sum(-1)
    best = None
    for end in (g.k_lo, g.k_hi):
        for t in _span(g):
            k = (x * (inv * (end * t))).round().clamp(g.k_lo, g.k_hi)
            best = _keep(best, _scale_refit(x, w, k, sxx))
    for _ in range(g.polish):
        scale = best[1][:, None]
        k = torch.where(scale != 0, (x / scale).round(), 0.0).clamp(g.k_lo, g.k_hi)
        best = _keep(best, _scale_refit(x, w, k, sxx))
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
    scs, ms = _floor_ceil(_div(s, d), g.sc_hi), _floor_ceil(_div(mn, dmin), g.m_hi)
    best = None
    for sc in scs:
        for m in ms:
            e = _model_error(d * sc - s, dmin * m - mn, *h)
            if best is None:
                best = (sc, m, e)
            else:
                better = e < best[2]
                best = tuple(torch.where(better, c, o) for c, o in zip((sc, m, e), best))
    return best[0], best[1]


def model_floor(s, mn, d, dmin, h, g: KGrid) -> torch.Tensor:
    """The model error of round_affine's choice (the least over floor/ceil), summed over sub-blocks."""
    scs, ms = _floor_ceil(_div(s, d), g.sc_hi), _floor_ceil(_div(mn, dmin), g.m_hi)
    ds = [d * sc - s for sc in scs]
    dm = [dmin * m - mn for m in ms]
    return torch.stack([_model_error(a, b, *h) for a in ds for b in dm]).amin(0).sum(-1)


TOP = 11  # the index of the plain "largest sub-scale / top integer" among the candidates


def _factors(top: int) -> torch.Tensor:
    """Candidate divisors t: d = (largest sub-scale) / t, from 3/4 of the top integer to just past
    it (past it, the largest sub-scale clips to the top integer)."""
    return torch.cat([torch.linspace(0.75 * top, top, TOP + 1), top + torch.tensor([0.25, 0.5, 0.75, 1.0])])


def _f16_grid(d: torch.Tensor) -> torch.Tensor:
    """Candidates as float16 will store them, but never rounded to 0 from a positive value."""
    return to_f16(torch.where(d != 0, d.sign() * d.abs().clamp(min=2.0 ** -24), d)).float()


def integers_affine(s, mn, h, g: KGrid) -> tuple[torch.Tensor, torch.Tensor]:
    """s, mn, h [N, S] -> d, dmin float32 [N]: coordinate search over candidates on the model."""
    d_all = _f16_grid(s.amax(-1, keepdim=True)[:, None] / _factors(g.sc_hi)[None, :, None])  # [N, K, 1]
    dm_all = _f16_grid(mn.amax(-1, keepdim=True)[:, None] / _factors(g.m_hi)[None, :, None])
    hk = tuple(v[:, None] for v in h)
    dmin = dm_all[:, TOP]
    for _ in range(2):
        e = model_floor(s[:, None], mn[:, None], d_all, dmin[:, None], hk, g)
        d = d_all.squeeze(-1).gather(1, e.argmin(1, keepdim=True))
        e = model_floor(s[:, None], mn[:, None], d[:, None], dm_all, hk, g)
        dmin = dm_all.squeeze(-1).gather(1, e.argmin(1, keepdim=True))
    return d.squeeze(1), dmin.squeeze(1)


def integers_symmetric(s, hkk, g: KGrid) -> torch.Tensor:
    """s, hkk [N, S] -> d float32 [N]: the largest-magnitude sub-scale tried near either end."""
    big = s.gather(-1, s.abs().argmax(-1, keepdim=True))             # [N, 1]
    t = torch.cat([_factors(-g.sc_lo), _factors(g.sc_hi)])[None, :]   # [1, K]
    d_all = _f16_grid(big / t * torch.tensor([-1.0, 1.0]).repeat_interleave(TOP + 5))   # [N, K]
    sc = _div(s[:, None], d_all[..., None]).round().clamp(g.sc_lo, g.sc_hi)
    e = (hkk[:, None] * (d_all[..., None] * sc - s[:, None]) ** 2).sum(-1)
    return d_all.gather(1, e.argmin(1, keepdim=True)).squeeze(1)


# -- step 3: on the exact stored values -------------------------------------------------------------

def stored(fit: KFit) -> tuple[torch.Tensor, torch.Tensor]:
    """-> dl, ml float32 [N, S]: each sub-block's scale and min as the decoder computes them."""
    dl = fit.d.float()[:, None] * fit.sc.float()
    ml = fit.dmin.float()[:, None] * fit.m.float()
    return dl, ml


def sub_errors(x, w, dl, ml, g: KGrid) -> tuple[torch.Tensor, torch.Tensor]:
    """x, w [N, S, n]; dl, ml [N, S] -> weighted error [N, S] and the nearest levels [N, S, n]."""
    dl, ml = dl[..., None], ml[..., None]
    k = torch.where(dl != 0, ((x + ml) / dl).round(), float(g.k_lo)).clamp(g.k_lo, g.k_hi)
    return (w * (x - (dl * k - ml)) ** 2).sum(-1), k


def refit(x, w, k, fit: KFit, g: KGrid) -> tuple[torch.Tensor, torch.Tensor]:
    """Weighted least squares of (d, dmin) over each super-block, integers and levels fixed."""
    s1, sk, skk, sx, skx = _sums(x, w, k)                            # [N, S]
    sc, m = fit.sc.float(), fit.m.float()
    a11, b1 = (sc * sc * skk).sum(-1), (sc * skx).sum(-1)
    dmin = fit.dmin.float()
    if not g.has_min:
        return _div(b1, a11), dmin
    c, a22, e = (sc * m * sk).sum(-1), (m * m * s1).sum(-1), (m * sx).sum(-1)
    det = a11 * a22 - c * c
    ok = det > 1e-6 * a11 * a22
    d = torch.where(ok, _div(b1 * a22 - c * e, det), _div(b1 + dmin * c, a11))
    return d, torch.where(ok, _div(c * b1 - a11 * e, det), dmin)


def _pick(better: torch.Tensor, new: KFit, old: KFit) -> KFit:
    """Per super-block ([N]) or per sub-block ([N, S]) choice between two fits."""
    b1 = better if better.dim() == 1 else better.any(-1)
    b2 = better if better.dim() == 2 else better[:, None]
    return KFit(torch.where(b1, new.d, old.d), torch.where(b1, new.dmin, old.dmin),
                torch.where(b2, new.sc, old.sc), torch.where(b2, new.m, old.m))


def _moves(g: KGrid) -> list[tuple[int, int]]:
    if g.has_min:
        return [(a, b) for a in (-1, 0, 1) for b in (-1, 0, 1) if a or b]
    return [(a, 0) for a in (-2, -1, 1, 2)]


def local_search(x, w, fit: KFit, err, g: KGrid):
    """Each sub-block's integers moved by the small steps of `_moves`, with d and dmin fixed; a
    move is kept where it lowers that sub-block's exact error. -> fit, err, levels."""
    for a, b in _moves(g):
        trial = KFit(fit.d, fit.dmin, (fit.sc + a).clamp(g.sc_lo, g.sc_hi), (fit.m + b).clamp(0, g.m_hi))
        e2, _ = sub_errors(x, w, *stored(trial), g)
        better = e2 < err
        fit, err = _pick(better, trial, fit), torch.where(better, e2, err)
    err, k = sub_errors(x, w, *stored(fit), g)
    return fit, err, k


def refine(x, w, fit: KFit, g: KGrid) -> tuple[KFit, torch.Tensor]:
    """Alternate the (d, dmin) refit and the integer search, keeping each super-block's best.
    -> the fit and its exact error per super-block [N]."""
    err, k = sub_errors(x, w, *stored(fit), g)
    for _ in range(g.rounds):
        d, dmin = refit(x, w, k, fit, g)
        trial = KFit(to_f16(d), to_f16(dmin), fit.sc, fit.m)
        e2, k2 = sub_errors(x, w, *stored(trial), g)
        better = e2.sum(-1) < err.sum(-1)
        fit = _pick(better, trial, fit)
        err, k = torch.where(better[:, None], e2, err), torch.where(better[:, None, None], k2, k)
        fit, err, k = local_search(x, w, fit, err, g)
    return fit, err.sum(-1)


def _search(x: torch.Tensor, w: torch.Tensor, g: KGrid) -> tuple[KFit, torch.Tensor]:
    n, s_count, sub = x.shape
    xs, ws = x.reshape(-1, sub), w.reshape(-1, sub)
    if g.has_min:
        s, mn, *h = (v.reshape(n, s_count) for v in float_affine(xs, ws, g))
        d, dmin = integers_affine(s, mn, h, g)
        d, dmin = to_f16(d), to_f16(dmin)
        sc, m = round_affine(s, mn, d.float()[:, None], dmin.float()[:, None], h, g)
    else:
        s, hkk = (v.reshape(n, s_count) for v in float_symmetric(xs, ws, g))
        d = to_f16(integers_symmetric(s, hkk, g))
        sc = _div(s, d.float()[:, None]).round().clamp(g.sc_lo, g.sc_hi)
        dmin, m = torch.zeros_like(d), torch.zeros_like(sc)
    return refine(x, w, KFit(d, dmin, sc.to(torch.int16), m.to(torch.int16)), g)


def search(x: torch.Tensor, w: torch.Tensor, g: KGrid) -> KFit:
    """x, w float32 [N, S, sub] -> the super-blocks' d, dmin and integers (steps 1-3 above).

    With mins, a sub-block's range always reaches down to 0 or below (m, dmin >= 0); a super-block
    with a sub-block wholly above 0 is also searched negated (d, dmin < 0: the range reaches up to
    0 or above), and the better kept."""
    fit, err = _search(x, w, g)
    if not g.has_min:
        return fit
    idx = (x.amin(-1) > 0).any(-1).nonzero().squeeze(1)
    if idx.numel():
        neg, err_neg = _search(-x[idx], w[idx], g)
        take = idx[err_neg < err[idx]]
        flipped = KFit(-neg.d, -neg.dmin, neg.sc, neg.m)
        better = err_neg < err[idx]
        for f in ("d", "dmin", "sc", "m"):
            getattr(fit, f)[take] = getattr(flipped, f)[better]
    return fit
