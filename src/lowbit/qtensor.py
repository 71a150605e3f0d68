"""QuantizedWeight: the one plain record of what a quantized weight is.

Algorithms produce it, the runtime runs it, the checkpoint stores it. It holds unpacked codes
(one uint8 per weight, for easy math); `packed()` / `from_packed()` convert to the byte layout
the checkpoint stores (formats/pack.py): codes packed row by row, zero points packed as one
flat stream (no per-row padding).

    w[:, perm][r, g*gs + j]  ~=  (codes[r, g*gs + j] - zero[r, g]) * scale[r, g]

`perm` (optional, from GPTQ act-order without static groups) says the codes are stored in a
permuted column order: column k of `codes` is column perm[k] of the original weight.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lowbit.errors import ShapeError
from lowbit.formats import affine, pack



@dataclass(frozen=True)
class QuantFormat:
    """The format of one quantized weight: what a reader needs besides the tensors."""

    bits: int
    group_size: int  # columns per group; equals in_features for per-channel
    symmetric: bool

    def __post_init__(self) -> None:
        affine.check_bits(self.bits)
        if self.group_size < 1:
            raise ShapeError(f"group_size must be >= 1 once resolved, got {self.group_size}")

    def to_dict(self) -> dict:
        return {"bits": self.bits, "group_size": self.group_size, "symmetric": self.symmetric}


def zero_points(zeros: torch.Tensor | None, scales: torch.Tensor, bits: int) -> torch.Tensor:
    """Zero points as float [out, G]: the stored ones, or the fixed midpoint of symmetric formats."""
    if zeros is None:
        return torch.full(scales.shape, float(1 << (bits - 1)), device=scales.device)
    return zeros.float()


def dequantize_parts(
    codes: torch.Tensor,
    scales: torch.Tensor,
    zero_points: torch.Tensor,
    group_size: int,
    perm: torch.Tensor | None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """codes [out, in], scales / zero points [out, G], optional perm [in] -> weight [out, in].

    The one dequantization rule, shared by QuantizedWeight and the runtime modules.
    """
    w = affine.dequantize(codes, scales, zero_points, group_size)
    if perm is not None:
        w = w[:, torch.argsort(perm)]
    return w.to(dtype)


@dataclass(frozen=True)
class QuantizedWeight:
    codes: torch.Tensor          # uint8 [out, in]
    scales: torch.Tensor         # float16 [out, in // group_size]
    zeros: torch.Tensor | None   # uint8 [out, in // group_size]; None when symmetric
    fmt: QuantFormat
    perm: torch.Tensor | None = None  # int64 [in] or None

    def __post_init__(self) -> None:
        out, n_in = self.codes.shape
        g = affine.n_groups(n_in, self.fmt.group_size)
        if self.codes.dtype != torch.uint8:
            raise ShapeError(f"codes must be uint8, got {self.codes.dtype}")
        if self.fmt.group_size > n_in:
            raise ShapeError(f"group_size {self.fmt.group_size} exceeds in_features {n_in}")
        if tuple(self.scales.shape) != (out, g) or self.scales.dtype != affine.SCALE_DTYPE:
            raise ShapeError(f"scales must be float16 [{out}, {g}], got {self.scales.dtype} {tuple(self.scales.shape)}")
        if self.fmt.symmetric != (self.zeros is None):
            raise ShapeError("symmetric formats have no zeros; asymmetric formats need them")
        if self.zeros is not None and (tuple(self.zeros.shape) != (out, g) or self.zeros.dtype != torch.uint8):
            raise ShapeError(f"zeros must be uint8 [{out}, {g}], got {self.zeros.dtype} {tuple(self.zeros.shape)}")
        if self.perm is not None and (
            tuple(self.perm.shape) != (n_in,) or not torch.equal(self.perm.sort().values, torch.arange(n_in))
        ):
            raise ShapeError("perm must be a permutation of range(in_features)")

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.codes.shape)

    def zero_points(self) -> torch.Tensor:
        return zero_points(self.zeros, self.scales, self.fmt.bits)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The weight this record stands for, [out, in] in the original column order."""
        return dequantize_parts(self.codes, self.scales, self.zero_points(), self.fmt.group_size, self.perm, dtype)

    def nbytes(self) -> int:
        """Bytes of the packed form: codes, scales, zeros and permutation."""
        out, n_in = self.shape
        g = self.scales.shape[1]
        total = out * pack.packed_length(n_in, self.fmt.bits) + self.scales.numel() * 2
        if self.zeros is not None:
            total += pack.packed_length(out * g, self.fmt.bits)
        if self.perm is not None:
            total += n_in * 4
        return total

    # ---- packed form (what the checkpoint stores) ----
    def packed(self) -> dict[str, torch.Tensor]:
        t = {"codes": pack.pack(self.codes, self.fmt.bits), "scales": self.scales.contiguous()}
        if self.zeros is not None:
            t["zeros"] = pack.pack(self.zeros.reshape(-1), self.fmt.bits)  # flat: no per-row padding
        if self.perm is not None:
            t["perm"] = self.perm.to(torch.int32)
        return t

    @classmethod
    def from_packed(cls, tensors: dict[str, torch.Tensor], fmt: QuantFormat, shape: tuple[int, int]) -> "QuantizedWeight":
        out, n_in = shape
        g = affine.n_groups(n_in, fmt.group_size)
        zeros = tensors.get("zeros")
        perm = tensors.get("perm")
        return cls(
            codes=pack.unpack(tensors["codes"], fmt.bits, n_in),
            scales=tensors["scales"],
            zeros=None if zeros is None else pack.unpack(zeros, fmt.bits, out * g).reshape(out, g),
            fmt=fmt,
            perm=None if perm is None else perm.to(torch.int64),
        )

    @classmethod
    def from_float_qparams(
        cls,
        codes: torch.Tensor,
        scale: torch.Tensor,
        zero: torch.Tensor,
        fmt: QuantFormat,
        perm: torch.Tensor | None = None,
    ) -> "QuantizedWeight":
        """Build from the float32 scale / zero that formats.affine returns."""
        return cls(
            codes=codes,
            scales=scale.to(affine.SCALE_DTYPE),
            zeros=None if fmt.symmetric else zero.round().to(torch.uint8),
            fmt=fmt,
            perm=perm,
        )
