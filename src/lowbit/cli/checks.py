"""Checks of a command's flags against each other and against what the command will do, run by
`lowbit`'s main() before the command starts: a flag the command would ignore, or one that
contradicts another, is refused (ConfigError) naming the flag and the fix, never dropped silently
and recorded as if it had been used.

Value ranges (--max-new-tokens >= 1, --damp in (0, 1), ...) are argparse types (cli/common.py), and
recipe fields are validated by the Recipe dataclasses; this module holds what needs several flags
at once, and check_layer_groups, which needs the loaded model.
"""

from __future__ import annotations

import argparse
import logging
import math
from functools import reduce

from torch import nn

from lowbit.cli.common import _recipe_from_args
from lowbit.errors import ConfigError
from lowbit.recipes import METHODS, PER_CHANNEL, Recipe

log = logging.getLogger(__name__)

# quantize flags -> the recipe section that reads them
GPTQ_FLAGS = (("act_order", "--act-order"), ("static_groups", "--static-groups"), ("damp", "--damp"),
              ("true_sequential", "--true-sequential"))
CALIBRATION_FLAGS = (("calib_data", "--calib-data"), ("calib_samples", "--calib-samples"),
                     ("calib_seqlen", "--calib-seqlen"), ("calib_dtype", "--calib-dtype"), ("seed", "--seed"))
EVAL_FLAGS = (("max_tokens", "--max-tokens"), ("seqlen", "--seqlen"))


def _given(args: argparse.Namespace, flags: tuple[tuple[str, str], ...]) -> list[str]:
    return [flag for dest, flag in flags if getattr(args, dest, None) is not None]


def check_args(args: argparse.Namespace) -> None:
    """Refuse flag combinations `args.command` cannot honour; commands without checks pass."""
    check = {"quantize": check_quantize, "generate": check_generate}.get(args.command)
    if check is not None:
        check(args)


def check_quantize(args: argparse.Namespace) -> Recipe:
    """The recipe the flags ask for (every field validated), refusing flags its method ignores:
    GPTQ settings without GPTQ, calibration settings where nothing calibrates (plain RTN, no
    budget), evaluation settings without --eval."""
    recipe = _recipe_from_args(args)
    given = _given(args, GPTQ_FLAGS)
    gptq_methods = [m for m in METHODS if "gptq" in METHODS[m].sections]
    if given and recipe.method not in gptq_methods:
        raise ConfigError(f"{', '.join(given)}: GPTQ settings, but method {recipe.method!r} does not run GPTQ; "
                          f"drop {'them' if len(given) > 1 else 'it'} or choose a method that does "
                          f"({', '.join(gptq_methods)})")
    given = _given(args, CALIBRATION_FLAGS)
    if given and not recipe.needs_calibration:
        raise ConfigError(f"{', '.join(given)}: calibration settings, but method {recipe.method!r} without a size "
                          "budget reads no calibration data; drop "
                          f"{'them' if len(given) > 1 else 'it'}, or calibrate (--method gptq or awq, or a budget "
                          "with --target-bpw / --target-size)")
    _check_stream_flags(args, recipe)
    given = _given(args, EVAL_FLAGS)
    if given and not args.eval:
        raise ConfigError(f"{', '.join(given)} shape{'' if len(given) > 1 else 's'} the evaluation after "
                          "quantizing, and none was asked for: add --eval DATASET or drop "
                          f"{'them' if len(given) > 1 else 'it'}")
    return recipe


def _check_stream_flags(args: argparse.Namespace, recipe: Recipe) -> None:
    """--stream and --resume against the rest: a streamed job writes a lowbit checkpoint, is
    evaluated afterwards, and runs every method but a budget."""
    if getattr(args, "resume", False) and not args.stream:
        raise ConfigError("--resume continues a streamed run: add --stream (the command that started the run, "
                          "with --resume added)")
    if not getattr(args, "stream", False):
        return
    if args.format != "lowbit":
        raise ConfigError(f"--stream writes a lowbit checkpoint, not --format {args.format}; drop one of them")
    if args.eval:
        raise ConfigError("--stream does not evaluate while quantizing (the quantized model is never whole in "
                          "memory): drop --eval and run `lowbit eval` on the checkpoint afterwards")
    from lowbit.streaming import check_streamable

    check_streamable(recipe)


def check_generate(args: argparse.Namespace) -> None:
    """Sampling settings need sampling; a system message needs the chat template."""
    if args.raw and args.system is not None:
        raise ConfigError("--system goes through the chat template, which --raw turns off; drop one of them")
    if args.temperature == 0:
        given = [flag for dest, flag in (("top_p", "--top-p"), ("top_k", "--top-k"), ("seed", "--seed"))
                 if getattr(args, dest) is not None]
        if given:
            raise ConfigError(f"{', '.join(given)} shape{'' if len(given) > 1 else 's'} sampling, and "
                              "--temperature 0 (the default) decodes greedily: add --temperature > 0 "
                              f"(e.g. 0.8) or drop {'them' if len(given) > 1 else 'it'}")


def check_layer_groups(model: nn.Module, names: list[str], recipe: Recipe) -> None:
    """Against the loaded model, before quantizing: refuse a group wider than a layer's input
    (it would be stored per channel under the group's label), naming the layer's width; warn
    once about layers whose width the groups do not tile (a short last group, which the packed
    runtime and its kernels cannot run), naming group sizes that tile every layer.

    A size budget chooses groups per layer from its levels, so only its levels' widths matter
    there and this check passes."""
    if recipe.budget is not None or not names:
        return
    widths = {name: model.get_submodule(name).in_features for name in names}
    common = reduce(math.gcd, widths.values())
    tiling = [g for g in (32, 64, 128, 256) if common % g == 0]
    options = (f"group sizes that tile every layer here: {', '.join(map(str, tiling))}" if tiling
               else "no power-of-two group tiles every layer here")
    too_wide, untiled = [], []
    for name, width in widths.items():
        g = recipe.for_layer(name).group_size
        if g == PER_CHANNEL:
            continue
        if g > width:
            too_wide.append((width, name, g))
        elif width % g:
            untiled.append((width, name, g))
    if too_wide:
        width, name, g = min(too_wide)
        raise ConfigError(f"group size {g} is wider than layer {name}, which has {width} inputs (a group splits "
                          f"one row of inputs): use -1 for one group per output channel, or a group of at most "
                          f"{width}; {options}")
    if untiled:
        width, name, g = untiled[0]
        log.warning("groups of %d do not tile the inputs of %d layer(s) (e.g. %s, %d inputs): their last group "
                    "is short, which the packed kernels cannot run, so those layers will run on the slower "
                    "reference path; %s", g, len(untiled), name, width, options)
