"""`lowbit quantize MODEL --format gguf:MIX -o model.gguf`, or `--format gguf --target-bpw X` (a
size budget chooses each decoder-block layer's type): lowbit's rounding written as a GGUF file on
llama.cpp's block types (lowbit.to_gguf)."""

from __future__ import annotations

import dataclasses
from collections import Counter
from pathlib import Path

from lowbit.cli.common import _mb, _say
from lowbit.dtypes import resolve_dtype
from lowbit.errors import ConfigError


def gguf_mix(fmt: str, budget: bool = False) -> str | None:
    """'gguf:Q4_K_M' -> 'Q4_K_M', checked against the mixes lowbit writes; 'gguf' -> None, which
    only a size budget may leave open (it chooses the decoder blocks' types, to_gguf.BUDGET_MIX
    the others)."""
    from lowbit.formats.ggml.mixes import check_mix

    kind, _, mix = fmt.partition(":")
    if kind != "gguf":
        raise ConfigError(f"--format {fmt!r}: formats are 'lowbit' (a checkpoint folder), gguf:MIX, or gguf with a "
                          "size budget")
    if not mix:
        if not budget:
            raise ConfigError("--format gguf needs a mix (e.g. --format gguf:Q4_K_M) or a size budget that chooses "
                              "each layer's block type (--target-bpw or --target-size)")
        return None
    return check_mix(mix)


def cmd_quantize_gguf(args, recipe) -> int:
    from lowbit.models import KNOWN_MODELS, known_model_path, load_model
    from lowbit.outputs import check_output_file
    from lowbit.to_gguf import (
        BUDGET_MIX,
        GGUF_METHODS,
        is_lowbit_gguf,
        quantize_to_gguf,
    )

    mix = gguf_mix(args.format, budget=recipe.budget is not None)
    if recipe.budget is not None:
        recipe = dataclasses.replace(recipe, budget=recipe.budget.on_block_types())  # default levels: block types
    if recipe.method not in GGUF_METHODS:
        raise ConfigError(f"--method {recipe.method}: GGUF output takes {', '.join(GGUF_METHODS)}")
    if args.eval:
        raise ConfigError("--eval with --format gguf: evaluate the written file with `lowbit eval FILE.gguf "
                          "--reference MODEL`")
    if args.model in KNOWN_MODELS:
        inputs = [known_model_path(args.model, args.cache)]
    else:
        inputs = [Path(args.model).expanduser()] if Path(args.model).expanduser().exists() else []
    out = check_output_file(args.output, args.force, inputs, is_lowbit_gguf, "GGUF file")
    if recipe.needs_calibration:
        from lowbit.data import calibration_documents

        calibration_documents(recipe.calibration.dataset, args.data_dir)
    dtype = resolve_dtype(args.dtype)
    _say(f"loading {args.model} ({dtype}) ...")
    loaded = load_model(args.model, dtype=dtype, cache=args.cache)
    if recipe.budget is None:
        _say(f"recipe: {recipe.method} on llama.cpp's {mix} mix")
    else:
        _say(f"recipe: {recipe.describe()}; the other tensors as under {mix or BUDGET_MIX}")
    res = quantize_to_gguf(loaded, recipe, mix, out, args.data_dir, progress=not args.quiet, overwrite=args.force)
    if res.quantized.budget is not None:
        _say(res.quantized.budget.summary())
    types = Counter(res.types.values())
    _say(f"wrote {res.path} ({_mb(res.path.stat().st_size)}): decoder blocks at {res.bits_per_weight:.3f} bits/weight; "
         + ", ".join(f"{t} x{n}" for t, n in sorted(types.items())))
    for (want, got), count in Counter(res.fallbacks.values()).items():
        _say(f"note: {count} tensors are {got}, not {want}: their rows are not whole {want} blocks (llama.cpp "
             "does the same)")
    if res.quantized.fallbacks and not args.allow_fallback:
        _say(f"lowbit: {res.quantized.fallback_summary()}; the file is written, but it is not what the recipe "
             "asked for: pass --allow-fallback to accept it (exit 0)")
        return 1
    return 0

