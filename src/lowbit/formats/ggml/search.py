"""Importance-weighted scale search for llama.cpp's block types, over all blocks at once.

A ggml block (or sub-block) decodes code k either as  d * level[k]  (Q4_0, Q5_0, Q8_0, IQ4_NL, and
each IQ4_XS sub-block) or as  (d * k) + m  (Q4_1, Q5_1), with d and m stored as float16. Choosing d
(and m) is the encoder's whole job: the codes then follow by rounding each weight to its nearest
value. The search here, for every block at once:

  1. tries candidate scales placed from the block's range (its max-abs weight on one of the grid's
     extreme levels, shrunk or stretched by a list of factors, so that outliers may be clipped);
  2. rounds each weight to its nearest level under the candidate, refits the scale (and min) by
     importance-weighted least squares for those codes, and rounds it as stored (float16);
  3. measures  sum imp * (w - value)^2  on the values the stored scale decodes to, and keeps each
     block's best; a few least-squares passes from the winner finish it.

Vectors are [N, n]: N blocks of n weights with importance imp >= 0 (all ones: plain MSE; a block
whose importances are all 0 counts every weight the same). Scales are [N]. `store` is how a scale
is kept: `to_f16` for a float16 field, `keep` for one requantized later (IQ4_XS's sub-scales).

`nearest_monotone` is the exact nearest-value lookup (BlockType.nearest) for these types' tables,
fast enough for a 256-level table.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

F16_MAX = 65504.0
CHUNK = 4096  # blocks per pass: the temporaries stay small and in cache

Store = Callable[[Tensor], Tensor]


def to_f16(x: Tensor) -> Tensor:
    """float32 -> the float32 its float16 rounding decodes to: clamped to float16's finite range,
    nan -> 0, so that a stored scale is never inf or nan."""
    return torch.nan_to_num(x, nan=0.0).clamp(-F16_MAX, F16_MAX).half().float()


def keep(x: Tensor) -> Tensor:
    """A scale kept as float32 (finite), for scales that are requantized afterwards."""
    return torch.nan_to_num(x, nan=0.0, posinf=F16_MAX, neginf=-F16_MAX)


def by_chunks(fn: Callable[..., tuple[Tensor, ...]], *tensors: Tensor, rows: int | None = None) -> tuple[Tensor, ...]:
    """fn over slices of `rows` blocks of each tensor (all [N, ...]), outputs concatenated on dim 0."""
    n, rows = tensors[0].shape[0], rows or CHUNK
    if n <= rows:
        return fn(*tensors)
    parts = [fn(*(t[i:i + rows] for t in tensors)) for i in range(0, n, rows)]
    return tuple(torch.cat(cols) for cols in zip(*parts, strict=True))


def inverse(d: Tensor) -> Tensor:
    """[N] -> [N, 1]: 1 / d, and 0 where d is 0 (or so small that 1 / d overflows)."""
    return d.reciprocal().nan_to_num_(nan=0.0, posinf=0.0, neginf=0.0).unsqueeze(-1)


def _ratio(num: Tensor, den: Tensor) -> Tensor:
    """num / den, 0 where that is not finite (den = 0: every term of both sums was 0)."""
    return (num / den).nan_to_num_(nan=0.0, posinf=0.0, neginf=0.0)


@dataclass(frozen=True)
class Levels:
    """What a code stands for before scaling: integer `values` float32 [L], ascending. Rounding to
    them is a round-and-clamp when they are consecutive (`lo` is then the first), else a lookup of
    the nearest level's index of each half-unit interval from values[0] to values[-1] (`lut`)."""

    values: Tensor
    lo: int | None
    lut: Tensor | None

    @classmethod
    def integers(cls, lo: int, hi: int) -> Levels:
        return cls(torch.arange(lo, hi + 1, dtype=torch.float32), lo, None)

    @classmethod
    def of(cls, values: Sequence[int]) -> Levels:
        """Integer levels, any spacing: every midpoint is then a multiple of 1/2, and each
        half-unit interval [values[0] + j / 2, values[0] + (j + 1) / 2) has one nearest level."""
        v = torch.tensor(sorted(values), dtype=torch.float32)
        centres = v[0] + (torch.arange(2 * int(v[-1] - v[0]), dtype=torch.float32) + 0.5) / 2
        return cls(v, None, (centres.unsqueeze(-1) - v).abs().argmin(-1))

    def index(self, y: Tensor) -> Tensor:
        """y (weights in units of the scale) -> int64 index of each one's nearest level (for
        uneven levels, the upper one when y sits exactly on a midpoint)."""
        if self.lo is not None:
            return (y.round() - self.lo).clamp_(0, len(self.values) - 1).long()
        return self._lookup(self.lut, y)

    def snap(self, y: Tensor) -> Tensor:
        """y -> the value of each one's nearest level (as `index`), float32."""
        if self.lo is not None:
            return y.round().clamp_(self.lo, self.lo + len(self.values) - 1)
        return self._lookup(self.values[self.lut], y)

    def _lookup(self, table: Tensor, y: Tensor) -> Tensor:
        """table's entry for the half-unit interval of each y (an int32 index: cheaper to make)."""
        j = (y - self.values[0]).mul_(2).floor_().clamp_(0, len(self.lut) - 1)
        return table.index_select(0, j.int().reshape(-1)).reshape(y.shape)


def weighted_error(w: Tensor, imp: Tensor, values: Tensor) -> Tensor:
    """[N, n] -> [N]: sum imp * (w - values)^2 over each block."""
    return torch.linalg.vecdot(imp, (w - values).square_())


def signed_absmax(w: Tensor) -> Tensor:
    """[N, n] -> [N]: each block's weight of largest magnitude, with its sign."""
    return w.gather(-1, w.abs().argmax(-1, keepdim=True)).squeeze(-1)


def importance(imp: Tensor) -> Tensor:
    """imp [N, n] clamped to >= 0, with all-zero rows replaced by ones (then plain MSE)."""
    imp = imp.float().clamp_min(0)
    return imp + (imp.sum(-1, keepdim=True) == 0).float()


def scale_error(w: Tensor, imp: Tensor, d: Tensor, levels: Levels) -> tuple[Tensor, Tensor]:
    """Values d * level (d [N] as stored), each weight at its nearest level ->
    (weighted error [N], level values [N, n])."""
    lv = levels.snap(w * inverse(d))
    return weighted_error(w, imp, d.unsqueeze(-1) * lv), lv


def ls_scale(iw: Tensor, imp: Tensor, lv: Tensor) -> Tensor:
    """The d minimising sum imp * (w - d * lv)^2 per block, from iw = imp * w (0 where every
    imp * lv is 0)."""
    return _ratio(torch.linalg.vecdot(iw, lv), torch.linalg.vecdot(imp * lv, lv))


def scaled_error(w: Tensor, imp: Tensor, d: Tensor, lv: Tensor) -> Tensor:
    """sum imp * (w - d * lv)^2 per block, d [N], lv [N, n]. For a float16 d and integer levels of
    up to 13 bits, d * lv is exact in float32, so this is the error on the decoded values."""
    return torch.linalg.vecdot(imp, torch.addcmul(w, lv, -d.unsqueeze(-1)).square_())


def pick(errs: Sequence[Tensor], *params: Sequence[Tensor]) -> tuple[Tensor, ...]:
    """Each block's candidate of lowest error, the first on a tie (a nan error never wins):
    C errors [N] and, per parameter, its C candidates [N, ...] -> (error [N], *params [N, ...])."""
    e = torch.stack(list(errs), 1).nan_to_num_(nan=float("inf"))
    i = e.argmin(1, keepdim=True)                                 # [N, 1]
    chosen = []
    for p in params:
        stacked = torch.stack(list(p), 1)                         # [N, C, ...]
        at = i.reshape(-1, 1, *[1] * (stacked.dim() - 2)).expand(-1, 1, *stacked.shape[2:])
        chosen.append(stacked.gather(1, at).squeeze(1))
    return (e.gather(1, i).squeeze(1), *chosen)


def search_scale(w: Tensor, imp: Tensor, levels: Levels, anchors: Sequence[float],
                 factors: Sequence[float], store: Store = to_f16, refits: int = 2) -> tuple[Tensor, Tensor]:
    """The scale d [N] (as `store` keeps it) for values d * level, and its weighted error [N]
    (an upper bound: the nearest codes for d can only lower it).

    Candidates put each block's signed max-abs weight on level `a * f` for each anchor a (an
    extreme level, e.g. -8 and 7 for Q4_0) and factor f (f > 1 clips the largest weights, f < 1
    leaves headroom); each candidate's codes get a least-squares scale, and the block keeps the
    refit with the lowest error."""
    def run(w, imp):
        return _search_scale(w, importance(imp), levels, anchors, factors, store, refits)
    return by_chunks(run, w.float(), imp)


def _refit_scale(w, imp, iw, levels, d0, store):
    """Codes at scale d0, their least-squares scale as stored, and its error."""
    lv = levels.snap(w * inverse(d0))
    d = store(ls_scale(iw, imp, lv))
    return scaled_error(w, imp, d, lv), d


def _search_scale(w, imp, levels, anchors, factors, store, refits):
    iw = imp * w
    amax = signed_absmax(w)
    tried = [_refit_scale(w, imp, iw, levels, store(amax / (a * f)), store) for a in anchors for f in factors]
    err, d = pick(*zip(*tried, strict=True))
    for _ in range(refits):
        err, d = pick(*zip((err, d), _refit_scale(w, imp, iw, levels, d, store), strict=True))
    return d, err


def affine_values(d: Tensor, m: Tensor, k: Tensor) -> Tensor:
    """(d * k) + m, rounded as the decoder rounds (a product, then a sum): d, m [N], k [N, n]."""
    return (d.unsqueeze(-1) * k) + m.unsqueeze(-1)


def affine_codes(w: Tensor, d: Tensor, m: Tensor, nmax: int) -> Tensor:
    """The code k in 0..nmax (float32) of each weight's nearest value (d * k) + m."""
    return ((w - m.unsqueeze(-1)) * inverse(d)).round_().clamp_(0, nmax)


def _cap(m: Tensor, m_max: float | None) -> Tensor:
    return m if m_max is None else m.clamp(max=m_max)


def ls_scale_min(w: Tensor, imp: Tensor, k: Tensor, store: Store, m_max: float | None = None) -> tuple[Tensor, Tensor]:
    """(d, m) fitting w ~ d * k + m by weighted least squares for codes k, each as stored: m is
    clamped to m_max (if given) and rounded first, and d refit for the stored m (a block with one
    distinct code gets d = 0)."""
    ik = imp * k
    s0, s1, s2 = imp.sum(-1), ik.sum(-1), torch.linalg.vecdot(ik, k)
    sx, skx = torch.linalg.vecdot(imp, w), torch.linalg.vecdot(ik, w)
    det = s0 * s2 - s1 * s1
    ok = det > 1e-6 * s0 * s2
    m = torch.where(ok, _ratio(s2 * sx - s1 * skx, det), _ratio(sx, s0))
    m = store(_cap(m, m_max))
    return store(_ratio(skx - m * s1, s2)), m


def search_scale_min(w: Tensor, imp: Tensor, nmax: int, factors: Sequence[float], store: Store = to_f16,
                     refits: int = 2, m_max: float | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """(d, m, weighted error), each [N], for values (d * k) + m with codes k in 0..nmax.

    Candidates span the block's range [min, max] divided by factor f around its middle (f > 1
    clips both ends); each candidate's codes get a least-squares (d, m), and the block keeps the
    pair with the lowest error on the stored values. m_max bounds m (0 for offsets stored as a
    non-negative min that is subtracted, as the K types store theirs)."""
    def run(w, imp):
        return _search_scale_min(w, importance(imp), nmax, factors, store, refits, m_max)
    return by_chunks(run, w.float(), imp)


def _refit_scale_min(w, imp, d0, m0, nmax, store, m_max):
    """Codes at (d0, m0), their least-squares (d, m) as stored, and its error."""
    k = affine_codes(w, d0, m0, nmax)
    d, m = ls_scale_min(w, imp, k, store, m_max)
    return weighted_error(w, imp, affine_values(d, m, k)), d, m


def _search_scale_min(w, imp, nmax, factors, store, refits, m_max):
    lo, hi = _cap(w.amin(-1), m_max), w.amax(-1)
    mid, span = (hi + lo) / 2, hi - lo
    tried = []
    for f in factors:
        d0 = store(span / (nmax * f))
        m0 = store(_cap(mid - d0 * nmax / 2, m_max))
        tried.append(_refit_scale_min(w, imp, d0, m0, nmax, store, m_max))
    err, d, m = pick(*zip(*tried, strict=True))
    for _ in range(refits):
        err, d, m = pick(*zip((err, d, m), _refit_scale_min(w, imp, d, m, nmax, store, m_max), strict=True))
    return d, m, err


def uniform_guess(table: Tensor, w: Tensor) -> Tensor:
    """For tables about evenly spaced along the levels (the legacy and K types): each weight's
    code by rounding on the line through the first and last level. [N, S, L], [N, S * sub] -> int64."""
    n, s, levels = table.shape
    t0, t1 = table[..., :1], table[..., -1:]
    step = inverse((t1 - t0).reshape(-1) / (levels - 1)).reshape(n, s, 1)
    k = ((w.reshape(n, s, w.shape[-1] // s) - t0) * step).round_().clamp_(0, levels - 1)
    return k.long().reshape(w.shape)


def nearest_monotone(table: Tensor, w: Tensor, guess: Tensor) -> tuple[Tensor, Tensor]:
    """BlockType.nearest for tables monotone along the levels: the same codes and values, bit for
    bit (the lower code on a tie), from a guess of each code (int64 [N, S * sub], about right).

    Each weight takes the nearest of the guess and its two neighbours; on a strictly monotone row
    that is the true nearest unless it lands on the window's inner edge, and the rows where that
    happens (or that repeat a value) are looked up exactly by binary search."""
    n, s, levels = table.shape
    t, rows = table.reshape(n * s, levels), (n * s, w.shape[-1] // s)
    codes, values = by_chunks(_nearest_rows, t, w.reshape(rows), guess.reshape(rows), rows=CHUNK * 4)
    return codes.reshape(w.shape), values.reshape(w.shape)


def _nearest_rows(t: Tensor, x: Tensor, guess: Tensor) -> tuple[Tensor, Tensor]:
    levels = t.shape[1]
    b = guess.clamp(1, levels - 2)
    a, c = b - 1, b + 1
    da, db, dc = (x - t.gather(1, a)).abs_(), (x - t.gather(1, b)).abs_(), (x - t.gather(1, c)).abs_()
    take_c, take_a = dc < torch.minimum(da, db), db >= da
    codes = torch.where(take_c, c, torch.where(take_a, a, b))
    steps = t[:, 1:] - t[:, :-1]
    strict = (steps > 0).all(1) | (steps < 0).all(1)
    edge = (take_c & (c != levels - 1)) | (~take_c & take_a & (a != 0))  # the window's inner edge
    redo = (~strict) | edge.any(1)
    if redo.any():
        rows = redo.nonzero().squeeze(1)
        codes[rows] = _nearest_exact(t[rows], x[rows])
    return codes.to(torch.uint8), t.gather(1, codes)


def _nearest_exact(t: Tensor, x: Tensor) -> Tensor:
    """Rows of a monotone table [R, L], weights [R, n] -> int64 codes: the nearest value, the lowest
    code among equal distances, by binary search."""
    down = t[:, -1:] < t[:, :1]                                   # descending rows (a negative scale)
    u = torch.where(down, -t, t).contiguous()                     # ascending, same code order
    i = torch.searchsorted(u, torch.where(down, -x, x).contiguous()).clamp_(1, t.shape[1] - 1)
    a, b = i - 1, i                                               # the levels either side of x
    ca = torch.searchsorted(u, u.gather(1, a))                    # lowest code of each value
    cb = torch.searchsorted(u, u.gather(1, b))
    da, db = (x - t.gather(1, a)).abs(), (x - t.gather(1, b)).abs()
    return torch.where((db < da) | ((db == da) & (cb < ca)), cb, ca)
