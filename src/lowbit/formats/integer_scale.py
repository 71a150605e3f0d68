"""Integer Scale (Li et al. 2024): group scales as small integers times one float per row.

    scale[r, g] = int_scale[r, g] * mult[r],   int_scale in 1 .. 2**scale_bits - 1

With integer group scales, a kernel with integer activations can add the partial sums of all the
groups of a row in integer arithmetic (sum_g int_scale[r, g] * sum_j (q - z) * a) and apply one
float multiply per row at the end, instead of one float multiply per group.

The multiplier is set per row from that row's largest float scale, either exactly
(mult = max_g scale / (2**bits - 1), "max") or rounded up to a power of two ("pow2"). Group
scales are rounded *up* to the integer grid (like the float16 rounding of formats/affine.py), so
a group's range stays representable; small scales lose relative precision, which is the accuracy
cost that `lowbit bench accuracy` reports against float16 scales.
"""

from __future__ import annotations

import torch

from lowbit.errors import ConfigError

MULTIPLIERS = ("max", "pow2")


def check_scale_bits(bits: int) -> None:
    if not isinstance(bits, int) or not 2 <= bits <= 8:
        raise ConfigError(f"integer scale bits={bits!r} not supported; use 2..8 (stored as uint8)")


def row_multiplier(scales: torch.Tensor, bits: int, mode: str = "max") -> torch.Tensor:
    """scales [out, G] (float) -> mult [out] float32 so that max_g scale = (2**bits - 1) * mult."""
    check_scale_bits(bits)
    if mode not in MULTIPLIERS:
        raise ConfigError(f"integer scale multiplier {mode!r}: use one of {', '.join(MULTIPLIERS)}")
    top = scales.float().amax(dim=1).clamp(min=torch.finfo(torch.float32).tiny * 2**bits)
    mult = top / ((1 << bits) - 1)
    if mode == "pow2":
        mult = torch.exp2(torch.ceil(torch.log2(mult)))
    return mult


def round_scale(scale: torch.Tensor, mult: torch.Tensor, bits: int) -> torch.Tensor:
    """The smallest integer multiple of mult >= scale, within 1..2**bits - 1 multiples (float32).

    mult broadcasts against scale (e.g. [out, 1] against [out, G]).
    """
    k = torch.ceil(scale.float() / mult).clamp(1, (1 << bits) - 1)
    return k * mult


def integer_codes(scale: torch.Tensor, mult: torch.Tensor) -> torch.Tensor:
    """Float scales already on the grid (round_scale) -> uint8 integer scales."""
    return torch.round(scale.float() / mult).to(torch.uint8)
