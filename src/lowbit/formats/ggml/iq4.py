"""llama.cpp's 4-bit non-linear types: IQ4_NL (blocks of 32) and IQ4_XS (super-blocks of 256).

Both round each weight to one of 16 levels spaced closer near zero (llama.cpp's kvalues_iq4nl),
times a scale:
    IQ4_NL  d f16 | qs[16]                                   value = d * KVALUES[q]
    IQ4_XS  d f16 | scales_h u16 | scales_l[4] | qs[128]     value = (d * (ls - 32)) * KVALUES[q]
IQ4_XS has 8 sub-blocks of 32, each with a 6-bit scale ls: its low 4 bits in a nibble of
scales_l (sub-block 2j in byte j's low nibble, 2j + 1 in its high one), its top 2 bits at bits
2i, 2i + 1 of scales_h. qs holds 16 bytes per 32 weights as Q4_0's do (weight j low, j + 16 high).
The float operations are gguf-py's (a float16 scale times the level; IQ4_XS first forms the
sub-block scale d * (ls - 32) in float32), so tables match its dequantize_blocks bit for bit.

The encoder searches each sub-block's scale as IQ4_NL's (search.search_scale), then for IQ4_XS the
super-block d: for several d, each sub-block takes the 6-bit scale near its own that rounds its
weights best, and the super-block keeps the d of lowest error, refit once by least squares.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from lowbit.formats.ggml.base import BlockType
from lowbit.formats.ggml.legacy import (
    ScaleParams,
    f16_bytes,
    f16_from,
    pack_nibbles,
    unpack_nibbles,
)
from lowbit.formats.ggml.search import (
    CHUNK,
    Levels,
    by_chunks,
    importance,
    inverse,
    keep,
    nearest_monotone,
    pick,
    scale_error,
    search_scale,
    signed_absmax,
    to_f16,
)

KVALUES = (-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113)
LEVELS = Levels.of(KVALUES)
UNIT = KVALUES.index(1)  # the level whose value is the scale itself
# Where a block's largest weight goes: on the lowest level (-127) or the highest (113), times f.
ANCHORS = (KVALUES[0], KVALUES[-1])
FACTORS = tuple(0.88 + 0.03 * i for i in range(8))
# Where IQ4_XS's largest sub-block scale goes among the 6-bit levels -32..31.
SUPER_TARGETS = (-32.0, -31.0, -30.0, -28.0, 31.0, 29.0)


def _guess(table: Tensor, w: Tensor) -> Tensor:
    """Each weight's nearest level (about), from the scale read off the table's unit level."""
    n, s, _ = table.shape
    dl = table[..., UNIT].reshape(-1)
    return LEVELS.index(w.reshape(n * s, w.shape[-1] // s) * inverse(dl)).reshape(w.shape)


def _levels_of(codes: Tensor) -> Tensor:
    """uint8 codes -> float32 level values."""
    return LEVELS.values[codes.long()]


class IQ4_NL(BlockType):
    name = "IQ4_NL"
    block = 32
    sub = 32
    type_size = 18
    n_levels = 16

    def fit(self, w: Tensor, imp: Tensor) -> ScaleParams:
        d, _ = search_scale(w, imp, LEVELS, ANCHORS, FACTORS)
        return ScaleParams(d)

    def table(self, params: ScaleParams) -> Tensor:
        return to_f16(params.d).reshape(-1, 1, 1) * LEVELS.values.reshape(1, 1, -1)

    def nearest(self, table: Tensor, w: Tensor) -> tuple[Tensor, Tensor]:
        return nearest_monotone(table, w, _guess(table, w))

    def encode(self, params: ScaleParams, codes: Tensor) -> Tensor:
        return torch.cat([f16_bytes(params.d), pack_nibbles(codes)], dim=-1)

    def decode(self, data: Tensor) -> Tensor:
        return f16_from(data, 0) * _levels_of(unpack_nibbles(data[:, 2:]))


@dataclass(frozen=True)
class SuperScaleParams:
    """IQ4_XS: the super-block scale d float32 [N] (as stored) and the sub-block scales
    ls - 32, int64 [N, 8] in -32..31."""

    d: Tensor
    scales: Tensor


def _sub_scales(w: Tensor, imp: Tensor, d: Tensor, s: Tensor) -> tuple[Tensor, Tensor]:
    """For super-block scale d [N] and ideal sub-block scales s [N, 8]: each sub-block's 6-bit
    scale r among the three nearest s / d, the one whose weights round best ->
    (super-block error [N], r [N, 8] float32)."""
    n = w.shape[0]
    ws, imps = w.reshape(n * 8, 32), imp.reshape(n * 8, 32)
    r0 = (s * inverse(d)).round_()
    tried = []
    for step in (-1.0, 0.0, 1.0):
        r = (r0 + step).clamp_(-32, 31)
        err, _ = scale_error(ws, imps, (d.unsqueeze(-1) * r).reshape(-1), LEVELS)
        tried.append((err, r.reshape(-1)))
    err, r = pick(*zip(*tried, strict=True))
    return err.reshape(n, 8).sum(-1), r.reshape(n, 8)


def _refit_super(w: Tensor, imp: Tensor, d: Tensor, r: Tensor) -> Tensor:
    """The least-squares super-block scale (stored) for the codes that d [N] and the sub-block
    scales r [N, 8] give each weight."""
    dl = (d.unsqueeze(-1) * r).reshape(-1, 1)                                # [N * 8, 1]
    lv = LEVELS.snap(w.reshape(-1, 32) * inverse(dl.squeeze(-1)))
    a = (r.reshape(-1, 1) * lv).reshape(w.shape)                             # value / d
    ia = imp * a
    num, den = torch.linalg.vecdot(ia, w), torch.linalg.vecdot(ia, a)
    return to_f16((num / den).nan_to_num_(nan=0.0, posinf=0.0, neginf=0.0))


def _fit_super(w: Tensor, imp: Tensor) -> tuple[Tensor, Tensor]:
    """w, imp [N, 256] -> (d [N], sub-block scales r [N, 8] float32), by chunks of blocks."""
    return by_chunks(_fit_super_chunk, w, imp, rows=CHUNK // 8)


def _fit_super_chunk(w: Tensor, imp: Tensor) -> tuple[Tensor, Tensor]:
    n = w.shape[0]
    s, _ = search_scale(w.reshape(n * 8, 32), imp.reshape(n * 8, 32), LEVELS, ANCHORS, FACTORS, store=keep)
    s = s.reshape(n, 8)                                                      # each sub-block's own scale
    smax = signed_absmax(s)
    tried = []
    for t in SUPER_TARGETS:
        d = to_f16(smax / t)
        tried.append((*_sub_scales(w, imp, d, s), d))
    err, r, d = pick(*zip(*tried, strict=True))
    d2 = _refit_super(w, imp, d, r)
    err2, r2 = _sub_scales(w, imp, d2, r * d.unsqueeze(-1))
    _, d, r = pick((err, err2), (d, d2), (r, r2))
    return d, r


class IQ4_XS(BlockType):
    name = "IQ4_XS"
    block = 256
    sub = 32
    type_size = 136
    n_levels = 16

    def fit(self, w: Tensor, imp: Tensor) -> SuperScaleParams:
        d, r = _fit_super(w.float(), importance(imp))
        return SuperScaleParams(d, r.long())

    def table(self, params: SuperScaleParams) -> Tensor:
        dl = to_f16(params.d).unsqueeze(-1) * params.scales.float()         # [N, 8]
        return dl.unsqueeze(-1) * LEVELS.values.reshape(1, 1, -1)

    def nearest(self, table: Tensor, w: Tensor) -> tuple[Tensor, Tensor]:
        return nearest_monotone(table, w, _guess(table, w))

    def encode(self, params: SuperScaleParams, codes: Tensor) -> Tensor:
        n = codes.shape[0]
        ls = (params.scales + 32).to(torch.int32)                           # [N, 8], 0..63
        high = ((ls >> 4) << (2 * torch.arange(8, dtype=torch.int32))).sum(-1, dtype=torch.int32)
        scales_h = torch.stack([high & 0xFF, high >> 8], dim=-1).to(torch.uint8)
        low = (ls & 0x0F).to(torch.uint8)
        scales_l = low[:, 0::2] | (low[:, 1::2] << 4)
        qs = pack_nibbles(codes.reshape(n, 8, 32)).reshape(n, 128)
        return torch.cat([f16_bytes(params.d), scales_h, scales_l, qs], dim=-1)

    def decode(self, data: Tensor) -> Tensor:
        n = data.shape[0]
        high = data[:, 2].to(torch.int32) | (data[:, 3].to(torch.int32) << 8)
        top = (high.unsqueeze(-1) >> (2 * torch.arange(8, dtype=torch.int32))) & 3
        low = unpack_nibbles(data[:, 4:8]).to(torch.int32)                   # sub-blocks 0, 2, 4, 6, 1, 3, 5, 7
        low = torch.stack([low[:, :4], low[:, 4:]], dim=-1).reshape(n, 8)   # 0 .. 7
        dl = f16_from(data, 0) * ((low | (top << 4)) - 32).float()          # [N, 8]
        q = _levels_of(unpack_nibbles(data[:, 8:].reshape(n, 8, 16)))       # [N, 8, 32]
        return (dl.unsqueeze(-1) * q).reshape(n, 256)


TYPES: tuple[BlockType, ...] = (IQ4_NL(), IQ4_XS())
