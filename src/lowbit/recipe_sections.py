"""The sections of a recipe (clip, gptq, awq, slim, integer_scale, calibration, budget) and its
per-layer rules: small validated dataclasses, each naming the bad field and the allowed values.
recipes.Recipe holds them."""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from typing import Any

from lowbit.dtypes import cpu_has_fast_bf16
from lowbit.errors import ConfigError
from lowbit.levels import Level, group_size_problem


def _require(cond: bool, field_name: str, msg: str) -> None:
    if not cond:
        raise ConfigError(f"recipe field '{field_name}': {msg}")


@dataclass(frozen=True)
class ClipConfig:
    """Per-group clipping search: try shrinking each group's range, keep the lowest error."""

    enabled: bool = True
    grid: int = 20           # candidate ratios 1, 1 - max_shrink/grid, ..., 1 - max_shrink
    max_shrink: float = 0.8
    norm: float = 2.4        # error norm |w - w'|^norm (GPTQ's choice)

    def __post_init__(self) -> None:
        _require(self.grid >= 1, "clip.grid", f"must be >= 1, got {self.grid}")
        _require(0.0 <= self.max_shrink < 1.0, "clip.max_shrink", f"must be in [0, 1), got {self.max_shrink}")
        _require(self.norm > 0, "clip.norm", f"must be > 0, got {self.norm}")


@dataclass(frozen=True)
class GPTQConfig:
    damp: float = 0.01            # fraction of mean(diag H) added to the diagonal
    act_order: bool = False       # quantize columns by decreasing Hessian diagonal
    static_groups: bool = False   # with act_order: fix group params up front, keep column order
    block_size: int = 128         # columns per lazy-update block
    true_sequential: bool = True  # collect each sub-layer's Hessian after quantizing the ones before

    def __post_init__(self) -> None:
        _require(0.0 < self.damp < 1.0, "gptq.damp",
                 f"must be in (0, 1), a fraction of the Hessian's mean diagonal (default 0.01), got {self.damp}")
        _require(self.block_size >= 1, "gptq.block_size", f"must be >= 1, got {self.block_size}")


@dataclass(frozen=True)
class AWQConfig:
    """Activation-aware smoothing: s = a^alpha / w^(1 - alpha) per input channel, alpha searched
    per group of layers on their output error; clipping searched on output error (RTN only)."""

    grid: int = 20               # alpha in {0, 1/grid, ..., (grid-1)/grid}, plus s = 1
    duo_scaling: bool = True     # divide by the weight statistic w^(1 - alpha) (else s = a^alpha)
    search_tokens: int = 2048    # calibration tokens (evenly spaced) used for the search losses
    clip: bool = True            # output-error clipping search when AWQ is followed by RTN

    def __post_init__(self) -> None:
        _require(self.grid >= 1, "awq.grid", f"must be >= 1, got {self.grid}")
        _require(self.search_tokens >= 16, "awq.search_tokens", f"must be >= 16, got {self.search_tokens}")


@dataclass(frozen=True)
class SlimConfig:
    """Salience-driven mixed precision per group (SliM-LLM): each column group gets a width one
    below, at or above the average's integer part (2/3/4 around 3; 1/2/3/4 around 2.5)."""

    salience_clip: bool = True   # salience-weighted clipping search for each group's scale/zero
    measure: bool = True         # run GPTQ per candidate (table / unmoved widths x salience / plain clip), keep
                                 # the lowest measured output error (algorithms/slim.py)


@dataclass(frozen=True)
class IntegerScaleConfig:
    """Group scales stored as `bits`-bit integers times one float per row (Integer Scale)."""

    enabled: bool = False
    bits: int = 8
    multiplier: str = "max"      # "max": row max scale / (2**bits - 1); "pow2": that rounded up to 2^k

    def __post_init__(self) -> None:
        _require(2 <= self.bits <= 8, "integer_scale.bits", f"must be 2..8, got {self.bits}")
        _require(self.multiplier in ("max", "pow2"), "integer_scale.multiplier",
                 f"{self.multiplier!r} is not one of max, pow2")


CALIB_DTYPES = ("auto", "float32", "bfloat16")


@dataclass(frozen=True)
class CalibrationConfig:
    dataset: str = "c4"
    n_samples: int = 128
    seqlen: int = 512
    seed: int = 0
    # the blocks' forward passes during calibration: "float32", or "bfloat16" (autocast: matrix
    # products in bf16, several times faster on CPUs with native bf16; weights, Hessians and the
    # quantization itself stay float32); "auto" is bfloat16 where the CPU computes it natively
    # (AVX512_BF16 or AMX), else float32, and is resolved when the recipe is made
    dtype: str = "auto"

    def __post_init__(self) -> None:
        _require(self.n_samples >= 1, "calibration.n_samples", f"must be >= 1, got {self.n_samples}")
        _require(self.seqlen >= 2, "calibration.seqlen", f"must be >= 2, got {self.seqlen}")
        _require(self.dtype in CALIB_DTYPES, "calibration.dtype",
                 f"must be one of {', '.join(CALIB_DTYPES)}, got {self.dtype!r}")
        if self.dtype == "auto":
            object.__setattr__(self, "dtype", "bfloat16" if cpu_has_fast_bf16() else "float32")


@dataclass(frozen=True)
class Rule:
    """Per-module override: layers whose full name matches `pattern` (re.search) take these
    settings instead of the recipe's. The first matching rule wins; None keeps the recipe's."""

    pattern: str
    bits: int | float | None = None
    group_size: int | None = None
    symmetric: bool | None = None
    method: str | None = None      # "rtn", or the recipe's own method

    def __post_init__(self) -> None:
        try:
            re.compile(self.pattern)
        except (re.error, TypeError) as e:
            raise ConfigError(f"recipe field 'rules.pattern': {self.pattern!r} is not a valid regex ({e})") from None
        problem = None if self.group_size is None else group_size_problem(self.group_size)
        _require(problem is None, "rules.group_size", problem or "")

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}


AFFINE_LEVELS = ("w2g64", "w2g128", "w3g64", "w3g128", "w4g64", "w4g128", "w5g128", "w6g128", "w8g128")
# the default choices of a budget written as a GGUF (--format gguf): llama.cpp's K types, Q8_0, IQ4_XS
BLOCK_LEVELS = ("Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "Q8_0", "IQ4_XS")


@dataclass(frozen=True)
class BudgetConfig:
    """A size budget: each layer's level chosen to meet it (lowbit/budget/). The levels are affine
    (w3g64: a bit width and group size, for lowbit checkpoints) or llama.cpp block types (Q4_K,
    for GGUF files), one kind or the other."""

    target_bpw: float | None = None        # average bits per quantized weight, scales and zeros counted
    target_bytes: int | None = None        # whole model: quantized layers + the other tensors as stored
    # the levels to choose from; given as strings ("w3g64", "Q4_K": from TOML or the CLI), held as Levels
    levels: tuple[Level, ...] = AFFINE_LEVELS
    generations: int = 30                  # evolutionary search steps (0: the sensitivity greedy alone)
    offspring: int = 4                     # candidates per generation
    search_tokens: int = 2048              # held-out calibration tokens that score candidates (KL)
    probe_tokens: int = 512                # of those (at most), the tokens that measure each layer's KL alone (0: no probe)
    seed: int = 0

    def __post_init__(self) -> None:
        _require((self.target_bpw is None) != (self.target_bytes is None), "budget",
                 "give exactly one of target_bpw and target_bytes")
        _require(self.target_bpw is None or 1.0 < self.target_bpw <= 16.0, "budget.target_bpw",
                 f"must be in (1, 16], got {self.target_bpw}")
        _require(self.target_bytes is None or self.target_bytes > 0, "budget.target_bytes", "must be > 0")
        _require(len(self.levels) >= 2, "budget.levels", "needs at least two levels to choose from")
        try:
            levels = tuple(lv if isinstance(lv, Level) else Level.parse(lv) for lv in self.levels)
        except ConfigError as e:
            raise ConfigError(f"recipe field 'budget.levels': {e}") from None
        object.__setattr__(self, "levels", levels)
        kinds = {lv.is_block_type for lv in levels}
        if True in kinds:
            from lowbit.formats.ggml import BLOCK_TYPES

            unknown = [str(lv) for lv in levels if lv.is_block_type and lv.block_type not in BLOCK_TYPES]
            _require(not unknown, "budget.levels", f"{', '.join(unknown)}: not a block type lowbit writes; choose "
                     f"from {', '.join(BLOCK_TYPES)}")
        _require(len(kinds) == 1, "budget.levels",
                 f"{', '.join(map(str, levels))} mixes affine levels (w3g64) and llama.cpp block types (Q4_K); "
                 "choose block types for a GGUF file (--format gguf), affine levels for a lowbit checkpoint")
        _require(self.generations >= 0 and self.offspring >= 1, "budget.generations",
                 "generations must be >= 0 and offspring >= 1")
        _require(self.search_tokens >= 64, "budget.search_tokens", f"must be >= 64, got {self.search_tokens}")
        _require(self.probe_tokens >= 0, "budget.probe_tokens", f"must be >= 0, got {self.probe_tokens}")

    def parsed_levels(self) -> list[Level]:
        return list(self.levels)

    @property
    def block_types(self) -> bool:
        """Whether the levels are llama.cpp block types (the budget writes a GGUF file)."""
        return self.levels[0].is_block_type

    def on_block_types(self) -> BudgetConfig:
        """This budget for a GGUF file: its own block types, or BLOCK_LEVELS in place of the
        default affine levels. Affine levels someone chose are refused, naming the fix."""
        if self.block_types:
            return self
        if tuple(map(str, self.levels)) == AFFINE_LEVELS:
            return dataclasses.replace(self, levels=BLOCK_LEVELS)
        raise ConfigError(f"recipe field 'budget.levels': {', '.join(map(str, self.levels))} are affine levels, "
                          f"which a GGUF file cannot hold; give llama.cpp block types (e.g. --levels "
                          f"{','.join(BLOCK_LEVELS)})")
