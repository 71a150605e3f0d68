"""The one table of weight-quantization methods: name -> what the method runs.

Every place that asks "does this method calibrate / smooth / take an average width / accept a
budget" reads METHODS; nothing compares method names. A method is a core (the layer quantizer the
pipeline calls, a key of lowbit.algorithms.cores.CORES) plus what runs around it.

To add a method: write its layer quantizer (signature lowbit.algorithms.cores.LayerQuantizer) in a
module of algorithms/, put it in CORES under a core name, and add one Method here naming that core
(tests/test_methods.py does both for a toy method).
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class Method:
    name: str
    core: str                       # the layer quantizer: a key of algorithms.cores.CORES
    smoothing: bool = False         # AWQ-smooth each decoder block before its layers are quantized
    needs_data: bool = False        # calibration data: Hessians, or the activations smoothing reads
    fractional_bits: bool = False   # recipe.bits is an average width over column groups (per-group widths)
    budget_ok: bool = True          # a size budget may choose its integer width per layer
    sections: tuple[str, ...] = ()  # the recipe's method sections it reads: "gptq", "awq", "slim"


METHODS: dict[str, Method] = {m.name: m for m in (
    Method("rtn", core="rtn"),
    Method("gptq", core="gptq", needs_data=True, sections=("gptq",)),
    Method("awq", core="rtn", smoothing=True, needs_data=True, sections=("awq",)),
    Method("awq-gptq", core="gptq", smoothing=True, needs_data=True, sections=("gptq", "awq")),
    Method("slim", core="slim", needs_data=True, fractional_bits=True, budget_ok=False, sections=("gptq", "slim")),
    Method("awq-slim", core="slim", smoothing=True, needs_data=True, fractional_bits=True, budget_ok=False,
           sections=("gptq", "awq", "slim")),
)}


def width_range(avg_bits: float) -> tuple[int, int]:
    """Lowest and highest width a fractional method's groups may take around an average."""
    base = math.floor(avg_bits + 1e-9)
    frac = avg_bits - base > 1e-9
    return max(1, base - 1), min(8, base + 1 + int(frac))
