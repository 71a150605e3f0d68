"""Recipes: what the user asks for, as plain validated dataclasses.

A Recipe round-trips through a dict (the checkpoint manifest stores it) and loads from TOML or
YAML files. Validation happens on construction and names the bad field and the allowed values.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lowbit.errors import ConfigError
from lowbit.levels import PER_CHANNEL, Allocation, Level, group_size_problem
from lowbit.methods import METHODS, Method, width_range
from lowbit.recipe_sections import (  # noqa: F401 - the sections, re-exported
    BLOCK_LEVELS,
    CALIB_DTYPES,
    AWQConfig,
    BudgetConfig,
    CalibrationConfig,
    ClipConfig,
    GPTQConfig,
    IntegerScaleConfig,
    Rule,
    SlimConfig,
    _require,
)

if TYPE_CHECKING:
    from lowbit.qtensor import QuantFormat


AUTO_HEAD_BITS = 8  # the output head's width when the recipe does not say (an untied head only)




@dataclass(frozen=True)
class LayerSpec:
    """What one layer gets, resolved for its width once (Recipe.layer_spec): the method that
    quantizes it and its format."""

    method: Method
    fmt: QuantFormat                    # fractional methods: the widest width a group may take
    average_bits: float | None = None   # fractional methods: the average code width over groups
    block_type: str | None = None       # a llama.cpp block type (formats/ggml): the layer becomes its bytes
                                        # (BlockWeight); fmt is then the affine stand-in AWQ's search scores with


@dataclass(frozen=True)
class Recipe:
    """A full weight-quantization scheme for the linear layers of the decoder blocks."""

    method: str = "gptq"
    bits: int | float = 4          # slim: average code width over groups (e.g. 2.5)
    group_size: int = 128          # -1 (PER_CHANNEL): one group per output channel
    symmetric: bool = False
    clip: ClipConfig = field(default_factory=ClipConfig)
    gptq: GPTQConfig = field(default_factory=GPTQConfig)
    calibration: CalibrationConfig = field(default_factory=CalibrationConfig)
    awq: AWQConfig = field(default_factory=AWQConfig)
    slim: SlimConfig = field(default_factory=SlimConfig)
    integer_scale: IntegerScaleConfig = field(default_factory=IntegerScaleConfig)
    rules: tuple[Rule, ...] = ()   # per-module overrides, first match wins
    budget: BudgetConfig | None = None
    skip: tuple[str, ...] = ()     # regexes on module names kept in full precision
    head_bits: int | None = None   # the output head, RTN: None = 8 bits where it is untied (dense where tied),
                                   # 0 = keep it dense, 2..8 = that width (refused for a tied head)
    head_group_size: int = 128

    def __post_init__(self) -> None:
        _require(self.method in METHODS, "method", f"{self.method!r} is not one of {', '.join(METHODS)}")
        _require(self.head_bits is None or (isinstance(self.head_bits, int) and not isinstance(self.head_bits, bool)
                                            and (self.head_bits == 0 or 2 <= self.head_bits <= 8)), "head_bits",
                 f"0 (keep the output head dense) or an integer from 2 to 8 (absent: 8 bits where the head is "
                 f"untied), got {self.head_bits!r}")
        method = METHODS[self.method]
        if method.fractional_bits:
            _require(isinstance(self.bits, (int, float)) and not isinstance(self.bits, bool)
                     and 1.5 <= self.bits <= 7, "bits",
                     f"{self.method} takes an average width from 1.5 to 7, got {self.bits!r}")
        else:
            fractional = " or ".join(repr(m) for m in METHODS if METHODS[m].fractional_bits)
            _require(isinstance(self.bits, int) and not isinstance(self.bits, bool) and 2 <= self.bits <= 8,
                     "bits", f"must be an integer from 2 to 8 for method {self.method!r}, got {self.bits!r}"
                     + (f" (fractional averages need method {fractional})"
                        if isinstance(self.bits, float) else ""))
        _require(not method.fractional_bits or not self.gptq.act_order or self.gptq.static_groups,
                 "gptq.static_groups", f"method {self.method} with act_order needs static_groups (per-group widths "
                 "follow the original column order): pass --static-groups or drop --act-order")
        problem = group_size_problem(self.group_size)
        _require(problem is None, "group_size", problem or "")
        problem = group_size_problem(self.head_group_size)
        _require(problem is None, "head_group_size", problem or "")
        for rule in self.rules:
            _require(rule.method in (None, "rtn", self.method), "rules.method",
                     f"{rule.method!r}: a rule may choose 'rtn' or the recipe's method {self.method!r}")
            self.for_layer_rule(rule)  # validates the combined settings
        _require(self.budget is None or method.budget_ok, "budget",
                 "a size budget chooses integer widths per layer; use it with "
                 + ", ".join(m for m in METHODS if METHODS[m].budget_ok))
        for pattern in self.skip:
            try:
                re.compile(pattern)
            except re.error as e:
                raise ConfigError(f"recipe field 'skip': {pattern!r} is not a valid regex ({e})") from None

    @property
    def needs_calibration(self) -> bool:
        return METHODS[self.method].needs_data or self.budget is not None

    def describe(self) -> str:
        g = "per-channel" if self.group_size <= 0 else f"g{self.group_size}"
        sym = "sym" if self.symmetric else "asym"
        iscale = f" int{self.integer_scale.bits}-scale" if self.integer_scale.enabled else ""
        if self.budget is not None:
            b = self.budget
            target = f"{b.target_bpw} bpw" if b.target_bpw is not None else f"{b.target_bytes / 1e6:.0f} MB"
            if b.block_types:
                return f"{self.method} budget {target} over {', '.join(map(str, b.levels))}"
            return f"{self.method} budget {target} {sym}{iscale}"
        if self.rules:
            return f"{self.method} mixed per layer ({len(self.rules)} rules) {sym}{iscale}"
        return f"{self.method} w{self.bits} {g} {sym}{iscale}"

    def for_layer_rule(self, rule: Rule | None) -> Recipe:
        if rule is None:
            return self
        changes = {k: v for k, v in (("bits", rule.bits), ("group_size", rule.group_size),
                                     ("symmetric", rule.symmetric), ("method", rule.method)) if v is not None}
        return dataclasses.replace(self, rules=(), budget=None, **changes)

    def for_layer(self, module_name: str, allocation: Allocation | None = None) -> Recipe:
        """The settings for one layer: its level when `allocation` (a budget's choice) names it,
        else the first rule whose pattern matches, else the recipe's."""
        if allocation is not None and module_name in allocation:
            level = allocation[module_name]
            if level.is_block_type:
                raise ConfigError(f"{module_name}: level {level} is a llama.cpp block type, which only a GGUF file "
                                  "holds: write one with --format gguf (lowbit.to_gguf)")
            return dataclasses.replace(self, rules=(), budget=None, bits=level.bits, group_size=level.group_size)
        return self.for_layer_rule(next((r for r in self.rules if re.search(r.pattern, module_name)), None))

    def level_format(self, level: Level, in_features: int) -> QuantFormat:
        """The format of a layer `in_features` wide at `level`, with this recipe's symmetry and scales."""
        return self._format(level.bits, level.group_size, self.symmetric, in_features)

    def layer_spec(self, module_name: str, in_features: int, allocation: Allocation | None = None) -> LayerSpec:
        """What one layer gets (its method, and its format resolved for its width): see for_layer.
        Raises ConfigError when the width does not suit the format."""
        r = self.for_layer(module_name, allocation)
        method = METHODS[r.method]
        if method.fractional_bits:
            return LayerSpec(method, self._format(width_range(r.bits)[1], r.group_size, r.symmetric, in_features),
                             float(r.bits))
        return LayerSpec(method, self._format(r.bits, r.group_size, r.symmetric, in_features))

    def head_format(self, in_features: int) -> QuantFormat:
        """The output head's format (head_bits): round-to-nearest, float16 scales."""
        from lowbit.qtensor import QuantFormat

        return QuantFormat.resolved(in_features, self.head_bits or AUTO_HEAD_BITS, self.head_group_size, self.symmetric)

    def with_head(self, untied: bool) -> Recipe:
        """This recipe with head_bits decided for a model whose output head is `untied` (or not):
        an absent head_bits becomes 8 for an untied head and 0 (dense) for a tied one. An 8-bit
        head costs next to nothing in accuracy and is what a decode step reads most of in a small
        model. With per-channel 8-bit symmetric blocks (W8A8), the head takes their format too."""
        if self.head_bits is not None:
            return self
        if not untied:
            return dataclasses.replace(self, head_bits=0)
        group = PER_CHANNEL if self.group_size == PER_CHANNEL and self.bits == 8 else self.head_group_size
        return dataclasses.replace(self, head_bits=AUTO_HEAD_BITS, head_group_size=group)

    def _format(self, bits: int, group_size: int, symmetric: bool, in_features: int) -> QuantFormat:
        from lowbit.qtensor import QuantFormat

        isc = self.integer_scale
        return QuantFormat.resolved(in_features, bits, group_size, symmetric, isc.bits if isc.enabled else 0,
                                    isc.multiplier)

    def is_skipped(self, module_name: str) -> bool:
        return any(re.search(p, module_name) for p in self.skip)

    def to_dict(self) -> dict[str, Any]:
        """Every field, the sections this method does not run included (see used_dict)."""
        d = dataclasses.asdict(self)
        d["skip"] = list(self.skip)
        d["rules"] = [r.to_dict() for r in self.rules]
        if self.budget is None:
            del d["budget"]
        else:
            d["budget"] = {k: v for k, v in d["budget"].items() if v is not None}
            d["budget"]["levels"] = [str(lv) for lv in self.budget.levels]
        return d

    def unused_sections(self) -> tuple[str, ...]:
        """The sections this recipe's method never reads: calibration and gptq for plain RTN,
        awq without smoothing, slim without SliM-LLM, a disabled integer_scale, the output head's
        group size when the head stays dense."""
        unused = []
        if not self.needs_calibration:
            unused.append("calibration")
        unused += [s for s in ("gptq", "awq", "slim") if s not in METHODS[self.method].sections]
        if not self.integer_scale.enabled:
            unused.append("integer_scale")
        if not self.head_bits:
            unused.append("head_group_size")
        return tuple(unused)

    def used_dict(self, allocation: Allocation | None = None) -> dict[str, Any]:
        """to_dict() without the sections the method does not use: what a manifest should record,
        so it never claims settings that had no effect. from_dict reads it back (an absent
        section takes its defaults), to a recipe that quantizes the same way. A budget's
        `allocation` is recorded as one exact rule per layer ahead of the recipe's own rules (the
        form checkpoints have always had: read back, each layer gets its level)."""
        d = self.to_dict()
        for name in self.unused_sections():
            del d[name]
        if allocation:
            d["rules"] = [Rule(pattern=f"^{re.escape(n)}$", bits=lv.bits, group_size=lv.group_size).to_dict()
                          for n, lv in allocation.items()] + d["rules"]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Recipe:
        return _build(cls, d, "")

    @classmethod
    def load(cls, file_or_preset: str | Path) -> Recipe:
        """A recipe file (.toml / .yaml), or the name of a built-in preset (see presets())."""
        path = Path(file_or_preset)
        if path.suffix in (".toml", ".yaml", ".yml") or path.exists():
            return cls.from_file(path)
        preset = PRESET_DIR / f"{file_or_preset}.toml"
        if not preset.is_file():
            raise ConfigError(f"{str(file_or_preset)!r} is neither a recipe file nor a preset; presets: "
                              f"{', '.join(presets())}")
        return cls.from_file(preset)

    @classmethod
    def from_file(cls, path: str | Path) -> Recipe:
        """Parse a .toml or .yaml recipe. YAML is read with safe_load: tags that would build Python
        objects (!!python/...) are refused, never run."""
        path = Path(path)
        if not path.exists():
            raise ConfigError(f"recipe file {path} does not exist")
        if not path.is_file():
            raise ConfigError(f"recipe file {path} is not a file; give a .toml or .yaml file or a preset name")
        if path.suffix not in (".toml", ".yaml", ".yml"):
            raise ConfigError(f"recipe file {path}: use a .toml, .yaml or .yml file")
        raw = path.read_bytes()
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise ConfigError(f"recipe file {path} is not UTF-8 text (byte {e.start} is {raw[e.start]:#04x}); "
                              "save it as UTF-8 TOML or YAML") from None
        if "\x00" in text:
            raise ConfigError(f"recipe file {path} holds NUL bytes: it looks binary, not TOML or YAML text")
        if path.suffix == ".toml":
            import tomllib

            try:
                data = tomllib.loads(text)
            except tomllib.TOMLDecodeError as e:
                raise ConfigError(f"recipe file {path} is not valid TOML: {e}") from None
        else:
            import yaml

            try:
                data = yaml.safe_load(text)
            except yaml.YAMLError as e:
                where = getattr(e, "problem_mark", None)
                at = f" (line {where.line + 1}, column {where.column + 1})" if where is not None else ""
                what = " ".join(str(getattr(e, "problem", None) or e).split())
                raise ConfigError(f"recipe file {path} is not valid YAML{at}: {what}; a recipe holds plain "
                                  "values only (no !!python tags)") from None
            if data is None:
                data = {}
        return cls.from_dict(data)


PRESET_DIR = Path(__file__).parent / "presets"


def presets() -> list[str]:
    """Names of the built-in recipe presets (src/lowbit/presets/*.toml)."""
    return sorted(p.stem for p in PRESET_DIR.glob("*.toml"))


_NESTED = {"clip": ClipConfig, "gptq": GPTQConfig, "calibration": CalibrationConfig, "awq": AWQConfig,
           "slim": SlimConfig, "integer_scale": IntegerScaleConfig, "budget": BudgetConfig}


def _build(cls, d: Any, prefix: str):
    if not isinstance(d, dict):
        raise ConfigError(f"recipe field '{prefix or 'recipe'}': expected a table/mapping, got {type(d).__name__}")
    known = {f.name: f for f in fields(cls)}
    unknown = sorted(str(k) for k in set(d) - set(known))
    if unknown:
        raise ConfigError(
            f"recipe has unknown field(s) {', '.join(prefix + u for u in unknown)}; "
            f"allowed: {', '.join(prefix + k for k in known)}"
        )
    kwargs = {}
    for name, value in d.items():
        if name in _NESTED and cls is Recipe:
            kwargs[name] = _build(_NESTED[name], value, f"{name}.")
            continue
        default = known[name].default
        if name == "rules" and cls is Recipe:
            if not isinstance(value, (list, tuple)):
                raise ConfigError("recipe field 'rules': expected a list of tables/mappings")
            kwargs[name] = tuple(_build(Rule, v, "rules.") for v in value)
            continue
        if name == "bits" and cls in (Recipe, Rule):
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
                raise ConfigError(f"recipe field '{prefix}bits': expected a number, got {type(value).__name__} {value!r}")
        elif name == "levels" and cls is BudgetConfig:
            if isinstance(value, str) or not isinstance(value, (list, tuple)):
                raise ConfigError("recipe field 'budget.levels': expected a list like ['w2g64', 'w3g128']")
            value = tuple(value)
        elif name == "target_bpw" and cls is BudgetConfig:
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
                raise ConfigError(f"recipe field 'budget.target_bpw': expected a number, got {value!r}")
            value = None if value is None else float(value)
        elif name == "target_bytes" and cls is BudgetConfig:
            if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
                raise ConfigError(f"recipe field 'budget.target_bytes': expected an integer count of bytes, "
                                  f"got {value!r}")
        elif name in ("symmetric", "pattern", "method") and cls is Rule:
            want = str if name != "symmetric" else bool
            if (value is not None or name == "pattern") and type(value) is not want:
                raise ConfigError(f"recipe field 'rules.{name}': expected {want.__name__}, got {value!r}")
        elif name == "skip":
            if isinstance(value, str) or not isinstance(value, (list, tuple)) \
                    or not all(isinstance(v, str) for v in value):
                raise ConfigError("recipe field 'skip': expected a list of regexes")
            value = tuple(value)
        elif default is not dataclasses.MISSING and default is not None:
            want = type(default)
            if want is float and isinstance(value, int) and not isinstance(value, bool):
                value = float(value)
            if type(value) is not want:
                raise ConfigError(
                    f"recipe field '{prefix}{name}': expected {want.__name__}, got {type(value).__name__} {value!r}"
                )
        kwargs[name] = value
    missing = [n for n, f in known.items() if n not in kwargs and f.default is dataclasses.MISSING
               and f.default_factory is dataclasses.MISSING]
    if missing:
        where = prefix.rstrip(".") or "recipe"
        raise ConfigError(f"recipe field '{where}' lacks required field(s) {', '.join(prefix + m for m in missing)}")
    return cls(**kwargs)
