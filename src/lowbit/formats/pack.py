"""Bit packing of unsigned integer codes, 1 to 8 bits, along the last dimension.

Layout (little-endian bit order): every 8 consecutive codes of `bits` bits form one
8*bits-bit integer, code i occupying bits [i*bits, (i+1)*bits), which is written as `bits`
bytes, lowest byte first. So 8 codes of 3 bits take 3 bytes, of 4 bits 4 bytes. A row whose
length is not a multiple of 8 is padded with zero codes; `unpack` takes the true length back.

`pack_reference` / `unpack_reference` are the slow, obvious bit-by-bit versions that the fast
ones are tested against (bit-exact).

Shapes: codes [..., n] uint8 -> packed [..., ceil(n / 8) * bits] uint8.
"""

from __future__ import annotations

import torch

from lowbit.errors import ShapeError
from lowbit.formats.affine import check_bits


def packed_length(n: int, bits: int) -> int:
    """Bytes one row of n codes takes."""
    check_bits(bits)
    return -(-n // 8) * bits


def _check_codes(codes: torch.Tensor, bits: int) -> None:
    check_bits(bits)
    if codes.dtype != torch.uint8:
        raise ShapeError(f"codes must be uint8, got {codes.dtype}")
    if codes.numel() and int(codes.max()) >= (1 << bits):
        raise ShapeError(f"a code exceeds the {bits}-bit range (max {int(codes.max())})")


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """codes [..., n] uint8 in [0, 2**bits) -> packed [..., ceil(n/8)*bits] uint8."""
    _check_codes(codes, bits)
    *lead, n = codes.shape
    pad = -n % 8
    c = torch.nn.functional.pad(codes, (0, pad)) if pad else codes
    if bits == 8:  # one code per byte; also keeps the 64-bit word below from overflowing
        return c.clone()
    c = c.reshape(*lead, -1, 8).to(torch.int64)                       # [..., n8, 8]
    shifts = torch.arange(8, dtype=torch.int64) * bits
    word = (c << shifts).sum(-1, keepdim=True)                         # [..., n8, 1] (<= 64 bits)
    byte_shifts = torch.arange(bits, dtype=torch.int64) * 8
    out = (word >> byte_shifts) & 0xFF                                 # [..., n8, bits]
    return out.to(torch.uint8).reshape(*lead, -1)


def unpack(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """packed [..., ceil(n/8)*bits] uint8 -> codes [..., n] uint8."""
    check_bits(bits)
    *lead, m = packed.shape
    if packed.dtype != torch.uint8 or m != packed_length(n, bits):
        raise ShapeError(
            f"packed rows of {m} bytes ({packed.dtype}) do not hold {n} codes of {bits} bits "
            f"(expected {packed_length(n, bits)} uint8 bytes)"
        )
    if bits == 8:
        return packed[..., :n].clone()
    if 8 % bits == 0:  # 1, 2, 4 bits: each byte holds 8 / bits whole codes, lowest bits first
        shifts = torch.arange(0, 8, bits, dtype=torch.uint8)
        codes = (packed.unsqueeze(-1) >> shifts) & ((1 << bits) - 1)  # [..., m, 8 / bits], in bytes
        return codes.reshape(*lead, -1)[..., :n]
    b = packed.reshape(*lead, -1, bits).to(torch.int64)               # [..., n8, bits]
    byte_shifts = torch.arange(bits, dtype=torch.int64) * 8
    word = (b << byte_shifts).sum(-1, keepdim=True)                    # [..., n8, 1]
    shifts = torch.arange(8, dtype=torch.int64) * bits
    codes = (word >> shifts) & ((1 << bits) - 1)                       # [..., n8, 8]
    return codes.to(torch.uint8).reshape(*lead, -1)[..., :n]


def pack_reference(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Bit-by-bit packing over a flat bit stream per row. Slow; for tests."""
    _check_codes(codes, bits)
    *lead, n = codes.shape
    rows = codes.reshape(-1, n).tolist()
    nbytes = packed_length(n, bits)
    out = []
    for row in rows:
        buf = [0] * nbytes
        for i, code in enumerate(row):
            for b in range(bits):
                pos = i * bits + b
                buf[pos // 8] |= ((code >> b) & 1) << (pos % 8)
        out.append(buf)
    return torch.tensor(out, dtype=torch.uint8).reshape(*lead, nbytes)


def unpack_reference(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Bit-by-bit unpacking, inverse of pack_reference. Slow; for tests."""
    check_bits(bits)
    *lead, m = packed.shape
    rows = packed.reshape(-1, m).tolist()
    out = []
    for buf in rows:
        row = []
        for i in range(n):
            code = 0
            for b in range(bits):
                pos = i * bits + b
                code |= ((buf[pos // 8] >> (pos % 8)) & 1) << b
            row.append(code)
        out.append(row)
    return torch.tensor(out, dtype=torch.uint8).reshape(*lead, n)
