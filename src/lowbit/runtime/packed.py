"""PackedLinear: a QuantizedWeight kept packed in memory and run by native kernels.

QuantLinear (runtime/qlinear.py) is the reference: one byte per code, dequantize on every call.
PackedLinear holds the codes packed (bits/8 bytes per weight) in the layout of
kernels/csrc/layout.h: each row is its column groups back to back, group g packed at its own
width (uniform formats, SliM-LLM's mixed widths and Integer Scale all fit; integer scales are
folded into float32 scales, which are the very numbers the reference uses; scales and zero points
that float16 holds exactly are kept as float16). It dispatches by shape:

- decode (at most DECODE_ROWS activation rows): the packed GEMV kernel, reading the packed codes;
  bfloat16 activations take its AVX-512 BF16 path where the CPU has one (groups a multiple of 64
  wide), float32 activations its float32 path; both sum in float32;
- prefill: the kernel's dequantize ((code - zero) * scale, the reference's float operations, so
  the weight is bit-identical to QuantLinear's) and a dense matmul.

Without a C++ toolchain both fall back to torch (kernels.KernelUnavailable, warned once).

    model = lowbit.load(path, runtime="packed").model   # runtime/convert.py: to_runtime
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lowbit import kernels
from lowbit.errors import ShapeError
from lowbit.formats import pack
from lowbit.memory import release_freed_memory
from lowbit.models.arch import LAYOUTS, decoder_layers
from lowbit.qtensor import (
    PackedWeight,
    QuantFormat,
    QuantizedWeight,
    float_scales,
    zero_points,
)
from lowbit.runtime.qlinear import QuantLinear

DECODE_ROWS = 8     # up to this many activation rows go through the GEMV kernel
SCRATCH_BYTES = 64 << 20  # prefill: weights up to this size dequantize into a shared buffer
_scratch: dict[torch.dtype, torch.Tensor] = {}


def _ext():
    return kernels.load_or_warn("qgemv", "packed linears run through torch")


def pack_rows(codes: torch.Tensor, group_size: int, widths: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """codes uint8 [N, K] -> (packed [N, row_bytes], byte offset of each group [G]); group g packed
    at widths[g] bits."""
    parts, offsets, at = [], [], 0
    for g, b in enumerate(widths):
        parts.append(pack.pack(codes[:, g * group_size:(g + 1) * group_size].contiguous(), b))
        offsets.append(at)
        at += parts[-1].shape[1]
    return torch.cat(parts, 1).contiguous(), torch.tensor(offsets, dtype=torch.int64)


INTERLEAVE = 4  # rows per block in the interleaved layout (kernels/csrc/layout.h: group_ptr)


def kernel_scales(scales: torch.Tensor, zeros: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Scales and zero points [N, G] as the kernels read them: float16 when every value is one
    exactly (checkpoints store float16 scales and integer zero points, so the numbers are the
    reference's; a decode step then reads 4 bytes per group instead of 8), else float32
    (Integer Scale's folded scales)."""
    s, z = scales.float().contiguous(), zeros.float().contiguous()
    hs, hz = s.half(), z.half()
    if torch.equal(hs.float(), s) and torch.equal(hz.float(), z):
        return hs, hz
    return s, z


def _group_bytes(widths: torch.Tensor | list[int], group_size: int) -> list[int]:
    return [group_size // 8 * int(b) for b in widths]


def interleave_rows(packed: torch.Tensor, offsets: torch.Tensor, widths: torch.Tensor | list[int],
                    group_size: int) -> torch.Tensor:
    """Row-major packed rows [N, RB] (N a multiple of 4) -> blocks of four rows, group by group:
    block i holds group 0 of rows 4i..4i+3, then group 1 of the same rows, and so on. Same bytes,
    same shape; a kernel running four rows at once then reads one sequential stream."""
    n, rb = packed.shape
    blocks = packed.reshape(n // INTERLEAVE, INTERLEAVE, rb)
    out = torch.empty_like(packed).reshape(n // INTERLEAVE, INTERLEAVE * rb)
    for off, gb in zip(offsets.tolist(), _group_bytes(widths, group_size)):
        out[:, INTERLEAVE * off:INTERLEAVE * (off + gb)] = blocks[:, :, off:off + gb].reshape(n // INTERLEAVE, -1)
    return out.reshape(n, rb)


def interleave_uniform_(packed: torch.Tensor, group_bytes: int, chunk_bytes: int = 16 << 20,
                        native: bool = True) -> torch.Tensor:
    """interleave_rows for groups of equal width (group_bytes each), in place: blocks of four rows
    are rearranged a chunk at a time, so no second copy of a large weight (an output head) is
    ever held (the native kernel does the same a block at a time). Returns `packed`."""
    ext = _ext() if native else None
    if ext is not None and packed.is_contiguous():
        ext.interleave_uniform(packed, group_bytes)
        return packed
    n, rb = packed.shape
    blocks = packed.view(n // INTERLEAVE, INTERLEAVE * rb)
    step = max(1, chunk_bytes // (INTERLEAVE * rb))
    for i in range(0, blocks.shape[0], step):
        part = blocks[i:i + step]
        part.copy_(part.reshape(-1, INTERLEAVE, rb // group_bytes, group_bytes).transpose(1, 2).reshape(part.shape))
    return packed


def deinterleave_rows(packed: torch.Tensor, offsets: torch.Tensor, widths: torch.Tensor | list[int],
                      group_size: int) -> torch.Tensor:
    """Inverse of interleave_rows."""
    n, rb = packed.shape
    blocks = packed.reshape(n // INTERLEAVE, INTERLEAVE * rb)
    out = torch.empty_like(packed).reshape(n // INTERLEAVE, INTERLEAVE, rb)
    for off, gb in zip(offsets.tolist(), _group_bytes(widths, group_size)):
        out[:, :, off:off + gb] = blocks[:, INTERLEAVE * off:INTERLEAVE * (off + gb)].reshape(n // INTERLEAVE, INTERLEAVE, gb)
    return out.reshape(n, rb)


def unpack_rows(packed: torch.Tensor, offsets: torch.Tensor, widths: torch.Tensor, group_size: int,
                interleave: int = 1) -> torch.Tensor:
    """Inverse of pack_rows (after interleave_rows when interleave is 4) -> codes uint8 [N, K]."""
    if interleave != 1:
        packed = deinterleave_rows(packed, offsets, widths, group_size)
    cols = []
    for off, b in zip(offsets.tolist(), widths.tolist()):
        n = pack.packed_length(group_size, b)
        cols.append(pack.unpack(packed[:, off:off + n], b, group_size))
    return torch.cat(cols, 1)


class PackedLinear(nn.Module):
    def __init__(self, qw: QuantizedWeight, bias: torch.Tensor | None = None):
        super().__init__()
        out_f, in_f = qw.shape
        gs = qw.fmt.group_size
        if gs % 8 or in_f % gs:
            raise ValueError(f"PackedLinear needs groups that are a multiple of 8 columns and tile the input "
                             f"({in_f} inputs, group {gs}); keep this layer a QuantLinear")
        g = in_f // gs
        widths = [qw.fmt.bits] * g if qw.group_bits is None else [int(b) for b in qw.group_bits]
        packed, offsets = pack_rows(qw.codes, gs, widths)
        self.in_features, self.out_features, self.group_size, self.fmt = in_f, out_f, gs, qw.fmt
        self.interleave = INTERLEAVE if out_f % INTERLEAVE == 0 else 1
        if self.interleave != 1:
            packed = interleave_rows(packed, offsets, widths, gs)
        self.register_buffer("packed", packed)
        self.register_buffer("widths", torch.tensor(widths, dtype=torch.int64))
        self.register_buffer("offsets", offsets)
        scales, zeros = kernel_scales(qw.float_scales(), qw.zero_points())
        self.register_buffer("scales", scales)
        self.register_buffer("zero_points", zeros)
        self.register_buffer("perm", qw.perm)
        self.register_buffer("unperm", None if qw.perm is None else torch.argsort(qw.perm))
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)
        self._fused: _Fused | None = None  # set by fuse_projections

    def _apply(self, fn, recurse=True):
        """model.to(dtype) casts floating buffers; the kernels' scales and zero points keep their
        dtype (only their device follows)."""
        keep = {k: self._buffers[k] for k in ("scales", "zero_points")}
        super()._apply(fn, recurse)
        for k, v in keep.items():
            self._buffers[k] = v.to(self.packed.device)
        return self

    @classmethod
    def from_qlinear(cls, m: QuantLinear) -> PackedLinear:
        return cls(m.quantized_weight(), m.bias)

    @classmethod
    def from_packed(cls, tensors: dict[str, torch.Tensor], fmt: QuantFormat, shape: tuple[int, int],
                    bias: torch.Tensor | None = None) -> PackedLinear:
        """From a checkpoint's packed tensors (QuantizedWeight.packed()). A uniform format's rows
        are already this layout (formats/pack.py packs each row 8 codes at a time, and groups are
        a multiple of 8 wide), so its codes are taken as they are, never unpacked; mixed widths
        are regrouped through QuantizedWeight."""
        out_f, in_f = shape
        gs = fmt.group_size
        if "group_bits" in tensors or gs % 8 or in_f % gs:
            return cls(QuantizedWeight.from_packed(tensors, fmt, shape), bias)
        g = in_f // gs
        codes = tensors["codes"]
        if tuple(codes.shape) != (out_f, pack.packed_length(in_f, fmt.bits)):
            raise ShapeError(f"packed codes of shape {tuple(codes.shape)} do not hold a {out_f}x{in_f} "
                             f"{fmt.bits}-bit weight")
        zeros = tensors.get("zeros")
        zeros = None if zeros is None else pack.unpack(zeros, fmt.bits, out_f * g).reshape(out_f, g)
        scales = float_scales(tensors["scales"], tensors.get("scale_mult"))
        m = cls.__new__(cls)
        nn.Module.__init__(m)
        m.in_features, m.out_features, m.group_size, m.fmt = in_f, out_f, gs, fmt
        step = gs // 8 * fmt.bits
        widths, offsets = torch.full((g,), fmt.bits, dtype=torch.int64), torch.arange(g, dtype=torch.int64) * step
        m.interleave = INTERLEAVE if out_f % INTERLEAVE == 0 else 1
        codes = codes.contiguous()
        if m.interleave != 1:
            interleave_uniform_(codes, step)
        m.register_buffer("packed", codes)
        m.register_buffer("widths", widths)
        m.register_buffer("offsets", offsets)
        scales, zeros = kernel_scales(scales, zero_points(zeros, scales, fmt.bits, None).expand(out_f, g))
        m.register_buffer("scales", scales)
        m.register_buffer("zero_points", zeros)
        perm = tensors.get("perm")
        perm = None if perm is None else perm.to(torch.int64)
        m.register_buffer("perm", perm)
        m.register_buffer("unperm", None if perm is None else torch.argsort(perm))
        m.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)
        m._fused = None
        return m

    def nbytes(self) -> int:
        """Bytes held (packed codes, scales and zero points, permutation, bias)."""
        return sum(t.numel() * t.element_size() for t in self.buffers()) + (
            0 if self.bias is None else self.bias.numel() * self.bias.element_size())

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """[out, in] in the original column order, bit-identical to QuantLinear's in that dtype
        (bfloat16 comes straight out of the kernel, rounded from the same float32 values)."""
        ext = _ext()
        if ext is None:
            codes = unpack_rows(self.packed, self.offsets, self.widths, self.group_size, self.interleave).float()
            w = (codes.reshape(self.out_features, -1, self.group_size) - self.zero_points.unsqueeze(-1)) \
                * self.scales.unsqueeze(-1)
            w = w.reshape(self.out_features, self.in_features).to(dtype)
        else:
            bf16 = dtype == torch.bfloat16
            w = ext.dequantize(self.packed, self.widths, self.offsets, self.scales, self.zero_points, self.group_size,
                               bf16, self.interleave)
            w = w if bf16 else w.to(dtype)
        return w if self.unperm is None else w[:, self.unperm]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)
        ext = _ext() if x2.shape[0] <= DECODE_ROWS else None
        if ext is not None and self._fused is not None and x.dtype == torch.bfloat16:
            lo, hi = self._rows
            y = self._fused.output(x, x2)[:, lo:hi]
            if self.bias is not None:
                y = y + self.bias.float()
            return y.to(x.dtype).reshape(*lead, self.out_features)
        if ext is not None:
            xs = x2 if self.perm is None else x2[:, self.perm]
            if x.dtype == torch.bfloat16 and self.group_size % 64 == 0 and ext.has_bf16_path():
                # the float32 product, + bias.float(), rounded to bfloat16 once: all in one call
                y = ext.Product(self.packed, self.widths, self.offsets, self.scales, self.zero_points,
                                self.group_size, self.interleave, self.bias)(xs.contiguous())
            else:
                y = ext.gemv(xs.float().contiguous(), self.packed, self.widths, self.offsets, self.scales,
                             self.zero_points, self.group_size, self.interleave)
                if self.bias is not None:
                    y = y + self.bias.float()
                y = y.to(x.dtype)
        else:
            y = F.linear(x2, self._prefill_weight(x), None if self.bias is None else self.bias.to(x.dtype))
        return y.reshape(*lead, self.out_features)

    def _prefill_weight(self, x: torch.Tensor) -> torch.Tensor:
        """dequantized_weight for one product with x: layers up to SCRATCH_BYTES share one buffer
        per dtype (a fresh tens-of-megabytes temporary per layer and step grows the heap and pays
        page faults every time); larger ones (an output head), permuted ones and products that
        autograd would keep the weight of get their own."""
        ext, dtype = _ext(), x.dtype
        n, k = self.out_features, self.in_features
        if ext is None or self.unperm is not None or dtype not in (torch.float32, torch.bfloat16) \
                or n * k * dtype.itemsize > SCRATCH_BYTES or (torch.is_grad_enabled() and x.requires_grad):
            return self.dequantized_weight(dtype)
        buf = _scratch.get(dtype)
        if buf is None or buf.numel() < n * k:
            buf = _scratch[dtype] = torch.empty(n * k, dtype=dtype)
        w = buf[:n * k].view(n, k)
        ext.dequantize_into(w, self.packed, self.widths, self.offsets, self.scales, self.zero_points, self.group_size,
                            self.interleave)
        return w

    def extra_repr(self) -> str:
        widths = sorted(set(self.widths.tolist()))
        return (f"in={self.in_features}, out={self.out_features}, bits={'/'.join(map(str, widths))}, "
                f"group={self.group_size}, perm={self.perm is not None}")


def kernels_fit(fmt: QuantFormat, in_features: int) -> bool:
    """Whether the packed kernels run this format: the affine grid, and groups a multiple of 8
    columns that tile the input (a group of 128 on a 576-wide layer leaves a partial group, which
    only the reference QuantLinear runs, as it runs every other grid)."""
    gs = fmt.group_size
    return fmt.grid == "affine" and gs > 0 and gs % 8 == 0 and in_features % gs == 0


def pack_model(model: nn.Module) -> nn.Module:
    """Replace every QuantLinear whose groups fit the kernels by a PackedLinear, in place."""
    for name, m in list(model.named_modules()):
        for child_name, child in list(m.named_children()):
            if isinstance(child, QuantLinear) and kernels_fit(child.fmt, child.in_features):
                setattr(m, child_name, PackedLinear.from_qlinear(child))
    return model


class _Fused:
    """The packed rows of several PackedLinears that read the same input (q/k/v, gate/up), run
    as one decode GEMV: one kernel call (and thread fork) instead of several, and a better split
    of small projections across threads. Each member keeps a view of its own rows for prefill.
    The output of the last input is held until every member has taken its slice."""

    def __init__(self, members: list[PackedLinear]):
        self.rows = [m.out_features for m in members]
        self.packed = _adjacent([m.packed for m in members])
        if self.packed is None:
            self.packed = torch.cat([m.packed for m in members]).contiguous()
        self.scales = torch.cat([m.scales for m in members]).contiguous()
        self.zero_points = torch.cat([m.zero_points for m in members]).contiguous()
        self.widths, self.offsets, self.group_size = members[0].widths, members[0].offsets, members[0].group_size
        self.interleave = members[0].interleave
        self._x: torch.Tensor | None = None
        self._version = -1
        self._y: torch.Tensor | None = None
        self._taken = 0

    def output(self, x: torch.Tensor, x2: torch.Tensor) -> torch.Tensor:
        """The fused product for the module input x (x2: x as rows); computed once per input."""
        version = 0 if x.is_inference() else x._version  # inference tensors cannot change in place
        if self._y is None or x is not self._x or version != self._version:
            ext = _ext()
            self._y = ext.gemv_bf16(x2.contiguous(), self.packed, self.widths, self.offsets, self.scales,
                                    self.zero_points, self.group_size, self.interleave)
            self._x, self._version, self._taken = x, version, 0
        y = self._y
        self._taken += 1
        if self._taken == len(self.rows):  # every member has its slice: let go of the input
            self._x = self._y = None
        return y


def _adjacent(parts: list[torch.Tensor]) -> torch.Tensor | None:
    """The rows of `parts` as one tensor when they already lie one after another in one buffer
    (load_checkpoint reads fusable projections that way), else None."""
    first = parts[0]
    at = first.storage_offset()
    for t in parts:
        if not t.is_contiguous() or t.untyped_storage().data_ptr() != first.untyped_storage().data_ptr() \
                or t.storage_offset() != at or t.shape[1:] != first.shape[1:]:
            return None
        at += t.numel()
    rows = sum(t.shape[0] for t in parts)
    return first.new_empty(0).set_(first.untyped_storage(), first.storage_offset(), (rows, *first.shape[1:]))


# ---------------------------------------------------------------- fusion: the one set of rules
def projection_groups() -> list[tuple[str, ...]]:
    """The projections of a decoder block that read one input (q/k/v, gate/up: models.arch.LAYOUTS),
    as names inside the block; the candidates for one shared decode GEMV."""
    return [tuple(group) for layout in LAYOUTS.values() for group in layout if len(group) >= 2]


def fusion_buffers(records: dict[str, PackedWeight]) -> dict[str, torch.Tensor]:
    """For each group of a block's projections (projection_groups) stored alike (one uniform
    format, the same packed row length): one uint8 buffer for all their packed codes, as a view
    per layer name. `records` may be on the meta device (StoredWeights.meta): only shapes and
    formats are read. A loader reads the codes straight into these views, so fuse_projections
    later finds them adjacent (_adjacent) and copies nothing."""
    views: dict[str, torch.Tensor] = {}
    blocks = {name.rsplit(".", 2)[0] for name in records if name.count(".") >= 2}
    for block in blocks:
        for group in projection_groups():
            names = [f"{block}.{member}" for member in group]
            if not all(n in records and "codes" in records[n].parts for n in names):
                continue
            recs = [records[n] for n in names]
            shapes = [tuple(r.parts["codes"].shape) for r in recs]
            if len({r.fmt for r in recs}) != 1 or any(len(sh) != 2 for sh in shapes) \
                    or len({sh[1] for sh in shapes}) != 1 or any(r.mixed for r in recs):
                continue
            buf = torch.empty(sum(sh[0] for sh in shapes), shapes[0][1], dtype=torch.uint8)
            start = 0
            for n, sh in zip(names, shapes):
                views[n] = buf[start:start + sh[0]]
                start += sh[0]
    return views


def _fusable(members: list[nn.Module]) -> bool:
    if not all(isinstance(m, PackedLinear) for m in members):
        return False
    a = members[0]
    return all(m.in_features == a.in_features and m.group_size == a.group_size and m.perm is None
               and m.interleave == a.interleave and torch.equal(m.widths, a.widths) for m in members) \
        and a.group_size % 64 == 0


def fuse_projections(model: nn.Module) -> int:
    """Share one decode GEMV among the projections of each decoder block that read the same
    input (architectures in models.arch.LAYOUTS). bfloat16 decode only; other calls run each
    member as before. Returns how many groups were fused."""
    ext = _ext()
    if ext is None or not ext.has_bf16_path():
        return 0
    fused = 0
    for block in decoder_layers(model):
        for group in projection_groups():
            members = [block.get_submodule(n) if _has(block, n) else None for n in group]
            if None in members or not _fusable(members):
                continue
            shared = _Fused(members)
            start = 0
            for m, rows in zip(members, shared.rows):
                # members' own buffers become views of the fused rows (no second copy)
                m.packed = shared.packed[start:start + rows]
                m.scales = shared.scales[start:start + rows]
                m.zero_points = shared.zero_points[start:start + rows]
                m._fused, m._rows = shared, (start, start + rows)
                start += rows
            fused += 1
        release_freed_memory()  # the members' own copies, freed a block at a time
    return fused


def _has(block: nn.Module, name: str) -> bool:
    try:
        block.get_submodule(name)
        return True
    except AttributeError:
        return False
