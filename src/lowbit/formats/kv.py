"""Low-bit KV-cache formats (KIVI, Liu et al. 2024): keys per channel, values per token.

Key outliers sit in fixed channels, so keys are quantized per channel: each channel of a block of
`block` consecutive tokens gets one scale and minimum. Values have no channel outliers and are
consumed token by token, so each token's vector is quantized in groups of `group_size` channels.

The format is KIVI's: a group's values x become codes round((x - m) / s) in [0, 2**bits) with a
float16 minimum m and a float16 scale s (rounded up so the range fits), read back as
code * s + m. Unlike the weights' integer zero points (formats/affine.py), whose range must
contain 0, a float minimum follows channels that sit far from zero: Qwen2's key biases put whole
channels at +-100, where a range forced to include 0 wastes most of the levels (perplexity of
qwen2.5-coder-1.5b 40.7 instead of 13.2 at 4 bits). Codes use the bit packing of
formats/pack.py, so the bytes held are the packed codes plus two float16 numbers per group.

Shapes follow transformers' caches: [batch, kv_heads, tokens, head_dim].

    keys   [B, H, n_blocks * block, D] <-> KVBlocks(codes [n_blocks, B*H*D, packed(block)], ...)
    values [B, H, T, D]                <-> KVBlocks(codes [T, B*H, packed(D)], ...)

The leading axis is the one a cache appends to, so growing a cache is a concatenation.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from lowbit.errors import ShapeError
from lowbit.formats import affine, pack


@dataclass
class KVBlocks:
    """Packed codes and per-group parameters along an append axis (see the module docstring)."""

    codes: torch.Tensor    # uint8 [n, rows, packed_length(width, bits)]
    scales: torch.Tensor   # float16 [n, rows, groups]
    mins: torch.Tensor     # float16 [n, rows, groups]
    bits: int
    width: int             # values per row before packing (block tokens for keys, head_dim for values)
    group_size: int        # values per group within a row

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.codes, self.scales, self.mins))

    def __len__(self) -> int:
        return self.codes.shape[0]

    def append(self, other: KVBlocks) -> KVBlocks:
        if (other.bits, other.width, other.group_size) != (self.bits, self.width, self.group_size):
            raise ShapeError("cannot append KV blocks of another format")
        return KVBlocks(torch.cat([self.codes, other.codes]), torch.cat([self.scales, other.scales]),
                        torch.cat([self.mins, other.mins]), self.bits, self.width, self.group_size)


CLIP_GRID, CLIP_MAX_SHRINK = 20, 0.8   # `clip=True`: range shrinks 1, 0.96, ..., 0.2 around the centre


def minmax_qparams(xg: torch.Tensor, bits: int, shrink: torch.Tensor | float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """xg [..., group] -> (scale, minimum) [...], both float16 values held in float32.

    The group's range, shrunk around its centre by `shrink`, is split into 2**bits - 1 steps; the
    scale is rounded up to float16 so the range fits, the minimum rounded to nearest."""
    lo, hi = xg.amin(-1), xg.amax(-1)
    centre, half = (lo + hi) / 2, (hi - lo) / 2 * shrink
    scale = affine.round_scale_up((2 * half) / ((1 << bits) - 1))
    return scale, (centre - half).to(affine.SCALE_DTYPE).float()


def minmax_codes(xg: torch.Tensor, scale: torch.Tensor, mn: torch.Tensor, bits: int) -> torch.Tensor:
    """Codes round((x - m) / s) clamped to [0, 2**bits); a zero scale (constant group) gives 0."""
    safe = torch.where(scale > 0, scale, torch.ones_like(scale)).unsqueeze(-1)
    return ((xg - mn.unsqueeze(-1)) / safe).round_().clamp_(0, (1 << bits) - 1).to(torch.uint8)


def _clip_shrink(xg: torch.Tensor, bits: int) -> torch.Tensor:
    """Per group, the shrink in [1 - CLIP_MAX_SHRINK, 1] with the least squared error (ties keep
    the wider range)."""
    best, best_err = torch.ones(xg.shape[:-1]), torch.full(xg.shape[:-1], float("inf"))
    for i in range(CLIP_GRID + 1):
        r = 1.0 - CLIP_MAX_SHRINK * i / CLIP_GRID
        scale, mn = minmax_qparams(xg, bits, r)
        err = (minmax_codes(xg, scale, mn, bits).float() * scale.unsqueeze(-1) + mn.unsqueeze(-1) - xg).pow_(2).sum(-1)
        better = err < best_err
        best_err, best = torch.where(better, err, best_err), torch.where(better, torch.full_like(best, r), best)
    return best


def _quantize_rows(x: torch.Tensor, bits: int, group_size: int,
                   clip: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x [n, rows, width] -> packed codes [n, rows, P], scales / minimums [n, rows, G] (float16).
    With `clip`, each group's range is shrunk by the factor that minimizes its squared error."""
    n, rows, width = x.shape
    if width % group_size:
        raise ShapeError(f"KV rows of {width} values do not split into groups of {group_size}")
    flat = x.reshape(n * rows, width).float()
    xg = affine.group_view(flat, group_size)
    shrink = _clip_shrink(xg, bits) if clip else 1.0
    scale, mn = minmax_qparams(xg, bits, shrink)
    codes = affine.ungroup(minmax_codes(xg, scale, mn, bits), width)
    g = scale.shape[-1]
    return (pack.pack(codes, bits).reshape(n, rows, -1), scale.to(affine.SCALE_DTYPE).reshape(n, rows, g),
            mn.to(affine.SCALE_DTYPE).reshape(n, rows, g))


def _dequantize_rows(q: KVBlocks, dtype: torch.dtype) -> torch.Tensor:
    """KVBlocks -> [n, rows, width] in dtype: code * scale + minimum."""
    n, rows, _ = q.codes.shape
    codes = pack.unpack(q.codes.reshape(n * rows, -1), q.bits, q.width)
    g = q.scales.shape[-1]
    cg = affine.group_view(codes, q.group_size).float()
    w = cg * q.scales.reshape(n * rows, g, 1).float() + q.mins.reshape(n * rows, g, 1).float()
    return affine.ungroup(w, q.width).reshape(n, rows, q.width).to(dtype)


def quantize_keys(k: torch.Tensor, bits: int, block: int, clip: bool = False) -> KVBlocks:
    """Keys [B, H, T, D] with T a multiple of `block` -> per-channel blocks of `block` tokens."""
    B, H, T, D = _check(k, "keys")
    if T % block:
        raise ShapeError(f"keys: {T} tokens is not a whole number of blocks of {block}")
    n = T // block
    x = k.reshape(B, H, n, block, D).permute(2, 0, 1, 4, 3).reshape(n, B * H * D, block)
    codes, scales, mins = _quantize_rows(x, bits, block, clip)
    return KVBlocks(codes, scales, mins, bits, block, block)


def dequantize_keys(q: KVBlocks, batch: int, heads: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Inverse of quantize_keys -> [B, H, n_blocks * block, D]."""
    n, rows, _ = q.codes.shape
    D = rows // (batch * heads)
    x = _dequantize_rows(q, dtype).reshape(n, batch, heads, D, q.width)
    return x.permute(1, 2, 0, 4, 3).reshape(batch, heads, n * q.width, D)


def quantize_values(v: torch.Tensor, bits: int, group_size: int, clip: bool = False) -> KVBlocks:
    """Values [B, H, T, D] -> per-token groups of `group_size` channels."""
    B, H, T, D = _check(v, "values")
    x = v.permute(2, 0, 1, 3).reshape(T, B * H, D)
    codes, scales, mins = _quantize_rows(x, bits, affine.resolve_group_size(D, group_size), clip)
    return KVBlocks(codes, scales, mins, bits, D, affine.resolve_group_size(D, group_size))


def dequantize_values(q: KVBlocks, batch: int, heads: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Inverse of quantize_values -> [B, H, T, D]."""
    T = q.codes.shape[0]
    return _dequantize_rows(q, dtype).reshape(T, batch, heads, q.width).permute(1, 2, 0, 3)


def _check(x: torch.Tensor, what: str) -> tuple[int, int, int, int]:
    if x.dim() != 4:
        raise ShapeError(f"{what} must be [batch, heads, tokens, head_dim], got shape {tuple(x.shape)}")
    return tuple(x.shape)


# --- ZipCache: mixed precision per (token, head): keys per channel within each set, values per row ---

@dataclass
class MixedRows:
    """Rows of `width` values, each quantized per row at one of two widths.

    `salient` (bool [rows], stored bit-packed) says which rows went to `hi_bits`. The rows keep
    their order: dequantize scatters the two sets back.
    """

    hi: KVBlocks | None       # n = 1, rows = number of salient rows
    lo: KVBlocks | None
    salient_bits: torch.Tensor  # uint8 [ceil(rows / 8)], numpy.packbits order
    rows: int
    width: int

    def nbytes(self) -> int:
        held = self.salient_bits.numel()
        return held + sum(q.nbytes() for q in (self.hi, self.lo) if q is not None)


def quantize_rows_mixed(x: torch.Tensor, salient: torch.Tensor, hi_bits: int, lo_bits: int,
                        group_size: int, clip: bool = False) -> MixedRows:
    """x [rows, width]; rows where `salient` is True at `hi_bits`, the others at `lo_bits`."""
    rows, width = x.shape
    if salient.shape != (rows,):
        raise ShapeError(f"salient must have one flag per row ({rows}), got shape {tuple(salient.shape)}")
    g = affine.resolve_group_size(width, group_size)

    def part(mask: torch.Tensor, bits: int) -> KVBlocks | None:
        if not bool(mask.any()):
            return None
        codes, scales, mins = _quantize_rows(x[mask].unsqueeze(0), bits, g, clip)
        return KVBlocks(codes, scales, mins, bits, width, g)

    packed = torch.from_numpy(np.packbits(salient.cpu().numpy().astype(np.uint8)))
    return MixedRows(part(salient, hi_bits), part(~salient, lo_bits), packed, rows, width)


def dequantize_rows_mixed(q: MixedRows, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Inverse of quantize_rows_mixed -> [rows, width]."""
    flags = np.unpackbits(q.salient_bits.numpy(), count=q.rows).astype(bool)
    salient = torch.from_numpy(flags)
    out = torch.empty(q.rows, q.width, dtype=dtype)
    if q.hi is not None:
        out[salient] = _dequantize_rows(q.hi, dtype)[0]
    if q.lo is not None:
        out[~salient] = _dequantize_rows(q.lo, dtype)[0]
    return out


@dataclass
class MixedKeys:
    """A block of keys [B, H, T, D] whose every head has the same number of salient tokens: per
    head, the salient tokens are quantized per channel at `hi` bits (one scale and zero per channel
    over those tokens), the others per channel at `lo` bits, as KIVI quantizes keys. `salient`
    (bool [B, H, T], stored bit-packed) puts the tokens back in order.
    """

    hi: KVBlocks | None       # quantize_keys of the salient tokens [B, H, n_hi, D], block = n_hi
    lo: KVBlocks | None       # the rest [B, H, T - n_hi, D], block = T - n_hi
    salient_bits: torch.Tensor
    shape: tuple[int, int, int, int]

    def nbytes(self) -> int:
        return self.salient_bits.numel() + sum(q.nbytes() for q in (self.hi, self.lo) if q is not None)


def _salient_first(salient: torch.Tensor) -> torch.Tensor:
    """Per head, the token order that puts the salient tokens first (each set in time order)."""
    return torch.argsort((~salient).to(torch.uint8), dim=-1, stable=True)


def quantize_keys_mixed(k: torch.Tensor, salient: torch.Tensor, hi_bits: int, lo_bits: int,
                        clip: bool = False) -> MixedKeys:
    """Keys [B, H, T, D]; salient bool [B, H, T] with the same count in every head."""
    B, H, T, D = _check(k, "keys")
    if salient.shape != (B, H, T):
        raise ShapeError(f"salient must be [batch, heads, tokens] = {(B, H, T)}, got {tuple(salient.shape)}")
    counts = salient.sum(-1)
    n_hi = int(counts.flatten()[0]) if counts.numel() else 0
    if bool((counts != n_hi).any()):
        raise ShapeError("every head needs the same number of salient tokens")
    order = _salient_first(salient)
    ks = k.gather(2, order.unsqueeze(-1).expand(B, H, T, D))
    hi = quantize_keys(ks[:, :, :n_hi], hi_bits, n_hi, clip) if n_hi else None
    lo = quantize_keys(ks[:, :, n_hi:], lo_bits, T - n_hi, clip) if n_hi < T else None
    packed = torch.from_numpy(np.packbits(salient.reshape(-1).cpu().numpy().astype(np.uint8)))
    return MixedKeys(hi, lo, packed, (B, H, T, D))


def dequantize_keys_mixed(q: MixedKeys, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Inverse of quantize_keys_mixed -> [B, H, T, D]."""
    B, H, T, D = q.shape
    flags = np.unpackbits(q.salient_bits.numpy(), count=B * H * T).astype(bool)
    order = _salient_first(torch.from_numpy(flags).reshape(B, H, T))
    parts = [dequantize_keys(p, B, H, dtype) for p in (q.hi, q.lo) if p is not None]
    out = torch.empty(B, H, T, D, dtype=dtype)
    out.scatter_(2, order.unsqueeze(-1).expand(B, H, T, D), torch.cat(parts, 2))
    return out


# --- GEAR: sparse outliers + low-rank approximation of the quantization residual ---

@dataclass
class Residual:
    """What GEAR adds on top of a quantized block [M, T, D] (M = batch * heads matrices).

    x ~= dequantized + sparse(outlier_idx, outlier_val) + left @ right^T
    """

    outlier_idx: torch.Tensor  # int32 [M, k]: flat index into the T * D entries of each matrix
    outlier_val: torch.Tensor  # float16 [M, k]
    left: torch.Tensor         # float16 [M, T, r]
    right: torch.Tensor        # float16 [M, D, r]

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.outlier_idx, self.outlier_val, self.left, self.right))


def split_outliers(x: torch.Tensor, fraction: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x [M, T, D] -> (x with its largest-magnitude `fraction` of entries per matrix zeroed,
    their flat indices int32 [M, k], their values float16 [M, k])."""
    M, T, D = x.shape
    k = round(fraction * T * D)
    flat = x.reshape(M, T * D)
    if k == 0:
        return x, torch.zeros(M, 0, dtype=torch.int32), torch.zeros(M, 0, dtype=affine.SCALE_DTYPE)
    idx = flat.abs().topk(k, dim=1).indices
    vals = flat.gather(1, idx)
    rest = flat.scatter(1, idx, 0.0).reshape(M, T, D)
    return rest, idx.to(torch.int32), vals.to(affine.SCALE_DTYPE)


def lowrank(residual: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Best rank-`rank` factors (Eckart-Young, by SVD) of each matrix of residual [M, T, D]:
    left [M, T, r] (singular values folded in), right [M, D, r], both float16."""
    _, T, D = residual.shape
    r = min(rank, T, D)
    U, S, Vh = torch.linalg.svd(residual.float(), full_matrices=False)
    left = U[..., :r] * S[:, None, :r]
    return left.to(affine.SCALE_DTYPE), Vh[:, :r, :].transpose(1, 2).to(affine.SCALE_DTYPE)


def apply_residual(deq: torch.Tensor, res: Residual) -> torch.Tensor:
    """deq [M, T, D] + low-rank + outliers (the outliers overwrite their entries)."""
    M, T, D = deq.shape
    out = deq + (res.left.float() @ res.right.float().transpose(1, 2)).to(deq.dtype)
    if res.outlier_idx.numel():
        out = out.reshape(M, T * D).scatter(1, res.outlier_idx.long(), res.outlier_val.to(deq.dtype)).reshape(M, T, D)
    return out
