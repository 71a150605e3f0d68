"""Integer-activation linears: W8A8Linear (8-bit weights, oneDNN's int8 GEMM) and W4A8Linear
(4-bit group-wise weights with Integer Scale, lowbit's VNNI kernel).

W8A8Linear: 8-bit weights times 8-bit activations, the products summed in int32 by oneDNN.

Weights: 8-bit per output channel, symmetric (one float scale per row, codes c with the fixed
zero 128, so c - 128 is an int8). Activations: quantized per token as the layer runs
(dynamic): s_t = max_k |x_tk| / 127, q_tk = round(x_tk / s_t) in [-127, 127], carried as uint8
q + 128. Then

    y_tn = s_t * w_n * sum_k q_tk (c_nk - 128)

where the sum is an exact int32 product (oneDNN's int8 GEMM, torch.ops.onednn.qlinear_pointwise,
with unit scales; the per-token and per-channel scales are applied after in float32), so the
fast path and the slow reference `w8a8_reference` agree to float32 rounding, and their integer
parts are identical. oneDNN takes one activation scale per call, which is why the per-token
scales are applied outside it.

W4A8Linear: 4-bit codes c with integer zero points z and integer group scales iscale (Integer
Scale: `--integer-scale 8`) times a float per row, the same per-token int8 activations:

    y_tn = s_t * mult_n * sum_g iscale_ng * sum_{k in g} (c_nk - z_ng) q_tk

where everything right of mult_n is an exact integer (kernels/csrc/w4a8.cpp: w4a8_gemm, four
products per int32 lane with vpdpbusd, group sums scaled by iscale in int32 lanes, added in
int64), so it is bit-identical to `w4a8_reference`'s int64 matmul; the float scales come after.

Quantizing activations changes what the model computes: evaluate a checkpoint run this way
(`lowbit eval CKPT --activations int8`) before relying on it.
"""

from __future__ import annotations

import functools
import logging

import torch
from torch import nn

from lowbit import kernels
from lowbit.errors import ConfigError
from lowbit.qtensor import QuantizedWeight

log = logging.getLogger(__name__)

ACT_MAX = 127


@functools.cache
def onednn_int8_exact() -> bool:
    """Whether oneDNN's u8 x s8 GEMM sums exactly on this CPU.

    Without VNNI (AVX2, or AVX-512 before Cascade Lake) oneDNN adds pairs of u8*s8 products in
    int16 with saturation (vpmaddubsw), so activations near the top of their range come out wrong
    (255 * 127 * 2 > 32767). Probed once with that worst case."""
    w = torch.full((1, 64), 127, dtype=torch.int8)
    qx = torch.full((1, 64), 255, dtype=torch.uint8)
    acc = torch.ops.onednn.qlinear_pointwise(qx, 1.0, 128, torch.ops.onednn.qlinear_prepack(w, None),
                                             torch.ones(1), torch.zeros(1, dtype=torch.int64), None, 1.0, 0,
                                             torch.float32, "none", [], "")
    exact = int(acc.item()) == 127 * 127 * 64
    if not exact:
        log.warning("oneDNN's int8 GEMM saturates on this CPU (no VNNI): W8A8 layers use torch._int_mm "
                    "instead, exact but several times slower")
    return exact


def _ext():
    """The native per-token quantize and epilogue (kernels/csrc/act_quant.cpp), or None: torch ops."""
    return kernels.load_or_warn("qgemv", "int8 activations are quantized by torch operations")


def supports(qw: QuantizedWeight) -> bool:
    """W8A8 needs 8-bit, per-channel (one group per row), symmetric, uniform (affine grid) weights."""
    return (qw.fmt.grid == "affine" and qw.fmt.bits == 8 and qw.fmt.symmetric and qw.fmt.group_size >= qw.shape[1]
            and qw.group_bits is None and qw.scale_mult is None)


def quantize_per_token(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] float -> (q int8-valued int16 [M, K], scale float32 [M, 1]) with x ~= q * scale."""
    xf = x.float()
    scale = (xf.abs().amax(dim=1, keepdim=True) / ACT_MAX).clamp_min(torch.finfo(torch.float32).tiny)
    q = torch.round(xf / scale).clamp_(-ACT_MAX, ACT_MAX).to(torch.int16)
    return q, scale


def _reference_rows(x: torch.Tensor, qw: QuantizedWeight) -> tuple[torch.Tensor, torch.Tensor]:
    """The references' activations: x as rows in the weight's column order, quantized per token."""
    xs = x.reshape(-1, x.shape[-1])
    return quantize_per_token(xs if qw.perm is None else xs[:, qw.perm])


def w8a8_reference(x: torch.Tensor, qw: QuantizedWeight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """The slow, obvious computation: integer product in int64, then the scales (float32 out)."""
    if not supports(qw):
        raise ConfigError("w8a8_reference needs an 8-bit per-channel symmetric weight")
    q, s = _reference_rows(x, qw)
    acc = q.long() @ (qw.codes.long() - 128).T
    y = acc.float() * qw.float_scales()[:, 0].float() * s
    if bias is not None:
        y = y + bias.float()
    return y.reshape(*x.shape[:-1], qw.shape[0])


class W8A8Linear(nn.Module):
    def __init__(self, qw: QuantizedWeight, bias: torch.Tensor | None = None):
        super().__init__()
        if not supports(qw):
            raise ConfigError(
                f"int8 activations need 8-bit per-channel symmetric weights; this layer is {qw.fmt.bits}-bit, "
                f"group {qw.fmt.group_size} of {qw.shape[1]}, {'symmetric' if qw.fmt.symmetric else 'asymmetric'}"
                f"{', mixed widths' if qw.group_bits is not None else ''}. Quantize with --bits 8 --group-size "
                "-1 --sym (W8A8), use 4 bits with --integer-scale 8 (W4A8), or run without --activations int8")
        self.out_features, self.in_features = qw.shape
        w = (qw.codes.to(torch.int16) - 128).to(torch.int8)
        # oneDNN's layout, or the int8 [in, out] matrix torch._int_mm takes where oneDNN is inexact;
        # not a buffer
        exact = onednn_int8_exact()
        self._packed = torch.ops.onednn.qlinear_prepack(w, None) if exact else None
        self._wt = None if exact else w.T.contiguous()
        self.register_buffer("w_scale", qw.float_scales()[:, 0].float().contiguous())
        self.register_buffer("perm", qw.perm)
        self.bias = None if bias is None else nn.Parameter(bias.detach().float().clone(), requires_grad=False)
        self._unit = torch.ones(self.out_features)
        self._zero = torch.zeros(self.out_features, dtype=torch.int64)

    def unregistered_nbytes(self) -> int:
        """Bytes held outside the module's buffers: oneDNN's prepacked int8 weight."""
        return self.out_features * self.in_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        xs = x.reshape(-1, self.in_features)
        if self.perm is not None:
            xs = xs[:, self.perm]
        ext = _ext()
        if ext is None:
            q, s = quantize_per_token(xs)
            qx = (q + 128).to(torch.uint8)
        else:  # one pass per row, the same codes and scales, written as q + 128
            qx, s = ext.quantize_rows(xs.contiguous() if xs.dtype in (torch.float32, torch.bfloat16)
                                      else xs.float().contiguous(), shifted=True)
        if self._packed is not None:
            acc = torch.ops.onednn.qlinear_pointwise(qx, 1.0, 128, self._packed, self._unit, self._zero, None, 1.0,
                                                     0, torch.float32, "none", [], "")
        else:
            acc = torch._int_mm((qx.to(torch.int16) - 128).to(torch.int8), self._wt).float()
        if ext is not None and x.dtype in (torch.float32, torch.bfloat16):
            y = ext.scale_rows(acc, self.w_scale, s, self.bias, x.dtype == torch.bfloat16)
            return y.reshape(*lead, self.out_features)
        y = acc * self.w_scale * s
        if self.bias is not None:
            y = y + self.bias
        return y.to(x.dtype).reshape(*lead, self.out_features)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, w8 per-channel sym, a8 per-token dynamic"


def supports_w4a8(qw: QuantizedWeight) -> bool:
    """W4A8 needs uniform 4-bit affine-grid weights with integer group scales, groups a multiple of 64."""
    in_f = qw.shape[1]
    return (qw.fmt.grid == "affine" and qw.fmt.bits == 4 and qw.scale_mult is not None and qw.group_bits is None
            and qw.fmt.group_size % 64 == 0 and in_f % qw.fmt.group_size == 0)


def _integer_parts(qw: QuantizedWeight) -> tuple[torch.Tensor, torch.Tensor]:
    """(iscale, zero points) as int32 [out, G]."""
    return qw.scales.to(torch.int32), qw.zero_points().round().to(torch.int32)


def w4a8_reference(x: torch.Tensor, qw: QuantizedWeight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """The slow, obvious computation: the integer sum in int64, then the float scales (float32 out)."""
    if not supports_w4a8(qw):
        raise ConfigError("w4a8_reference needs a 4-bit weight with integer scales")
    q, s = _reference_rows(x, qw)
    iscale, zeros = _integer_parts(qw)
    gs = qw.fmt.group_size
    w_int = (qw.codes.long() - zeros.long().repeat_interleave(gs, 1)) * iscale.long().repeat_interleave(gs, 1)
    t = q.long() @ w_int.T
    y = (t.double() * s.double() * qw.scale_mult.double()).float()
    if bias is not None:
        y = y + bias.float()
    return y.reshape(*x.shape[:-1], qw.shape[0])


class W4A8Linear(nn.Module):
    def __init__(self, qw: QuantizedWeight, bias: torch.Tensor | None = None):
        super().__init__()
        from lowbit.runtime.packed import INTERLEAVE, interleave_rows, pack_rows

        if not supports_w4a8(qw):
            raise ConfigError(
                f"int8 activations with 4-bit weights need Integer Scale (--integer-scale 8) and groups a multiple "
                f"of 64; this layer is {qw.fmt.bits}-bit, group {qw.fmt.group_size}, "
                f"{'integer' if qw.scale_mult is not None else 'float'} scales")
        self.ext = kernels.load("qgemv")
        if not self.ext.has_w4a8_path():
            raise ConfigError("the W4A8 kernel needs AVX-512 VNNI, which this CPU lacks; run without --activations int8")
        self.out_features, self.in_features = qw.shape
        self.group_size = qw.fmt.group_size
        g = self.in_features // self.group_size
        packed, offsets = pack_rows(qw.codes, self.group_size, [4] * g)
        self.interleave = INTERLEAVE if self.out_features % INTERLEAVE == 0 else 1
        if self.interleave != 1:
            packed = interleave_rows(packed, offsets, [4] * g, self.group_size)
        iscale, zeros = _integer_parts(qw)
        self.register_buffer("packed", packed)
        self.register_buffer("iscale", iscale.contiguous())
        self.register_buffer("zeros", zeros.contiguous())
        self.register_buffer("mult", qw.scale_mult.double())
        self.register_buffer("perm", qw.perm)
        self.bias = None if bias is None else nn.Parameter(bias.detach().float().clone(), requires_grad=False)

    def _apply(self, fn, recurse=True):
        keep = self._buffers["mult"]  # the row multipliers stay float64 through model.to(dtype)
        super()._apply(fn, recurse)
        self._buffers["mult"] = keep.to(self.packed.device)
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        xs = x.reshape(-1, self.in_features)
        if self.perm is not None:
            xs = xs[:, self.perm]
        if xs.dtype in (torch.float32, torch.bfloat16):
            q, s = self.ext.quantize_rows(xs.contiguous())
        else:
            q, s = quantize_per_token(xs)
            q = q.to(torch.int8)
        t = self.ext.w4a8_gemm(q.contiguous(), self.packed, self.iscale, self.zeros, self.group_size,
                               self.interleave)
        y = (t.double() * s.double() * self.mult).float()
        if self.bias is not None:
            y = y + self.bias
        return y.to(x.dtype).reshape(*lead, self.out_features)

    def extra_repr(self) -> str:
        return (f"in={self.in_features}, out={self.out_features}, w4 group {self.group_size} integer scales, "
                "a8 per-token dynamic")
