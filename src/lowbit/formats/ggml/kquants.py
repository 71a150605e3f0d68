"""llama.cpp's K quants, Q2_K ... Q6_K: super-blocks of 256 weights in sub-blocks of 16 or 32.

Weight i of sub-block j decodes to (d * sc[j]) * k - (dmin * m[j]) in float32, where d, dmin are
the super-block's float16 scales, sc[j], m[j] small stored integers and k the weight's level: its
code (Q2_K, Q4_K, Q5_K, which have mins) or its code minus a fixed zero (Q3_K: code - 4, Q6_K:
code - 32, no mins). The byte layouts are in kquants_layout.py, the encoder's search in
kquants_search.py and kquants_refine.py.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import ClassVar

import torch

from lowbit.formats.ggml import kquants_layout as layout
from lowbit.formats.ggml.base import BlockType
from lowbit.formats.ggml.kquants_refine import search
from lowbit.formats.ggml.kquants_search import KFit, KGrid, div0

CHUNK = 2048  # super-blocks searched at once: bounds the search's memory, keeps its tensors in cache


class KQuant(BlockType):
    """A K quant: params are a KFit (d, dmin float16 [N]; sc, m int16 [N, S])."""

    block: ClassVar[int] = layout.QK
    grid: ClassVar[KGrid]
    pack: ClassVar[Callable[[layout.KFields], torch.Tensor]]
    unpack: ClassVar[Callable[[torch.Tensor], layout.KFields]]

    def fit(self, w: torch.Tensor, imp: torch.Tensor) -> KFit:
        """A super-block whose importance is all zero (say, an imatrix that never saw its
        columns) is fitted by plain squared error; negative importance counts as zero."""
        n, s = w.shape[0], self.block // self.sub
        x = w.float().reshape(n, s, self.sub)
        imp = imp.float().clamp(min=0.0).expand_as(w)
        imp = imp + (imp.sum(-1, keepdim=True) == 0).float()
        wt = imp.reshape(n, s, self.sub)
        parts = [search(x[i:i + CHUNK], wt[i:i + CHUNK], self.grid) for i in range(0, n, CHUNK)]
        if not parts:
            f16, ints = torch.zeros(0, dtype=torch.float16), torch.zeros(0, s, dtype=torch.int16)
            return KFit(f16, f16, ints, ints)
        return KFit(*(torch.cat([getattr(p, f) for p in parts]) for f in ("d", "dmin", "sc", "m")))

    def table(self, params: KFit) -> torch.Tensor:
        levels = torch.arange(self.n_levels, dtype=torch.float32) - self.grid.zero
        dl = (params.d.float()[:, None] * params.sc.float())[..., None]  # [N, S, 1]
        if not self.grid.has_min:
            return dl * levels
        ml = (params.dmin.float()[:, None] * params.m.float())[..., None]
        return dl * levels - ml

    def encode(self, params: KFit, codes: torch.Tensor) -> torch.Tensor:
        return type(self).pack(layout.KFields(params.d, params.dmin, params.sc, params.m, codes.to(torch.uint8)))

    def decode(self, data: torch.Tensor) -> torch.Tensor:
        f = type(self).unpack(data)
        n = f.codes.shape[0]
        zeros = torch.zeros(n, dtype=torch.float16)
        params = KFit(f.d, zeros if f.dmin is None else f.dmin, f.sc,
                      torch.zeros_like(f.sc) if f.m is None else f.m)
        codes = f.codes.reshape(n, self.block // self.sub, self.sub).long()
        return self.table(params).gather(-1, codes).reshape(n, self.block)

    def nearest(self, table: torch.Tensor, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """BlockType.nearest without its [N, S, sub, L] distance tensor. A K quant's sub-block values
        are evenly spaced (up to float rounding) and monotone in the code, so the distance to them
        falls then rises along the codes: a code estimated from the spacing whose two neighbours are
        both strictly farther is the one nearest value. The rare rest (ties, midpoints) take the full
        search; so the codes are BlockType.nearest's, the lower code on a tie."""
        n, s, levels = table.shape
        t = table.reshape(n * s, levels)
        x = w.reshape(n * s, w.shape[1] // s)
        t0 = t[:, :1]
        p = ((x - t0) * div0(levels - 1.0, t[:, -1:] - t0)).round_().clamp_(0, levels - 1).long()
        values = t.gather(1, p)
        d0 = (x - values).abs()
        below = (x - t.gather(1, (p - 1).clamp_(min=0))).abs()
        above = (x - t.gather(1, (p + 1).clamp_(max=levels - 1))).abs()
        flat = t0 == t[:, -1:]                                            # every value equal: code 0
        unsure = ((d0 >= below) & (p > 0) | (d0 >= above) & (p < levels - 1)) & ~flat
        if unsure.any():
            rows, cols = unsure.nonzero(as_tuple=True)
            tr = t[rows]                                                  # [M, L]
            c = (x[rows, cols][:, None] - tr).abs().argmin(-1)            # first minimum: the lower code
            p[rows, cols], values[rows, cols] = c, tr.gather(1, c[:, None]).squeeze(1)
        return p.reshape(w.shape).to(torch.uint8), values.reshape(w.shape)


class Q2_K(KQuant):
    name, sub, type_size, n_levels = "Q2_K", 16, 84, 4
    grid = KGrid(sub=16, nmax=3, zero=0, sc_lo=0, sc_hi=15, m_hi=15, span=(-0.33, 0.33), count=11,
                 shifts=(-0.4, -0.2, 0.0, 0.2, 0.4))
    pack, unpack = staticmethod(layout.encode_q2_k), staticmethod(layout.decode_q2_k)


class Q3_K(KQuant):
    name, sub, type_size, n_levels = "Q3_K", 16, 110, 8
    grid = KGrid(sub=16, nmax=7, zero=4, sc_lo=-32, sc_hi=31, m_hi=0, span=(-0.5, 1.0), count=31)
    pack, unpack = staticmethod(layout.encode_q3_k), staticmethod(layout.decode_q3_k)


class Q4_K(KQuant):
    name, sub, type_size, n_levels = "Q4_K", 32, 144, 16
    grid = KGrid(sub=32, nmax=15, zero=0, sc_lo=0, sc_hi=63, m_hi=63, span=(-0.15, 0.45), count=21,
                 shifts=(-0.33, 0.0, 0.33))
    pack, unpack = staticmethod(layout.encode_q4_k), staticmethod(layout.decode_q4_k)


class Q5_K(KQuant):
    name, sub, type_size, n_levels = "Q5_K", 32, 176, 32
    grid = KGrid(sub=32, nmax=31, zero=0, sc_lo=0, sc_hi=63, m_hi=63, span=(-0.15, 0.45), count=21,
                 shifts=(-0.33, 0.0, 0.33))
    pack, unpack = staticmethod(layout.encode_q5_k), staticmethod(layout.decode_q5_k)


class Q6_K(KQuant):
    name, sub, type_size, n_levels = "Q6_K", 16, 210, 64
    grid = KGrid(sub=16, nmax=63, zero=32, sc_lo=-128, sc_hi=127, m_hi=0, span=(-0.3, 0.6), count=31,
                 both_ends=False)
    pack, unpack = staticmethod(layout.encode_q6_k), staticmethod(layout.decode_q6_k)


TYPES = (Q2_K(), Q3_K(), Q4_K(), Q5_K(), Q6_K())
