"""Level: one uniform weight format a size budget may give a layer, "w3g128" parsed once.

    Level.parse("w3g128") == Level(bits=3, group_size=128);  str(Level(3, 128)) == "w3g128"

A group size of -1 (PER_CHANNEL) is one group per output channel: "w2g-1". An Allocation says
which level each layer got, by exact layer name (what a budget chooses, lowbit.budget.plan).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from lowbit.errors import ConfigError

PER_CHANNEL = -1  # group_size meaning one group per output channel (a whole input row)

_FORM = re.compile(r"w(\d+)g(-?\d+)")


def group_size_problem(group_size: Any) -> str | None:
    """Why `group_size` cannot be quantized and run, or None when it can: -1 (per channel) or a
    positive multiple of 8 (runtime/packed.py and the kernels read codes 8 columns at a time)."""
    if isinstance(group_size, bool) or not isinstance(group_size, int):
        return f"must be an integer, got {group_size!r}"
    if group_size == PER_CHANNEL or (group_size > 0 and group_size % 8 == 0):
        return None
    if group_size <= 0:
        return f"{group_size} is not a group size; use -1 for one group per output channel, or 32, 64, 128"
    return (f"{group_size} is not a multiple of 8, which the packed kernels need; use 32, 64, 128 (any positive "
            "multiple of 8 that divides the layers' input widths) or -1 for one group per output channel")


@dataclass(frozen=True)
class Level:
    """A uniform integer width and a group size (-1: per channel)."""

    bits: int
    group_size: int

    def __post_init__(self) -> None:
        if isinstance(self.bits, bool) or not isinstance(self.bits, int) or not 2 <= self.bits <= 8:
            raise ConfigError(f"level {self}: bits must be an integer from 2 to 8, got {self.bits!r}")
        problem = group_size_problem(self.group_size)
        if problem is not None:
            raise ConfigError(f"level {self}: group {problem}")

    @classmethod
    def parse(cls, text: Any) -> Level:
        """'w<bits>g<group>' -> Level; ConfigError naming the string and the form otherwise."""
        m = _FORM.fullmatch(text) if isinstance(text, str) else None
        if m is None:
            raise ConfigError(f"{text!r} is not a level of the form w<bits>g<group> with bits 2 to 8 "
                              "(e.g. w3g64, or w2g-1 for one group per output channel)")
        return cls(int(m.group(1)), int(m.group(2)))

    def __str__(self) -> str:
        return f"w{self.bits}g{self.group_size}"


Allocation = dict[str, Level]  # layer name -> the level a budget gave it
