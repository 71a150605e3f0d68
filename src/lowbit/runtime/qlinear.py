"""QuantLinear: an nn.Module that runs a QuantizedWeight.

This is the reference runtime: it dequantizes the weight to the activation dtype on every call
and runs a dense matmul. Fast packed kernels are a later layer; they must match this one.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from lowbit.formats.affine import n_groups
from lowbit.qtensor import (
    QuantFormat,
    QuantizedWeight,
    dequantize_parts,
    float_scales,
    zero_points,
)


class QuantLinear(nn.Module):
    def __init__(
        self,
        in_features: int,
        out_features: int,
        fmt: QuantFormat,
        bias: bool = False,
        has_perm: bool = False,
        mixed: bool = False,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ):
        super().__init__()
        self.in_features, self.out_features, self.fmt = in_features, out_features, fmt
        g = n_groups(in_features, fmt.group_size)
        self.register_buffer("codes", torch.zeros(out_features, in_features, dtype=torch.uint8, device=device))
        self.register_buffer("scales", torch.zeros(out_features, g, dtype=fmt.scale_dtype, device=device))
        self.register_buffer(
            "scale_mult", torch.zeros(out_features, dtype=torch.float32, device=device) if fmt.scale_bits else None
        )
        self.register_buffer(
            "zeros", None if fmt.symmetric else torch.zeros(out_features, g, dtype=torch.uint8, device=device)
        )
        self.register_buffer("perm", torch.zeros(in_features, dtype=torch.int64, device=device) if has_perm else None)
        self.register_buffer("group_bits", torch.zeros(g, dtype=torch.uint8, device=device) if mixed else None)
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device), requires_grad=False) if bias else None
        self._dense: torch.Tensor | None = None  # set only inside dense_weights()

    @classmethod
    def from_quantized(cls, qw: QuantizedWeight, bias: torch.Tensor | None = None, dtype: torch.dtype = torch.float32):
        out_f, in_f = qw.shape
        m = cls(in_f, out_f, qw.fmt, bias=bias is not None, has_perm=qw.perm is not None, mixed=qw.mixed, dtype=dtype)
        m.codes.copy_(qw.codes)
        m.scales.copy_(qw.scales)
        if qw.zeros is not None:
            m.zeros.copy_(qw.zeros)
        if qw.perm is not None:
            m.perm.copy_(qw.perm)
        if qw.group_bits is not None:
            m.group_bits.copy_(qw.group_bits)
        if qw.scale_mult is not None:
            m.scale_mult.copy_(qw.scale_mult)
        if bias is not None:
            m.bias.data.copy_(bias.detach().to(dtype))
        return m

    def quantized_weight(self) -> QuantizedWeight:
        return QuantizedWeight(self.codes, self.scales, self.zeros, self.fmt, self.perm, self.group_bits,
                               self.scale_mult)

    def dequantized_weight(self, dtype: torch.dtype) -> torch.Tensor:
        zp = zero_points(self.zeros, self.scales, self.fmt.bits, self.group_bits)
        return dequantize_parts(self.codes, float_scales(self.scales, self.scale_mult), zp, self.fmt.group_size,
                                self.perm, dtype, self.fmt.grid, self.fmt.bits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self._dense if self._dense is not None and self._dense.dtype == x.dtype else self.dequantized_weight(x.dtype)
        return F.linear(x, w, None if self.bias is None else self.bias.to(x.dtype))

    def extra_repr(self) -> str:
        g = self.fmt.group_size
        bits = self.fmt.bits if self.group_bits is None else f"mixed<={self.fmt.bits}"
        return (f"in={self.in_features}, out={self.out_features}, bits={bits}, group={g}, "
                f"{'sym' if self.fmt.symmetric else 'asym'}, bias={self.bias is not None}, perm={self.perm is not None}")


@contextmanager
def dense_weights(model: nn.Module, dtype: torch.dtype | None = None) -> Iterator[None]:
    """Hold every QuantLinear's dequantized weight while inside, instead of dequantizing on each
    call: the same numbers (one dequantize function), faster evaluation, more memory."""
    mods = [m for m in model.modules() if isinstance(m, QuantLinear)]
    if dtype is None:
        dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    try:
        for m in mods:
            m._dense = m.dequantized_weight(dtype)
        yield
    finally:
        for m in mods:
            m._dense = None
