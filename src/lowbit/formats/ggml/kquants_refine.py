"""Step 3 of the K-quant search (see kquants_search.py), on the exact stored values, and the search
as a whole: `search(x, w, grid)`."""

from __future__ import annotations

import torch

from lowbit.formats.ggml.kquants_search import (
    KFit,
    KGrid,
    div0,
    float_affine,
    float_symmetric,
    integers_affine,
    integers_symmetric,
    pick,
    round_affine,
    to_f16,
)


def stored(fit: KFit) -> tuple[torch.Tensor, torch.Tensor]:
    """-> dl, ml float32 [N, S]: each sub-block's scale and min as the decoder computes them."""
    return fit.d.float()[:, None] * fit.sc.float(), fit.dmin.float()[:, None] * fit.m.float()


def sub_errors(x, w, dl, ml, g: KGrid) -> tuple[torch.Tensor, torch.Tensor]:
    """x, w [N, S, n]; dl, ml [N, S] -> the weighted error [N, S] of the stored values nearest to x,
    and their levels [N, S, n]."""
    dl, ml, inv = dl[..., None], ml[..., None], div0(1.0, dl)[..., None]   # all values equal: level 0
    k = (x + ml).mul_(inv).round_().clamp_(g.k_lo, g.k_hi)
    r = (dl * k).sub_(ml).sub_(x)
    return r.mul_(r).mul_(w).sum(-1), k


def _sums(x: torch.Tensor, w: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """x, w, k [..., n] -> (sum w, sum wk, sum wkk, sum wx, sum wkx), each [...]."""
    wk = w * k
    return w.sum(-1), wk.sum(-1), (wk * k).sum(-1), (w * x).sum(-1), (wk * x).sum(-1)


def refit(x, w, k, fit: KFit, g: KGrid) -> tuple[torch.Tensor, torch.Tensor]:
    """Weighted least squares of (d, dmin) over each super-block, integers and levels fixed."""
    s1, sk, skk, sx, skx = _sums(x, w, k)                            # [N, S]
    sc, m = fit.sc, fit.m
    a11, b1 = (sc * sc * skk).sum(-1), (sc * skx).sum(-1)
    dmin = fit.dmin.float()
    if not g.has_min:
        return div0(b1, a11), dmin
    c, a22, e = (sc * m * sk).sum(-1), (m * m * s1).sum(-1), (m * sx).sum(-1)
    det = a11 * a22 - c * c
    ok = det > 1e-6 * a11 * a22
    d = torch.where(ok, div0(b1 * a22 - c * e, det), div0(b1 + dmin * c, a11))
    return d, torch.where(ok, div0(c * b1 - a11 * e, det), dmin)


def _pick_fit(better: torch.Tensor, new: KFit, old: KFit) -> KFit:
    """Per super-block ([N]) or per sub-block ([N, S], same d) choice between two fits."""
    if better.dim() == 1:
        d, dmin, better = torch.where(better, new.d, old.d), torch.where(better, new.dmin, old.dmin), better[:, None]
    else:
        d, dmin = old.d, old.dmin
    return KFit(d, dmin, pick(better, new.sc, old.sc), pick(better, new.m, old.m))


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
        fit, err = _pick_fit(better, trial, fit), torch.minimum(e2, err)
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
        fit = _pick_fit(better, trial, fit)
        err, k = pick(better[:, None], e2, err), pick(better[:, None, None], k2, k)
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
        sc = div0(s, d.float()[:, None]).round().clamp(g.sc_lo, g.sc_hi)
        dmin, m = torch.zeros_like(d), torch.zeros_like(sc)
    return refine(x, w, KFit(d, dmin, sc, m), g)


def search(x: torch.Tensor, w: torch.Tensor, g: KGrid) -> KFit:
    """x, w float32 [N, S, sub] -> the super-blocks' d, dmin and integers (int16).

    With mins, a sub-block's range always reaches down to 0 or below (m, dmin >= 0); a super-block
    with a sub-block wholly above 0 is also searched negated (d, dmin < 0: the range reaches up to
    0 or above), and the better kept."""
    fit, err = _search(x, w, g)
    if g.has_min:
        idx = (x.amin(-1) > 0).any(-1).nonzero().squeeze(1)
        if idx.numel():
            neg, err_neg = _search(-x[idx], w[idx], g)
            better = err_neg < err[idx]
            take = idx[better]
            flipped = KFit(-neg.d, -neg.dmin, neg.sc, neg.m)
            for f in ("d", "dmin", "sc", "m"):
                getattr(fit, f)[take] = getattr(flipped, f)[better]
    return KFit(fit.d, fit.dmin, fit.sc.to(torch.int16), fit.m.to(torch.int16))
