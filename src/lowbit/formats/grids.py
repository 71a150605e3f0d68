"""Per-group scalar grids: which value each code of a group stands for.

A quantized weight keeps one scale and one zero point per group (formats/affine.py chooses them);
its grid says what a code means inside that frame:

    w' = (values(bits)[code] - zero) * scale

`values(bits)` lists the 2**bits levels in code units, ascending. The uniform affine grid is
0, 1, ..., 2**bits - 1; other grids (normal-float codebooks, powers of two, ...) place the same
number of levels differently within that range, so the scale and zero chosen by affine's
min/max (and its clipping search) still fit them.

Adding a numeric format is one small class: subclass Grid, give it a `name` and `values(bits)`,
and register an instance in GRIDS. `codes` (nearest level) and `values_of` come with the base
class; the affine grid overrides them with the existing functions of formats/affine.py, so its
numbers are unchanged.
"""

from __future__ import annotations

import torch

from lowbit.formats import affine


class Grid:
    """A per-group scalar grid. Subclasses set `name` and `values`."""

    name: str = ""

    def values(self, bits: int) -> torch.Tensor:
        """The 2**bits levels, in code units, ascending: float32 [2**bits]."""
        raise NotImplementedError

    def codes(self, wg: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
        """wg [..., gs], scale / zero [...] -> uint8 codes [..., gs]: each value's nearest level."""
        v = self.values(bits).to(wg.device)
        x = wg.float() / scale.unsqueeze(-1) + zero.unsqueeze(-1)
        return torch.bucketize(x, (v[1:] + v[:-1]) / 2).to(torch.uint8)

    def values_of(self, codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
        """codes [..., gs] uint8, scale / zero [...] -> float32 [..., gs]."""
        v = self.values(bits).to(codes.device)
        return (v[codes.long()] - zero.float().unsqueeze(-1)) * scale.float().unsqueeze(-1)


class AffineGrid(Grid):
    """Uniform integer levels: code = round(w / scale) + zero, w' = (code - zero) * scale."""

    name = "affine"

    def values(self, bits: int) -> torch.Tensor:
        return torch.arange(1 << bits, dtype=torch.float32)

    def codes(self, wg: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
        return affine.quantize_groups(wg, scale, zero, bits)

    def values_of(self, codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
        return affine.dequantize_groups(codes, scale, zero)


GRIDS: dict[str, Grid] = {"affine": AffineGrid()}
