"""Level: one weight format a size budget may give a layer, parsed once from its name.

    Level.parse("w3g128") == Level(bits=3, group_size=128);  str(Level(3, 128)) == "w3g128"
    Level.parse("Q4_K") == Level.of_type("Q4_K");             str(Level.of_type("Q4_K")) == "Q4_K"

An affine level is a uniform integer width and a group size; a group size of -1 (PER_CHANNEL) is
one group per output channel: "w2g-1". A block-type level is one of llama.cpp's block types
("Q4_K", "Q8_0", "IQ4_XS" ...), whose bits and group_size are then the type's code width and block,
as its name says (Q<bits>_0, Q<bits>_1 and IQ4_NL: blocks of 32; Q<bits>_K and IQ4_XS: 256). Which
types lowbit writes is formats/ggml's BLOCK_TYPES (a budget checks its levels against it); a
block-type level is written only into a GGUF file (to_gguf.py). An Allocation says which level each
layer got, by exact layer name (what a budget chooses, lowbit.budget.plan).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from lowbit.errors import ConfigError

PER_CHANNEL = -1  # group_size meaning one group per output channel (a whole input row)

_FORM = re.compile(r"w(\d+)g(-?\d+)")
_TYPE = re.compile(r"Q([2-8])_([01K])|IQ([2-8])_(NL|XS)")  # a llama.cpp block type's name: (I)Q<bits>_<kind>


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
    """A uniform integer width and a group size (-1: per channel), or a llama.cpp block type."""

    bits: int
    group_size: int
    block_type: str | None = None   # llama.cpp's name ("Q4_K"); bits and group_size are then the type's

    def __post_init__(self) -> None:
        if self.block_type is not None:
            if (self.bits, self.group_size) != _type_geometry(self.block_type):
                raise ConfigError(f"level {self.block_type}: make it with Level.of_type({self.block_type!r})")
            return
        if isinstance(self.bits, bool) or not isinstance(self.bits, int) or not 2 <= self.bits <= 8:
            raise ConfigError(f"level {self}: bits must be an integer from 2 to 8, got {self.bits!r}")
        problem = group_size_problem(self.group_size)
        if problem is not None:
            raise ConfigError(f"level {self}: group {problem}")

    @classmethod
    def of_type(cls, name: str) -> Level:
        """The level of llama.cpp block type `name` (any case: "q4_k" -> Q4_K)."""
        key = name.strip().upper() if isinstance(name, str) else name
        return cls(*_type_geometry(key), block_type=key)

    @classmethod
    def parse(cls, text: Any) -> Level:
        """'w<bits>g<group>' or a llama.cpp block type ('Q4_K') -> Level; ConfigError naming the
        string and the forms otherwise."""
        m = _FORM.fullmatch(text) if isinstance(text, str) else None
        if m is not None:
            return cls(int(m.group(1)), int(m.group(2)))
        if isinstance(text, str) and _TYPE.fullmatch(text.strip().upper()):
            return cls.of_type(text)
        raise ConfigError(f"{text!r} is not a level of the form w<bits>g<group> with bits 2 to 8 "
                          "(e.g. w3g64, or w2g-1 for one group per output channel), nor a llama.cpp block type "
                          "(e.g. Q4_K)")

    @property
    def is_block_type(self) -> bool:
        return self.block_type is not None

    def __str__(self) -> str:
        return self.block_type or f"w{self.bits}g{self.group_size}"


def _type_geometry(name: Any) -> tuple[int, int]:
    """(code width, block) of a llama.cpp block type, read from its name: (4, 256) for Q4_K and
    IQ4_XS, (8, 32) for Q8_0. ConfigError for a name that is not of that form."""
    m = _TYPE.fullmatch(name) if isinstance(name, str) else None
    if m is None:
        raise ConfigError(f"level {name!r}: not a llama.cpp block type name (e.g. Q4_K, Q8_0, IQ4_XS)")
    bits, kind = (m.group(1), m.group(2)) if m.group(1) else (m.group(3), m.group(4))
    return int(bits), 256 if kind in ("K", "XS") else 32


Allocation = dict[str, Level]  # layer name -> the level a budget gave it
