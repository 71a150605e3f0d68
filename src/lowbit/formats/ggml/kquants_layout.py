"""The byte layouts of llama.cpp's K quants (Q2_K ... Q6_K): fields in, bytes out, and back.

Each super-block holds 256 weights. The fields are plain tensors over N super-blocks:
d, dmin float16 [N]; sc, m integer [N, sub-blocks] (the stored integers: Q3_K's signed sub-scale,
not its biased byte); codes uint8 [N, 256] (what the code stores, 0 .. 2**bits - 1).
The orders below are llama.cpp's (as its Python reference, gguf-py, reads them).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

QK = 256  # weights per super-block


def pack(fields: torch.Tensor, bits: int) -> torch.Tensor:
    """[N, G, K, I] small integers -> uint8 [N, G * I]: byte (g, i) holds field (g, k, i) at bit bits * k."""
    f = fields.to(torch.uint8)
    out = torch.zeros(f.shape[0], f.shape[1], f.shape[3], dtype=torch.uint8)
    for k in range(f.shape[2]):
        out |= f[:, :, k] << (bits * k)
    return out.reshape(f.shape[0], f.shape[1] * f.shape[3])


def unpack(data: torch.Tensor, groups: int, per_byte: int, bits: int) -> torch.Tensor:
    """uint8 [N, G * I] -> uint8 [N, G, K, I], the inverse of `pack` (K = per_byte)."""
    n = data.shape[0]
    x = data.reshape(n, groups, 1, data.shape[1] // groups)
    shifts = torch.arange(per_byte, dtype=torch.uint8).reshape(1, 1, -1, 1) * bits
    return (x >> shifts) & ((1 << bits) - 1)


def f16_bytes(x: torch.Tensor) -> torch.Tensor:
    """float16 [N] -> uint8 [N, 2] (little-endian, as the file stores it)."""
    return x.to(torch.float16).reshape(-1, 1).view(torch.uint8)


def bytes_f16(b: torch.Tensor) -> torch.Tensor:
    """uint8 [N, 2] -> float16 [N]."""
    return b.contiguous().view(torch.float16).reshape(-1)


@dataclass(frozen=True)
class KFields:
    """One K-quant super-block's stored fields (see the module docstring)."""

    d: torch.Tensor
    dmin: torch.Tensor | None
    sc: torch.Tensor
    m: torch.Tensor | None
    codes: torch.Tensor


def _split(data: torch.Tensor, sizes: list[int]) -> list[torch.Tensor]:
    return list(torch.split(data, sizes, dim=1))


# Q4_K / Q5_K: eight 6-bit scales and eight 6-bit mins in 12 bytes. For j < 4:
#   byte j     = sc[j]  | (sc[j+4] >> 4) << 6
#   byte 4 + j = m[j]   | (m[j+4]  >> 4) << 6
#   byte 8 + j = (sc[j+4] & 15) | (m[j+4] & 15) << 4
def pack_scale_min_6bit(sc: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """sc, m [N, 8] in 0..63 -> uint8 [N, 12]."""
    sc, m = sc.to(torch.uint8), m.to(torch.uint8)
    lo_sc, hi_sc, lo_m, hi_m = sc[:, :4], sc[:, 4:], m[:, :4], m[:, 4:]
    first = lo_sc | ((hi_sc >> 4) << 6)
    second = lo_m | ((hi_m >> 4) << 6)
    third = (hi_sc & 15) | ((hi_m & 15) << 4)
    return torch.cat([first, second, third], dim=1)


def unpack_scale_min_6bit(s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 [N, 12] -> sc, m uint8 [N, 8]."""
    a, b, c = s[:, :4], s[:, 4:8], s[:, 8:]
    sc = torch.cat([a & 63, (c & 15) | ((a >> 2) & 48)], dim=1)
    m = torch.cat([b & 63, (c >> 4) | ((b >> 2) & 48)], dim=1)
    return sc, m


# Q3_K: sixteen 6-bit sub-scales, stored biased (sc + 32), in 12 bytes: bytes 0..7 hold the low
# nibbles (sub-block k in the low half of byte k, sub-block 8 + k in the high half), bytes 8..11 the
# top two bits (sub-block 4 * g + k at bits 2g of byte 8 + k).
def pack_scales_q3(sc: torch.Tensor) -> torch.Tensor:
    """signed sc [N, 16] in -32..31 -> uint8 [N, 12]."""
    n = sc.shape[0]
    s6 = (sc.to(torch.int16) + 32).to(torch.uint8)
    low = pack((s6 & 15).reshape(n, 1, 2, 8), 4)
    high = pack((s6 >> 4).reshape(n, 1, 4, 4), 2)
    return torch.cat([low, high], dim=1)


def unpack_scales_q3(s: torch.Tensor) -> torch.Tensor:
    """uint8 [N, 12] -> signed sc int16 [N, 16]."""
    n = s.shape[0]
    low = unpack(s[:, :8], 1, 2, 4).reshape(n, 16)
    high = unpack(s[:, 8:], 1, 4, 2).reshape(n, 16)
    return (low | (high << 4)).to(torch.int16) - 32


def encode_q2_k(f: KFields) -> torch.Tensor:
    """Q2_K, 84 bytes: scales[16] (sc | m << 4), qs[64] (2-bit codes), d, dmin."""
    n = f.codes.shape[0]
    scales = pack(torch.stack([f.sc, f.m], dim=2).reshape(n, 16, 2, 1), 4)
    qs = pack(f.codes.reshape(n, 2, 4, 32), 2)
    return torch.cat([scales, qs, f16_bytes(f.d), f16_bytes(f.dmin)], dim=1)


def decode_q2_k(data: torch.Tensor) -> KFields:
    n = data.shape[0]
    scales, qs, d, dmin = _split(data, [16, 64, 2, 2])
    return KFields(bytes_f16(d), bytes_f16(dmin), scales & 15, scales >> 4,
                   unpack(qs, 2, 4, 2).reshape(n, QK))


def encode_q3_k(f: KFields) -> torch.Tensor:
    """Q3_K, 110 bytes: hmask[32] (bit 2 of each code), qs[64] (bits 0-1), scales[12], d."""
    n = f.codes.shape[0]
    hmask = pack((f.codes >> 2).reshape(n, 1, 8, 32), 1)
    qs = pack((f.codes & 3).reshape(n, 2, 4, 32), 2)
    return torch.cat([hmask, qs, pack_scales_q3(f.sc), f16_bytes(f.d)], dim=1)


def decode_q3_k(data: torch.Tensor) -> KFields:
    n = data.shape[0]
    hmask, qs, scales, d = _split(data, [32, 64, 12, 2])
    codes = unpack(qs, 2, 4, 2).reshape(n, QK) | (unpack(hmask, 1, 8, 1).reshape(n, QK) << 2)
    return KFields(bytes_f16(d), None, unpack_scales_q3(scales), None, codes)


def encode_q4_k(f: KFields) -> torch.Tensor:
    """Q4_K, 144 bytes: d, dmin, scales[12] (6-bit sc and m), qs[128] (4-bit codes)."""
    n = f.codes.shape[0]
    qs = pack(f.codes.reshape(n, 4, 2, 32), 4)
    return torch.cat([f16_bytes(f.d), f16_bytes(f.dmin), pack_scale_min_6bit(f.sc, f.m), qs], dim=1)


def decode_q4_k(data: torch.Tensor) -> KFields:
    n = data.shape[0]
    d, dmin, scales, qs = _split(data, [2, 2, 12, 128])
    sc, m = unpack_scale_min_6bit(scales)
    return KFields(bytes_f16(d), bytes_f16(dmin), sc, m, unpack(qs, 4, 2, 4).reshape(n, QK))


def encode_q5_k(f: KFields) -> torch.Tensor:
    """Q5_K, 176 bytes: d, dmin, scales[12], qh[32] (bit 4 of each code), qs[128] (bits 0-3)."""
    n = f.codes.shape[0]
    qh = pack((f.codes >> 4).reshape(n, 1, 8, 32), 1)
    qs = pack((f.codes & 15).reshape(n, 4, 2, 32), 4)
    return torch.cat([f16_bytes(f.d), f16_bytes(f.dmin), pack_scale_min_6bit(f.sc, f.m), qh, qs], dim=1)


def decode_q5_k(data: torch.Tensor) -> KFields:
    n = data.shape[0]
    d, dmin, scales, qh, qs = _split(data, [2, 2, 12, 32, 128])
    sc, m = unpack_scale_min_6bit(scales)
    codes = unpack(qs, 4, 2, 4).reshape(n, QK) | (unpack(qh, 1, 8, 1).reshape(n, QK) << 4)
    return KFields(bytes_f16(d), bytes_f16(dmin), sc, m, codes)


def encode_q6_k(f: KFields) -> torch.Tensor:
    """Q6_K, 210 bytes: ql[128] (bits 0-3 of each code), qh[64] (bits 4-5), int8 scales[16], d."""
    n = f.codes.shape[0]
    ql = pack((f.codes & 15).reshape(n, 2, 2, 64), 4)
    qh = pack((f.codes >> 4).reshape(n, 2, 4, 32), 2)
    scales = f.sc.to(torch.int8).view(torch.uint8)
    return torch.cat([ql, qh, scales, f16_bytes(f.d)], dim=1)


def decode_q6_k(data: torch.Tensor) -> KFields:
    n = data.shape[0]
    ql, qh, scales, d = _split(data, [128, 64, 16, 2])
    codes = unpack(ql, 2, 2, 4).reshape(n, QK) | (unpack(qh, 2, 4, 2).reshape(n, QK) << 4)
    return KFields(bytes_f16(d), None, scales.contiguous().view(torch.int8).to(torch.int16), None, codes)
