"""The --kv grammar, parsed once: a cache name or an eviction label -> a typed spec (KVSpec,
ZipSpec, GearSpec, HFQuantizedSpec, EvictSpec), wrapped in CacheSpec; ConfigError naming the
problem otherwise. Everything after the boundary takes the specs, never the strings."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from lowbit.errors import ConfigError


@dataclass(frozen=True)
class KVSpec:
    """KIVI: ``kivi<bits>[-b<block>][-g<value_group>][-w<window>]`` (``int<bits>`` is the same)."""

    bits: int
    block: int = 32          # tokens per key block
    value_group: int = 32    # channels per value group
    window: int = 128        # most recent tokens kept in full precision (KIVI's residual)
    sinks: int = 0           # first tokens kept in full precision (attention sinks; not in KIVI)
    clip: int = 0            # 1: search each group's range for the least squared error (not in KIVI)

    @classmethod
    def parse(cls, name: str) -> KVSpec:
        spec = parse_kv(name)
        if not isinstance(spec, KVSpec):
            raise ConfigError(f"--kv {name!r} is not a KIVI cache name")
        return spec


@dataclass(frozen=True)
class ZipSpec:
    """ZipCache: ``zipcache[-h<hi>][-l<lo>][-r<salient>][-p<probes>][-b<block>][-w<window>]``."""

    hi: int = 4              # bits of salient rows
    lo: int = 2              # bits of the others
    salient: float = 0.3     # fraction of each head's tokens kept at `hi` bits
    probes: float = 0.1      # fraction of each chunk's queries used as probes (half recent, half random)
    block: int = 64          # tokens per flushed block (keys: one scale per channel per set per block)
    value_group: int = 32    # channels per group of a row
    window: int = 128
    sinks: int = 0
    clip: int = 0


@dataclass(frozen=True)
class GearSpec:
    """GEAR: ``gear<bits>[-r<rank>][-s<outlier fraction>][-b<block>][-w<window>]``."""

    bits: int
    rank: int = 2            # rank of the residual's approximation, per head and block
    outliers: float = 0.01   # fraction of entries kept exactly (sparse, float16)
    block: int = 128         # tokens per flushed block (the low-rank span); keys in sub-blocks of 32
    value_group: int = 32
    window: int = 128
    sinks: int = 0
    clip: int = 0


@dataclass(frozen=True)
class EvictSpec:
    """Eviction: policy streaming | h2o | snapkv; budget a fraction (< 1) or a token count (>= 1)."""

    policy: str
    budget: float
    sinks: int = 4           # StreamingLLM's attention sinks
    window: int = 32         # SnapKV's observation window
    kernel: int = 7          # SnapKV's pooling kernel

    def tokens(self, seen: int) -> int:
        """How many tokens to keep after `seen` tokens."""
        if self.budget < 1:
            return max(1, math.ceil(self.budget * seen))
        return int(self.budget)


@dataclass(frozen=True)
class HFQuantizedSpec:
    """transformers' own QuantizedCache (the peer): ``hf-hqq<bits>``, HQQ backend, groups of 64,
    residual 128 tokens, as its documentation sets it up (axis 1 for keys and values)."""

    bits: int
    group_size: int = 64
    residual: int = 128


POLICIES = ("streaming", "h2o", "snapkv")

_OPTIONS = {  # option letter -> field, per kind
    "kivi": {"b": "block", "g": "value_group", "w": "window", "a": "sinks", "c": "clip"},
    "zipcache": {"h": "hi", "l": "lo", "r": "salient", "p": "probes", "b": "block", "w": "window", "a": "sinks",
                 "c": "clip"},
    "gear": {"r": "rank", "s": "outliers", "b": "block", "w": "window", "a": "sinks", "c": "clip"},
}
KV_HELP = ("int8|int4|int3|int2 or kivi<bits> (KIVI; options -b<block> -g<value group> -w<window> "
           "-a<attention sinks kept in full precision> -c1 (clipping search)), "
           "zipcache (-h<hi bits> -l<lo bits> -r<salient fraction> -p<probe fraction> -b -w -a -c), "
           "gear<bits> (-r<rank> -s<outlier fraction> -b -w -a -c), or hf-hqq<bits> (transformers' QuantizedCache, "
           "the peer); e.g. kivi2-w128, kivi2-a4-c1, zipcache-h4-l2-r0.3, gear2-r4")


def parse_kv(name: str) -> KVSpec | ZipSpec | GearSpec | HFQuantizedSpec:
    """A --kv name -> its spec; ConfigError naming the problem otherwise."""
    if name.startswith("hf-"):
        m = re.fullmatch(r"hf-hqq([1-48])", name)
        if not m or m.group(1) not in ("1", "2", "3", "4", "8"):
            raise ConfigError(f"--kv {name!r}: transformers' quantized cache is hf-hqq<bits> with bits 1, 2, 3, 4 or 8")
        return HFQuantizedSpec(int(m.group(1)))
    head, *opts = name.split("-")
    m = re.fullmatch(r"(int|kivi|gear)(\d)|(zipcache)", head)
    if not m:
        raise ConfigError(f"--kv {name!r}: unknown cache; use {KV_HELP}")
    kind = "zipcache" if m.group(3) else ("gear" if m.group(1) == "gear" else "kivi")
    values: dict = {}
    if kind != "zipcache":
        values["bits"] = int(m.group(2))
    for opt in opts:
        key, val = opt[:1], opt[1:]
        field_name = _OPTIONS[kind].get(key)
        if field_name is None or not re.fullmatch(r"\d+(\.\d+)?", val):
            raise ConfigError(f"--kv {name!r}: bad option {opt!r}; {kind} takes "
                              + ", ".join(f"-{k}<{f}>" for k, f in _OPTIONS[kind].items()))
        values[field_name] = float(val) if field_name in ("salient", "probes", "outliers") else int(float(val))
    cls = {"kivi": KVSpec, "zipcache": ZipSpec, "gear": GearSpec}[kind]
    spec = cls(**values)
    _validate(name, spec)
    return spec


def _validate(name: str, spec) -> None:
    for bits_field in ("bits", "hi", "lo"):
        b = getattr(spec, bits_field, None)
        if b is not None and b not in (2, 3, 4, 8):
            raise ConfigError(f"--kv {name!r}: {b}-bit caches are not supported; use 2, 3, 4 or 8 bits")
    if spec.block < 1 or spec.window < 0 or spec.value_group < 1 or spec.sinks < 0:
        raise ConfigError(f"--kv {name!r}: the block and group must be >= 1, the window and sinks >= 0")
    if spec.clip not in (0, 1):
        raise ConfigError(f"--kv {name!r}: -c is 0 (min/max ranges) or 1 (clipping search)")
    if isinstance(spec, ZipSpec):
        if spec.hi < spec.lo:
            raise ConfigError(f"--kv {name!r}: salient rows need at least as many bits as the others")
        if not (0 <= spec.salient <= 1 and 0 < spec.probes <= 1):
            raise ConfigError(f"--kv {name!r}: the salient fraction must be in [0, 1] and probes in (0, 1]")
    if isinstance(spec, GearSpec):
        if spec.block % 32:
            raise ConfigError(f"--kv {name!r}: GEAR's block must be a multiple of 32 tokens (its key sub-blocks)")
        if not 0 <= spec.outliers < 0.5 or spec.rank < 0:
            raise ConfigError(f"--kv {name!r}: the outlier fraction must be in [0, 0.5) and the rank >= 0")


def parse_policy(policy: str, budget: float | str | None, **options) -> EvictSpec:
    """--kv-policy and --kv-budget -> EvictSpec (a budget < 1 is a fraction, >= 1 a token count)."""
    if policy not in POLICIES:
        raise ConfigError(f"--kv-policy {policy!r}: use one of {', '.join(POLICIES)}")
    if budget is None:
        raise ConfigError(f"--kv-policy {policy} needs --kv-budget: a fraction of the tokens (0.2) or a count (512)")
    try:
        b = float(budget)
    except ValueError:
        raise ConfigError(f"--kv-budget {budget!r}: give a fraction in (0, 1) or a whole number of tokens") from None
    if b <= 0 or (b >= 1 and b != int(b)):
        raise ConfigError(f"--kv-budget {budget!r}: give a fraction in (0, 1) or a whole number of tokens >= 1")
    return EvictSpec(policy, b, **options)


LowBitSpec = KVSpec | ZipSpec | GearSpec | HFQuantizedSpec


@dataclass(frozen=True)
class CacheSpec:
    """One cache choice: a low-bit cache or an eviction policy (both at once are refused for now)."""

    label: str                        # the one string that names it in results: the --kv name or "<policy>@<budget>"
    lowbit: LowBitSpec | None = None
    evict: EvictSpec | None = None

    def __str__(self) -> str:
        return self.label


def parse_cache(name: CacheSpec | str | None) -> CacheSpec | None:
    """A --kv name or a "<policy>@<budget>" label (see cache_choice) -> its CacheSpec (a CacheSpec
    as it is); None for the full cache ("none", "full" or nothing)."""
    if isinstance(name, CacheSpec):
        return name
    if name in (None, "none", "full"):
        return None
    if "@" in name:
        policy, _, budget = name.partition("@")
        return CacheSpec(name, evict=parse_policy(policy, budget))
    return CacheSpec(name, lowbit=parse_kv(name))


def cache_choice(kv: str | None, policy: str | None = None, budget: float | str | None = None) -> CacheSpec | None:
    """The flags --kv, --kv-policy and --kv-budget together -> one CacheSpec, labelled by the --kv
    name or "<policy>@<budget>" (e.g. "snapkv@0.2"); None for the full cache. ConfigError naming
    the flag otherwise (a low-bit cache with eviction is refused for now)."""
    if policy is None:
        if budget is not None:
            raise ConfigError("--kv-budget needs --kv-policy streaming|h2o|snapkv")
        if kv in (None, "none", "full"):
            return None
        return CacheSpec(kv, lowbit=parse_kv(kv))  # a --kv name, never an eviction label
    if kv not in (None, "none", "full"):
        raise ConfigError("--kv and --kv-policy together are not supported yet: pick a low-bit cache or an eviction policy")
    evict = parse_policy(policy, budget)
    return CacheSpec(f"{policy}@{evict.budget:g}", evict=evict)
