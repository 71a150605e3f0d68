"""QuantizedWeight: the one plain record of what a quantized weight is.

Algorithms produce it, the runtime runs it, the checkpoint stores it. It holds unpacked codes
(one uint8 per weight, for easy math); `packed()` / `from_packed()` convert to the byte layout
the checkpoint stores (formats/pack.py): codes packed row by row, zero points packed as one
flat stream (no per-row padding).

    w[:, perm][r, g*gs + j]  ~=  (codes[r, g*gs + j] - zero[r, g]) * scale[r, g]

with the default "affine" grid; `fmt.grid` names another grid of formats/grids.py, whose levels
replace the code: (values[codes[r, g*gs + j]] - zero[r, g]) * scale[r, g].

`perm` (optional, from GPTQ act-order without static groups) says the codes are stored in a
permuted column order: column k of `codes` is column perm[k] of the original weight.

`group_bits` (optional, mixed precision per group as in SliM-LLM) gives each column group its own
code width, shared by all rows: uint8 [G], each in 1..fmt.bits (fmt.bits is then the widest).
A group's codes and zero points use its width; the symmetric midpoint is 2**(width-1). Packed,
the columns of all groups of one width are stored together (`codes.b<width>`, `zeros.b<width>`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from lowbit.errors import ConfigError, ShapeError
from lowbit.formats import affine, integer_scale, pack
from lowbit.formats.ggml import BLOCK_TYPES
from lowbit.formats.grids import GRIDS


@dataclass(frozen=True)
class QuantFormat:
    """The format of one quantized weight: what a reader needs besides the tensors."""

    bits: int
    group_size: int  # columns per group; equals in_features for per-channel
    symmetric: bool
    scale_bits: int = 0  # 0: float16 scales; k: k-bit integer scales times a float per row
    # How a quantizer sets the row multipliers of integer scales ("max" or "pow2", see
    # formats/integer_scale.py). It says how the record was made, not how to read it (the
    # multipliers are stored): neither stored (to_dict) nor compared.
    scale_multiplier: str = field(default="max", compare=False)
    grid: str = "affine"  # the levels a code stands for: a name in formats/grids.GRIDS

    def __post_init__(self) -> None:
        affine.check_bits(self.bits)
        if self.group_size < 1:
            raise ShapeError(f"group_size must be >= 1 once resolved, got {self.group_size}")
        if self.scale_bits:
            integer_scale.check_scale_bits(self.scale_bits)
        if self.scale_multiplier not in ("max", "pow2"):
            raise ConfigError(f"scale_multiplier {self.scale_multiplier!r} is not one of max, pow2")
        if not isinstance(self.grid, str) or self.grid not in GRIDS:
            raise ConfigError(f"grid {self.grid!r} is not one of {', '.join(GRIDS)}")

    @classmethod
    def resolved(cls, in_features: int, bits: int, group_size: int, symmetric: bool, scale_bits: int = 0,
                 scale_multiplier: str = "max", grid: str = "affine") -> QuantFormat:
        """The format for a weight `in_features` wide: group_size -1 (or >= in_features) is one
        group per row."""
        return cls(bits, affine.resolve_group_size(in_features, group_size), symmetric, scale_bits, scale_multiplier,
                   grid)

    @property
    def scale_dtype(self) -> torch.dtype:
        return torch.uint8 if self.scale_bits else affine.SCALE_DTYPE

    def to_dict(self) -> dict:
        d = {"bits": self.bits, "group_size": self.group_size, "symmetric": self.symmetric}
        if self.scale_bits:
            d["scale_bits"] = self.scale_bits
        if self.grid != "affine":  # absent for affine: manifests stay as they were
            d["grid"] = self.grid
        return d

    @classmethod
    def from_dict(cls, d: dict) -> QuantFormat:
        return cls(d["bits"], d["group_size"], d["symmetric"], d.get("scale_bits", 0), grid=d.get("grid", "affine"))


def zero_points(
    zeros: torch.Tensor | None, scales: torch.Tensor, bits: int, group_bits: torch.Tensor | None = None
) -> torch.Tensor:
    """Zero points as float [out, G]: the stored ones, or the fixed midpoint of symmetric formats
    (per group when the widths are mixed)."""
    if zeros is not None:
        return zeros.float()
    if group_bits is not None:
        mid = torch.pow(2.0, group_bits.float() - 1).to(scales.device)
        return mid.unsqueeze(0).expand(scales.shape).clone()
    return torch.full(scales.shape, float(1 << (bits - 1)), device=scales.device)


def format_nbytes(out: int, n_in: int, fmt: QuantFormat) -> int:
    """Packed bytes of a uniform-width [out, n_in] weight in `fmt` (no permutation): codes, scales,
    zeros and the integer-scale row multipliers. Equals QuantizedWeight.nbytes() for such a weight."""
    g = affine.n_groups(n_in, fmt.group_size)
    total = out * pack.packed_length(n_in, fmt.bits) + out * g * (1 if fmt.scale_bits else 2)
    if not fmt.symmetric:
        total += pack.packed_length(out * g, fmt.bits)
    if fmt.scale_bits:
        total += out * 4
    return total


def float_scales(scales: torch.Tensor, scale_mult: torch.Tensor | None) -> torch.Tensor:
    """Scales as float32 [out, G]: float16 ones as they are, integer ones times their row multiplier."""
    if scale_mult is None:
        return scales.float()
    return scales.float() * scale_mult.unsqueeze(1)


def group_columns(n_in: int, group_size: int, groups: torch.Tensor) -> torch.Tensor:
    """Column indices (ascending) of the given group indices, short last group included."""
    cols = torch.arange(n_in)
    return cols[torch.isin(cols // group_size, groups)]


def dequantize_parts(
    codes: torch.Tensor,
    scales: torch.Tensor,
    zero_points: torch.Tensor,
    group_size: int,
    perm: torch.Tensor | None,
    dtype: torch.dtype = torch.float32,
    grid: str = "affine",
    bits: int = 8,
) -> torch.Tensor:
    """codes [out, in], scales / zero points [out, G], optional perm [in] -> weight [out, in],
    each code read as a level of `grid` (formats/grids.py) at `bits` wide.

    The one dequantization rule, shared by QuantizedWeight and the runtime modules.
    """
    wg = GRIDS[grid].values_of(affine.group_view(codes, group_size), scales, zero_points, bits)
    w = affine.ungroup(wg, codes.shape[1])
    if perm is not None:
        w = w[:, torch.argsort(perm)]
    return w.to(dtype)


@dataclass(frozen=True)
class QuantizedWeight:
    codes: torch.Tensor          # uint8 [out, in]
    scales: torch.Tensor         # float16 [out, G]; uint8 integer scales when fmt.scale_bits
    zeros: torch.Tensor | None   # uint8 [out, in // group_size]; None when symmetric
    fmt: QuantFormat
    perm: torch.Tensor | None = None  # int64 [in] or None
    group_bits: torch.Tensor | None = None  # uint8 [G] or None (every group fmt.bits wide)
    scale_mult: torch.Tensor | None = None  # float32 [out]: the row multiplier of integer scales

    def __post_init__(self) -> None:
        out, n_in = self.codes.shape
        g = affine.n_groups(n_in, self.fmt.group_size)
        if self.codes.dtype != torch.uint8:
            raise ShapeError(f"codes must be uint8, got {self.codes.dtype}")
        if self.fmt.group_size > n_in:
            raise ShapeError(f"group_size {self.fmt.group_size} exceeds in_features {n_in}")
        if tuple(self.scales.shape) != (out, g) or self.scales.dtype != self.fmt.scale_dtype:
            raise ShapeError(f"scales must be {self.fmt.scale_dtype} [{out}, {g}], got {self.scales.dtype} "
                             f"{tuple(self.scales.shape)}")
        if bool(self.fmt.scale_bits) != (self.scale_mult is not None):
            raise ShapeError("integer scales (fmt.scale_bits) need scale_mult, and only they have it")
        if self.scale_mult is not None and (tuple(self.scale_mult.shape) != (out,)
                                            or self.scale_mult.dtype != torch.float32):
            raise ShapeError(f"scale_mult must be float32 [{out}], got {self.scale_mult.dtype} "
                             f"{tuple(self.scale_mult.shape)}")
        if self.fmt.symmetric != (self.zeros is None):
            raise ShapeError("symmetric formats have no zeros; asymmetric formats need them")
        if self.zeros is not None and (tuple(self.zeros.shape) != (out, g) or self.zeros.dtype != torch.uint8):
            raise ShapeError(f"zeros must be uint8 [{out}, {g}], got {self.zeros.dtype} {tuple(self.zeros.shape)}")
        if self.perm is not None and (
            tuple(self.perm.shape) != (n_in,) or not torch.equal(self.perm.sort().values, torch.arange(n_in))
        ):
            raise ShapeError("perm must be a permutation of range(in_features)")
        if self.group_bits is not None:
            gb = self.group_bits
            if gb.dtype != torch.uint8 or tuple(gb.shape) != (g,):
                raise ShapeError(f"group_bits must be uint8 [{g}], got {gb.dtype} {tuple(gb.shape)}")
            if int(gb.min()) < 1 or int(gb.max()) > self.fmt.bits:
                raise ShapeError(f"group_bits must lie in 1..{self.fmt.bits} (the format's widest), "
                                 f"got {int(gb.min())}..{int(gb.max())}")
            if self.fmt.grid != "affine":
                raise ConfigError(f"mixed widths (group_bits) need the affine grid, not {self.fmt.grid!r}")

    def check_finite(self, name: str) -> None:
        """Refuse a record whose scales or zero points are not numbers its storage can hold.

        A group scale that overflows float16 is stored as inf (a weight of magnitude 1e6 at 4 bits
        needs a scale of ~67000, above float16's 65504), and a NaN anywhere in the weight makes
        NaN scales; either would dequantize to inf or NaN. Raises ConfigError naming the layer.
        """
        bad = ~torch.isfinite(self.float_scales())  # [out, G]
        if bool(bad.any()):
            r, g = (int(i) for i in torch.nonzero(bad)[0])
            raise ConfigError(
                f"layer {name}: {int(bad.sum())} of its {bad.numel()} group scales are not finite once stored "
                f"as {self.fmt.scale_dtype} (first at row {r}, group {g}: {float(self.float_scales()[r, g])}); "
                f"its weights are too large for the {self.fmt.bits}-bit format's scales or not finite. "
                "Keep the layer in full precision (recipe skip list), use more bits, or check the model's weights"
            )
        if self.zeros is not None:
            top = (1 << self.fmt.bits) if self.group_bits is None else (1 << self.group_bits.long()).unsqueeze(0)
            if bool((self.zeros.long() >= top).any()):
                raise ConfigError(f"layer {name}: a zero point lies outside its group's code range; "
                                  "the quantizer produced an invalid record")

    @property
    def mixed(self) -> bool:
        return self.group_bits is not None

    def widths(self) -> list[int]:
        """The code widths present, ascending."""
        if self.group_bits is None:
            return [self.fmt.bits]
        return sorted(int(b) for b in self.group_bits.unique())

    def _groups_of_width(self, b: int) -> torch.Tensor:
        return torch.nonzero(self.group_bits == b).flatten()

    def average_bits(self) -> float:
        """Code bits per weight (codes only; nbytes() counts scales and zeros too)."""
        if self.group_bits is None:
            return float(self.fmt.bits)
        n_in = self.shape[1]
        per_col = self.group_bits.float()[torch.arange(n_in) // self.fmt.group_size]
        return float(per_col.mean())

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.codes.shape)

    def zero_points(self) -> torch.Tensor:
        return zero_points(self.zeros, self.scales, self.fmt.bits, self.group_bits)

    def float_scales(self) -> torch.Tensor:
        return float_scales(self.scales, self.scale_mult)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The weight this record stands for, [out, in] in the original column order."""
        return dequantize_parts(self.codes, self.float_scales(), self.zero_points(), self.fmt.group_size, self.perm,
                                dtype, self.fmt.grid, self.fmt.bits)

    def nbytes(self) -> int:
        """Bytes of the packed form: codes, scales, zeros, permutation and group widths (what
        packed() holds, computed without packing)."""
        out, n_in = self.shape
        total = self.scales.numel() * self.scales.element_size() + (n_in * 4 if self.perm is not None else 0)
        if self.scale_mult is not None:
            total += out * 4
        if self.group_bits is None:
            parts = [(n_in, self.scales.shape[1], self.fmt.bits)]
        else:
            total += self.group_bits.numel()
            col_group = torch.arange(n_in) // self.fmt.group_size
            parts = [(int(torch.isin(col_group, gr).sum()), len(gr), b)
                     for b in self.widths() for gr in [self._groups_of_width(b)]]
        for n_cols, n_groups_b, b in parts:
            total += out * pack.packed_length(n_cols, b)
            if self.zeros is not None:
                total += pack.packed_length(out * n_groups_b, b)
        return total

    # ---- packed form (what the checkpoint stores) ----
    def packed(self) -> dict[str, torch.Tensor]:
        t: dict[str, torch.Tensor] = {}
        if self.group_bits is None:
            t["codes"] = pack.pack(self.codes, self.fmt.bits)
            if self.zeros is not None:
                t["zeros"] = pack.pack(self.zeros.reshape(-1), self.fmt.bits)  # flat: no per-row padding
        else:
            n_in, gs = self.shape[1], self.fmt.group_size
            for b in self.widths():
                groups = self._groups_of_width(b)
                t[f"codes.b{b}"] = pack.pack(self.codes[:, group_columns(n_in, gs, groups)], b)
                if self.zeros is not None:
                    t[f"zeros.b{b}"] = pack.pack(self.zeros[:, groups].reshape(-1), b)
            t["group_bits"] = self.group_bits
        t["scales"] = self.scales.contiguous()
        if self.scale_mult is not None:
            t["scale_mult"] = self.scale_mult.contiguous()
        if self.perm is not None:
            t["perm"] = self.perm.to(torch.int32)
        return t

    @classmethod
    def from_packed(cls, tensors: dict[str, torch.Tensor], fmt: QuantFormat, shape: tuple[int, int]) -> QuantizedWeight:
        out, n_in = shape
        g = affine.n_groups(n_in, fmt.group_size)
        perm = tensors.get("perm")
        perm = None if perm is None else perm.to(torch.int64)
        group_bits = tensors.get("group_bits")
        scale_mult = tensors.get("scale_mult")
        if group_bits is None:
            zeros = tensors.get("zeros")
            return cls(
                codes=pack.unpack(tensors["codes"], fmt.bits, n_in),
                scales=tensors["scales"],
                zeros=None if zeros is None else pack.unpack(zeros, fmt.bits, out * g).reshape(out, g),
                fmt=fmt,
                perm=perm,
                scale_mult=scale_mult,
            )
        if tuple(group_bits.shape) != (g,):
            raise ShapeError(f"group_bits has shape {tuple(group_bits.shape)}, expected ({g},)")
        codes = torch.zeros(out, n_in, dtype=torch.uint8)
        zeros = None if fmt.symmetric else torch.zeros(out, g, dtype=torch.uint8)
        for b in sorted(int(b) for b in group_bits.unique()):
            groups = torch.nonzero(group_bits == b).flatten()
            cols = group_columns(n_in, fmt.group_size, groups)
            codes[:, cols] = pack.unpack(tensors[f"codes.b{b}"], b, len(cols))
            if zeros is not None:
                zeros[:, groups] = pack.unpack(tensors[f"zeros.b{b}"], b, out * len(groups)).reshape(out, len(groups))
        return cls(codes=codes, scales=tensors["scales"], zeros=zeros, fmt=fmt, perm=perm, group_bits=group_bits,
                   scale_mult=scale_mult)

    def pack(self) -> PackedWeight:
        return PackedWeight(self.fmt, self.shape, self.packed())

    @classmethod
    def from_float_qparams(
        cls,
        codes: torch.Tensor,
        scale: torch.Tensor,
        zero: torch.Tensor,
        fmt: QuantFormat,
        perm: torch.Tensor | None = None,
        group_bits: torch.Tensor | None = None,
        scale_mult: torch.Tensor | None = None,
    ) -> QuantizedWeight:
        """Build from the float32 scale / zero that formats.affine returns (with integer scales:
        scales already on the grid of scale_mult, see formats/integer_scale.py)."""
        if scale_mult is not None:
            stored = integer_scale.integer_codes(scale, scale_mult.unsqueeze(1))
            scale_mult = scale_mult.float()
        else:
            stored = scale.to(affine.SCALE_DTYPE)
        return cls(
            codes=codes,
            scales=stored,
            zeros=None if fmt.symmetric else zero.round().to(torch.uint8),
            fmt=fmt,
            perm=perm,
            group_bits=group_bits,
            scale_mult=scale_mult,
        )


@dataclass(frozen=True)
class PackedWeight:
    """A QuantizedWeight in the form the checkpoint stores it (QuantizedWeight.packed()): the
    same record, its codes and zero points still packed. A checkpoint hands these out, so a
    runtime that runs packed codes (runtime/packed.py) never holds an unpacked copy; unpack()
    gives the QuantizedWeight."""

    fmt: QuantFormat
    shape: tuple[int, int]
    parts: dict[str, torch.Tensor]  # codes, scales, zeros, perm, group_bits, scale_mult, codes.b<w>...

    @property
    def mixed(self) -> bool:
        return "group_bits" in self.parts

    def nbytes(self) -> int:
        """Bytes of the packed form; equals QuantizedWeight.nbytes() of the unpacked record."""
        return sum(t.numel() * t.element_size() for t in self.parts.values())

    def unpack(self) -> QuantizedWeight:
        return QuantizedWeight.from_packed(self.parts, self.fmt, self.shape)


@dataclass(frozen=True)
class BlockWeight:
    """A weight in one of llama.cpp's block types (formats/ggml): the very bytes a GGUF file holds.

        data[r] = the blocks of row r, each BLOCK_TYPES[block_type].type_size bytes

    Algorithms (algorithms/ggml.py) produce it, export/gguf.py writes `data` unchanged, and
    `dequantize` is lowbit's own decoder of those bytes (bit-identical to gguf-py's).
    """

    block_type: str          # llama.cpp's type name, e.g. "Q4_K"
    shape: tuple[int, int]   # [out, in] of the weight
    data: torch.Tensor       # uint8 [out, in / block * type_size]

    def __post_init__(self) -> None:
        bt = BLOCK_TYPES.get(self.block_type)
        if bt is None:
            raise ConfigError(f"block type {self.block_type!r} is not one of {', '.join(BLOCK_TYPES)}")
        rows, cols = self.shape
        if cols % bt.block:
            raise ShapeError(f"a row of {cols} weights is not a whole number of {bt.name} blocks of {bt.block}")
        want = (rows, cols // bt.block * bt.type_size)
        if self.data.dtype != torch.uint8 or tuple(self.data.shape) != want:
            raise ShapeError(f"{bt.name} data of a {rows}x{cols} weight must be uint8 {want}, "
                             f"got {self.data.dtype} {tuple(self.data.shape)}")

    @property
    def fmt(self) -> dict:
        """What the layer report records of the format."""
        return {"ggml": self.block_type}

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        bt = BLOCK_TYPES[self.block_type]
        return bt.decode(self.data.reshape(-1, bt.type_size)).reshape(self.shape).to(dtype)

    def nbytes(self) -> int:
        return self.data.numel()

    def check_finite(self, name: str) -> None:
        """Refuse bytes that decode to a NaN or infinite weight (a float16 scale that overflowed)."""
        bad = int((~torch.isfinite(self.dequantize())).sum())
        if bad:
            raise ConfigError(f"{name}: {bad} weights of its {self.block_type} blocks decode to NaN or infinity "
                              "(a block scale overflowed float16); the layer's weights are out of the type's range")
