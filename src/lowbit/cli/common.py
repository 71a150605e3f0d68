"""What the `lowbit` commands share: printing helpers, the argparse types of flag values, the
parser class, the flags several commands take, and the recipe that quantize's flags ask for
(read by quantize and by the flag checks)."""

from __future__ import annotations

import argparse
import re
import sys

from lowbit.errors import ConfigError


def _say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _mb(n: float) -> str:
    return f"{n / 1e6:.1f} MB" if n < 1e9 else f"{n / 1e9:.2f} GB"


# ---------------------------------------------------------------- argument types
def _size(text: str) -> int:
    """'300MB', '1.2GB', '500000000' -> bytes (decimal units, as file sizes are usually quoted)."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kKmMgG]?)(i?)[bB]?\s*", text)
    if not m:
        raise argparse.ArgumentTypeError(f"expected a size like 300MB or 1.2GB, got {text!r}")
    base = 1024 if m.group(3) else 1000
    return int(float(m.group(1)) * base ** " kmg".index(m.group(2).lower() or " "))


def _number(text: str) -> int | float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    return int(v) if v.is_integer() else v


def _int_from(low: int):
    """An argparse type: an integer of at least `low`."""
    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if v < low:
            raise argparse.ArgumentTypeError(f"must be at least {low}, got {v}")
        return v

    return parse


def _nonempty(flag: str):
    """An argparse type: a string with at least one character."""
    def parse(text: str) -> str:
        if not text:
            raise argparse.ArgumentTypeError(f"{flag} needs some text")
        return text

    return parse


def _float_in(low: float, high: float, open_low: bool = False, open_high: bool = False):
    """An argparse type: a number in the interval from `low` to `high` (ends open as asked)."""
    interval = f"{'(' if open_low else '['}{low:g}, {high:g}{')' if open_high else ']'}"

    def parse(text: str) -> float:
        try:
            v = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if not (low < v if open_low else low <= v) or not (v < high if open_high else v <= high):
            raise argparse.ArgumentTypeError(f"must be in {interval}, got {text}")
        return v

    return parse


# ---------------------------------------------------------------- parser and shared flags
class _Parser(argparse.ArgumentParser):
    """A usage error is one line, `lowbit: error: ...`, and exit code 2 (argparse's own prints
    the whole usage first)."""

    def error(self, message: str):
        self.exit(2, f"lowbit: error: {message} (see `{self.prog} --help`)\n")


def common_arguments(sp: argparse.ArgumentParser, data: bool = True) -> None:
    """--cache, --data-dir (unless data=False) and -q, which most commands take."""
    sp.add_argument("--cache", help="cache directory for fetched models (default $LOWBIT_CACHE or ~/.cache/lowbit)")
    if data:
        sp.add_argument("--data-dir", help="directory with the datasets (default $LOWBIT_DATA, then <cache>/data, ./data)")
    sp.add_argument("-q", "--quiet", action="store_true",
                    help="no progress bars (lowbit's, transformers', huggingface_hub's) and no library info logs")


def _kv_arguments(p: argparse.ArgumentParser) -> None:
    """--kv, --kv-policy and --kv-budget; main() parses them together into args.kv_spec (see
    kv_spec_from_args) before the command runs."""
    from lowbit.runtime.kvcache import KV_HELP, POLICIES

    p.add_argument("--kv", help=f"compressed KV cache: {KV_HELP}")
    p.add_argument("--kv-policy", choices=POLICIES, help="evict cached tokens under --kv-budget: streaming "
                   "(attention sinks + recent), h2o (heavy hitters + recent), snapkv (observation-window votes)")
    p.add_argument("--kv-budget", help="tokens kept by --kv-policy: a fraction of those seen (0.2) or a count (512)")


def kv_spec_from_args(args: argparse.Namespace) -> None:
    """The cache flags, parsed once into args.kv_spec: a CacheSpec, or None for the full cache.
    A bad name or combination is a ConfigError naming the flag and the allowed values, raised
    before anything loads; the commands read args.kv_spec only."""
    from lowbit.runtime.kvcache import cache_choice

    args.kv_spec = cache_choice(args.kv, args.kv_policy, args.kv_budget)


# ---------------------------------------------------------------- quantize's recipe
def _recipe_from_args(args):
    """The Recipe that quantize's flags ask for: --recipe (or the defaults), each flag given
    overriding its field."""
    from lowbit.recipes import Recipe

    base = Recipe.load(args.recipe).to_dict() if args.recipe else Recipe().to_dict()
    flat = {"method": args.method, "bits": args.bits, "group_size": args.group_size, "symmetric": args.sym,
            "head_bits": args.head_bits}
    base.update({k: v for k, v in flat.items() if v is not None})
    for key, value in (("act_order", args.act_order), ("static_groups", args.static_groups), ("damp", args.damp),
                       ("true_sequential", args.true_sequential)):
        if value is not None:
            base["gptq"][key] = value
    for key, value in (("dataset", args.calib_data), ("n_samples", args.calib_samples),
                       ("seqlen", args.calib_seqlen), ("seed", args.seed), ("dtype", args.calib_dtype)):
        if value is not None:
            base["calibration"][key] = value
    if args.no_clip:
        base["clip"]["enabled"] = False
        if base["method"] == "awq":  # AWQ's RTN clips by its own output-error search
            base["awq"]["clip"] = False
    if args.integer_scale is not None:
        base["integer_scale"]["enabled"] = True
        base["integer_scale"]["bits"] = args.integer_scale
    if args.skip:
        base["skip"] = list(base["skip"]) + args.skip
    if args.target_bpw is not None or args.target_size is not None:
        budget = dict(base.get("budget") or {})
        budget.pop("target_bpw", None)
        budget.pop("target_bytes", None)
        if args.target_bpw is not None:
            budget["target_bpw"] = args.target_bpw
        if args.target_size is not None:
            budget["target_bytes"] = args.target_size
        base["budget"] = budget
    if args.levels is not None or args.search_generations is not None:
        if base.get("budget") is None:
            given = "--levels" if args.levels is not None else "--search-generations"
            raise ConfigError(f"{given} shapes a size budget, and there is none: add --target-bpw or --target-size "
                              f"(or a recipe with a [budget] table), or drop {given}")
        if args.levels is not None:
            base["budget"]["levels"] = [lv.strip() for lv in args.levels.split(",")]
        if args.search_generations is not None:
            base["budget"]["generations"] = args.search_generations
    return Recipe.from_dict(base)
