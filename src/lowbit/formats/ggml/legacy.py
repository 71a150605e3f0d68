"""llama.cpp's first block types: Q4_0, Q4_1, Q5_0, Q5_1, Q8_0 (blocks of 32 weights).

Byte layouts (little-endian), per block of 32:
    Q4_0  d f16 | qs[16]                 value = d * (q - 8),   q = 4 bits
    Q4_1  d f16 | m f16 | qs[16]         value = (d * q) + m,   q = 4 bits
    Q5_0  d f16 | qh u32 | qs[16]        value = d * (q - 16),  q = 4 low bits in qs, 5th bit in qh
    Q5_1  d f16 | m f16 | qh u32 | qs[16]  value = (d * q) + m
    Q8_0  d f16 | qs[32] int8            value = d * q
qs byte j holds weight j in its low nibble and weight j + 16 in its high one; bit j of qh is weight
j's fifth bit. The float operations of each decode are those of gguf-py's dequantize_blocks
(float16 -> float32, then one product, or a product and a sum), so tables match it bit for bit.

A code is the level's index from the lowest: code k of Q4_0 is q = k, value d * (k - 8); Q8_0 uses
codes 0..254 for q = -127..127 (llama.cpp's own quantizer never writes -128, and its integer
dot-product kernels are written for |q| <= 127).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from lowbit.formats.ggml.base import BlockType
from lowbit.formats.ggml.search import (
    Levels,
    nearest_monotone,
    search_scale,
    search_scale_min,
    to_f16,
    uniform_guess,
)

# Where each block's largest weight goes, as factors of an extreme level (search.search_scale):
# f > 1 clips the largest weights, f < 1 leaves headroom. Measured per type: the 4- and 5-bit grids
# gain from clipping; 8-bit never does, but a few coarser scales often land a better rounding.
CLIPPING = tuple(0.86 + 0.04 * i for i in range(12))
SPAN = tuple(0.9 + 0.02 * i for i in range(16))
HEADROOM = tuple(1 - 0.006 * i for i in range(16))


@dataclass(frozen=True)
class ScaleParams:
    """One float16 scale per block: d float32 [N], as stored."""

    d: Tensor


@dataclass(frozen=True)
class ScaleMinParams:
    """A float16 scale and min per block: d, m float32 [N], as stored."""

    d: Tensor
    m: Tensor


def f16_bytes(x: Tensor) -> Tensor:
    """float32 [N] -> uint8 [N, 2]: its float16, little-endian."""
    return to_f16(x).half().reshape(-1, 1).view(torch.uint8)


def f16_from(data: Tensor, at: int) -> Tensor:
    """uint8 [N, B] -> float32 [N, 1]: the float16 at byte `at` of each block."""
    return data[:, at:at + 2].contiguous().view(torch.float16).float()


def pack_nibbles(codes: Tensor) -> Tensor:
    """uint8 [..., 32] (each < 16) -> uint8 [..., 16]: byte j = code j | code j+16 << 4."""
    c = codes.to(torch.uint8)
    return c[..., :16] | (c[..., 16:] << 4)


def unpack_nibbles(qs: Tensor) -> Tensor:
    """uint8 [..., 16] -> uint8 [..., 32]: the inverse of pack_nibbles."""
    return torch.cat([qs & 0x0F, qs >> 4], dim=-1)


_BIT = 1 << torch.arange(8, dtype=torch.uint8)


def pack_bits(bits: Tensor) -> Tensor:
    """uint8 [N, 32] of 0/1 -> uint8 [N, 4]: a little-endian uint32 with bit j = bits[:, j]."""
    return (bits.reshape(-1, 4, 8) * _BIT).sum(-1, dtype=torch.uint8)


def unpack_bits(qh: Tensor) -> Tensor:
    """uint8 [N, 4] -> uint8 [N, 32]: the inverse of pack_bits."""
    return ((qh.unsqueeze(-1) & _BIT) != 0).to(torch.uint8).reshape(-1, 32)


class _Legacy(BlockType):
    """Shared geometry: one scale (and min) for each block of 32."""

    block: ClassVar[int] = 32
    sub: ClassVar[int] = 32
    bits: ClassVar[int]
    factors: ClassVar[tuple[float, ...]]

    def nearest(self, table: Tensor, w: Tensor) -> tuple[Tensor, Tensor]:
        return nearest_monotone(table, w, uniform_guess(table, w))

    def _split_codes(self, codes: Tensor) -> tuple[Tensor, Tensor]:
        """codes [N, 32] -> (qs uint8 [N, 16], qh uint8 [N, 4] or empty for 4-bit types)."""
        c = codes.to(torch.uint8)
        qh = pack_bits(c >> 4) if self.bits == 5 else c.new_empty(c.shape[0], 0)
        return pack_nibbles(c & 0x0F), qh

    def _join_codes(self, data: Tensor, at: int) -> Tensor:
        """The codes of the qh (5-bit types) and qs fields from byte `at` on -> uint8 [N, 32]."""
        if self.bits == 5:
            return unpack_nibbles(data[:, at + 4:]) | (unpack_bits(data[:, at:at + 4]) << 4)
        return unpack_nibbles(data[:, at:])


class _Symmetric(_Legacy):
    """value = d * (code + lo): Q4_0, Q5_0, Q8_0."""

    lo: ClassVar[int]

    @property
    def levels(self) -> Levels:
        return Levels.integers(self.lo, self.lo + self.n_levels - 1)

    @property
    def anchors(self) -> tuple[int, ...]:
        """The extreme levels a block's largest weight may sit on (one, for a symmetric grid)."""
        hi = self.lo + self.n_levels - 1
        return (self.lo,) if hi == -self.lo else (self.lo, hi)

    def fit(self, w: Tensor, imp: Tensor) -> ScaleParams:
        d, _ = search_scale(w, imp, self.levels, self.anchors, self.factors)
        return ScaleParams(d)

    def table(self, params: ScaleParams) -> Tensor:
        # d as the bytes hold it, so that any params match their encoding
        return to_f16(params.d).reshape(-1, 1, 1) * self.levels.values.reshape(1, 1, -1)

    def encode(self, params: ScaleParams, codes: Tensor) -> Tensor:
        if self.bits == 8:
            q = (codes.to(torch.int16) + self.lo).to(torch.int8).view(torch.uint8)
            return torch.cat([f16_bytes(params.d), q], dim=-1)
        qs, qh = self._split_codes(codes)
        return torch.cat([f16_bytes(params.d), qh, qs], dim=-1)

    def decode(self, data: Tensor) -> Tensor:
        d = f16_from(data, 0)
        if self.bits == 8:
            q = data[:, 2:].contiguous().view(torch.int8)
        else:
            q = self._join_codes(data, 2).to(torch.int8) + self.lo
        return d * q.float()


class _Affine(_Legacy):
    """value = (d * code) + m: Q4_1, Q5_1."""

    def fit(self, w: Tensor, imp: Tensor) -> ScaleMinParams:
        d, m, _ = search_scale_min(w, imp, self.n_levels - 1, self.factors)
        return ScaleMinParams(d, m)

    def table(self, params: ScaleMinParams) -> Tensor:
        k = torch.arange(self.n_levels, dtype=torch.float32).reshape(1, 1, -1)
        return (to_f16(params.d).reshape(-1, 1, 1) * k) + to_f16(params.m).reshape(-1, 1, 1)

    def encode(self, params: ScaleMinParams, codes: Tensor) -> Tensor:
        qs, qh = self._split_codes(codes)
        return torch.cat([f16_bytes(params.d), f16_bytes(params.m), qh, qs], dim=-1)

    def decode(self, data: Tensor) -> Tensor:
        d, m = f16_from(data, 0), f16_from(data, 2)
        return (d * self._join_codes(data, 4).float()) + m


class Q4_0(_Symmetric):
    name = "Q4_0"
    type_size = 18
    n_levels = 16
    bits = 4
    lo = -8
    factors = CLIPPING


class Q4_1(_Affine):
    name = "Q4_1"
    type_size = 20
    n_levels = 16
    bits = 4
    factors = SPAN


class Q5_0(_Symmetric):
    name = "Q5_0"
    type_size = 22
    n_levels = 32
    bits = 5
    lo = -16
    factors = CLIPPING


class Q5_1(_Affine):
    name = "Q5_1"
    type_size = 24
    n_levels = 32
    bits = 5
    factors = SPAN


class Q8_0(_Symmetric):
    name = "Q8_0"
    type_size = 34
    n_levels = 255
    bits = 8
    lo = -127
    factors = HEADROOM


TYPES: tuple[BlockType, ...] = (Q4_0(), Q4_1(), Q5_0(), Q5_1(), Q8_0())
