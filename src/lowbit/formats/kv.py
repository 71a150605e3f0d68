"""Low-bit KV-cache formats (KIVI, Liu et al. 2024): keys per channel, values per token.

Key outliers sit in fixed channels, so keys are quantized per channel: each channel of a block of
`block` consecutive tokens gets one scale and zero. Values have no channel outliers and are
consumed token by token, so each token's vector is quantized in groups of `group_size` channels.
Both use the asymmetric integer format of formats/affine.py (float16 scales rounded up, integer
zero points) and the bit packing of formats/pack.py, so the bytes held are the packed codes plus
the scales and zeros.

Shapes follow transformers' caches: [batch, kv_heads, tokens, head_dim].

    keys   [B, H, n_blocks * block, D] <-> KVBlocks(codes [n_blocks, B*H*D, packed(block)], ...)
    values [B, H, T, D]                <-> KVBlocks(codes [T, B*H, packed(D)], ...)

The leading axis is the one a cache appends to, so growing a cache is a concatenation.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lowbit.errors import ShapeError
from lowbit.formats import affine, pack


@dataclass
class KVBlocks:
    """Packed codes and per-group parameters along an append axis (see the module docstring)."""

    codes: torch.Tensor    # uint8 [n, rows, packed_length(width, bits)]
    scales: torch.Tensor   # float16 [n, rows, groups]
    zeros: torch.Tensor    # uint8 [n, rows, groups]
    bits: int
    width: int             # values per row before packing (block tokens for keys, head_dim for values)
    group_size: int        # values per group within a row

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.codes, self.scales, self.zeros))

    def __len__(self) -> int:
        return self.codes.shape[0]

    def append(self, other: "KVBlocks") -> "KVBlocks":
        if (other.bits, other.width, other.group_size) != (self.bits, self.width, self.group_size):
            raise ShapeError("cannot append KV blocks of another format")
        return KVBlocks(torch.cat([self.codes, other.codes]), torch.cat([self.scales, other.scales]),
                        torch.cat([self.zeros, other.zeros]), self.bits, self.width, self.group_size)


def _quantize_rows(x: torch.Tensor, bits: int, group_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x [n, rows, width] -> packed codes [n, rows, P], scales / zeros [n, rows, G]."""
    n, rows, width = x.shape
    flat = x.reshape(n * rows, width).float()
    wg = affine.group_view(flat, group_size)
    scale, zero = affine.choose_qparams(wg, bits, symmetric=False)
    codes = affine.ungroup(affine.quantize_groups(wg, scale, zero, bits), width)
    packed = pack.pack(codes, bits)
    g = scale.shape[-1]
    return (packed.reshape(n, rows, -1), scale.to(affine.SCALE_DTYPE).reshape(n, rows, g),
            zero.to(torch.uint8).reshape(n, rows, g))


def _dequantize_rows(q: KVBlocks, dtype: torch.dtype) -> torch.Tensor:
    """KVBlocks -> [n, rows, width] in dtype."""
    n, rows, _ = q.codes.shape
    codes = pack.unpack(q.codes.reshape(n * rows, -1), q.bits, q.width)
    g = q.scales.shape[-1]
    w = affine.dequantize(codes, q.scales.reshape(n * rows, g).float(), q.zeros.reshape(n * rows, g).float(),
                          q.group_size)
    return w.reshape(n, rows, q.width).to(dtype)


def quantize_keys(k: torch.Tensor, bits: int, block: int) -> KVBlocks:
    """Keys [B, H, T, D] with T a multiple of `block` -> per-channel blocks of `block` tokens."""
    B, H, T, D = _check(k, "keys")
    if T % block:
        raise ShapeError(f"keys: {T} tokens is not a whole number of blocks of {block}")
    n = T // block
    x = k.reshape(B, H, n, block, D).permute(2, 0, 1, 4, 3).reshape(n, B * H * D, block)
    codes, scales, zeros = _quantize_rows(x, bits, block)
    return KVBlocks(codes, scales, zeros, bits, block, block)


def dequantize_keys(q: KVBlocks, batch: int, heads: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Inverse of quantize_keys -> [B, H, n_blocks * block, D]."""
    n, rows, _ = q.codes.shape
    D = rows // (batch * heads)
    x = _dequantize_rows(q, dtype).reshape(n, batch, heads, D, q.width)
    return x.permute(1, 2, 0, 4, 3).reshape(batch, heads, n * q.width, D)


def quantize_values(v: torch.Tensor, bits: int, group_size: int) -> KVBlocks:
    """Values [B, H, T, D] -> per-token groups of `group_size` channels."""
    B, H, T, D = _check(v, "values")
    x = v.permute(2, 0, 1, 3).reshape(T, B * H, D)
    codes, scales, zeros = _quantize_rows(x, bits, affine.resolve_group_size(D, group_size))
    return KVBlocks(codes, scales, zeros, bits, D, affine.resolve_group_size(D, group_size))


def dequantize_values(q: KVBlocks, batch: int, heads: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Inverse of quantize_values -> [B, H, T, D]."""
    T = q.codes.shape[0]
    return _dequantize_rows(q, dtype).reshape(T, batch, heads, q.width).permute(1, 2, 0, 3)


def _check(x: torch.Tensor, what: str) -> tuple[int, int, int, int]:
    if x.dim() != 4:
        raise ShapeError(f"{what} must be [batch, heads, tokens, head_dim], got shape {tuple(x.shape)}")
    return tuple(x.shape)
