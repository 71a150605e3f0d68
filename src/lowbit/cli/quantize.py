"""`lowbit quantize`: quantize a model by a recipe, save a checkpoint, and evaluate it if asked.

Everything that can be checked is checked before the model is loaded, or right after: nothing
found wrong later may throw away finished quantization work."""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from lowbit.cli import workers
from lowbit.cli.common import (
    _float_in,
    _int_from,
    _mb,
    _number,
    _recipe_from_args,
    _say,
    _size,
    common_arguments,
)
from lowbit.dtypes import add_dtype_argument, resolve_dtype
from lowbit.errors import ConfigError, LowbitError
from lowbit.recipes import CALIB_DTYPES


def register(sub) -> None:
    from lowbit.recipes import METHODS

    q = sub.add_parser("quantize", help="quantize a model and save a checkpoint")
    q.add_argument("model", help="known name (see `lowbit models`), HF folder, .gguf file or hub id")
    q.add_argument("-o", "--output", required=True, help="checkpoint folder to write (a .gguf file with --format gguf:MIX)")
    q.add_argument("--format", default="lowbit", help="'lowbit' (a checkpoint folder, default) or gguf:MIX: a GGUF "
                   "file on llama.cpp's block types, each tensor's type as llama.cpp's MIX gives it (Q4_K_M, "
                   "Q3_K_M, Q2_K, IQ4_XS, ...) and rounded by --method (rtn, gptq, awq, awq-gptq)")
    q.add_argument("--recipe", help="recipe file (.toml/.yaml) or preset name (`lowbit recipes` lists them)"
                   "; flags given here override it")
    q.add_argument("--method", choices=list(METHODS),
                   help="rtn, gptq (default), awq (smoothing + RTN), awq-gptq, slim (mixed widths per group + GPTQ), "
                   "awq-slim (smoothing, then slim)")
    q.add_argument("--bits", type=_number, help="code width, 2-8 (default 4); with slim or awq-slim the average "
                   "width, e.g. 2.5")
    q.add_argument("--group-size", type=int, help="columns per group; -1 = per channel (default 128)")
    q.add_argument("--sym", action="store_true", default=None, help="symmetric (default asymmetric with zero points)")
    q.add_argument("--no-clip", action="store_true", help="disable the per-group clipping search")
    q.add_argument("--head-bits", type=int, help="width of the output head (lm_head), RTN in groups of 128; default "
                   "8 where the head is untied (a decode step reads it as much as the rest of a small model), "
                   "0 keeps it dense")
    q.add_argument("--integer-scale", type=int, nargs="?", const=8, metavar="BITS",
                   help="store group scales as BITS-bit integers (default 8) times one float per row (Integer Scale)")
    q.add_argument("--target-bpw", type=float, help="size budget: average bits per weight (scales and zeros "
                   "counted); bit width and group size are then chosen per layer")
    q.add_argument("--target-size", type=_size, help="size budget for the whole model, e.g. 300MB (16-bit "
                   "embeddings and norms included)")
    q.add_argument("--levels", help="with a budget: comma list of w<bits>g<group> per-layer choices")
    q.add_argument("--search-generations", type=_int_from(0),
                   help="with a budget: evolutionary search steps (default 30; 0: the sensitivity greedy alone)")
    q.add_argument("--act-order", action=argparse.BooleanOptionalAction, default=None)
    q.add_argument("--static-groups", action=argparse.BooleanOptionalAction, default=None)
    q.add_argument("--true-sequential", action=argparse.BooleanOptionalAction, default=None)
    q.add_argument("--damp", type=_float_in(0, 1, open_low=True, open_high=True),
                   help="GPTQ dampening, fraction of mean diag(H), in (0, 1) (default 0.01)")
    q.add_argument("--calib-data", help="calibration dataset (default c4)")
    q.add_argument("--calib-samples", type=_int_from(1), help="calibration samples (default 128)")
    q.add_argument("--calib-seqlen", type=_int_from(2), help="tokens per calibration sample (default 512)")
    q.add_argument("--seed", type=int, help="calibration sampling seed (default 0)")
    q.add_argument("--calib-dtype", choices=CALIB_DTYPES,
                   help="dtype of the calibration forward passes (default auto: bfloat16 where the CPU computes "
                        "it natively (AVX512_BF16, AMX), else float32; bfloat16 runs them under autocast, several "
                        "times faster there, while weights, Hessians and the quantization stay float32)")
    q.add_argument("--skip", action="append", help="regex of module names to keep in full precision (repeatable)")
    add_dtype_argument(q, "float32", "the dtype the model is loaded and calibrated in, and evaluated in with "
                       "--eval (float32 by default so weights are quantized unrounded)")
    q.add_argument("--eval", nargs="+", metavar="DATASET", help="after quantizing, evaluate against the reference "
                   "(datasets separated by spaces or commas)")
    q.add_argument("--max-tokens", type=_int_from(1), default=None, help="with --eval: evaluate on the first N tokens")
    q.add_argument("--seqlen", type=_int_from(2), default=None,
                   help="with --eval: evaluation window (default min(2048, context))")
    q.add_argument("--force", action="store_true", help="replace an existing lowbit checkpoint at -o (never "
                   "another folder, the input model, or the current folder or its parents)")
    q.add_argument("--stream", action="store_true", help="hold one decoder block in memory at a time (weights "
                   "read from the model's safetensors files), writing each finished block to -o as it goes: for "
                   "models larger than memory; the checkpoint is the same bit for bit. Every method but a budget")
    q.add_argument("--resume", action="store_true", help="with --stream: continue the unfinished -o folder of an "
                   "interrupted run of the same command from its last finished block")
    q.add_argument("--allow-fallback", action="store_true", help="exit 0 even when layers fell back to "
                   "round-to-nearest because their Hessian would not factorize (the report lists them)")
    workers.add_arguments(q)
    common_arguments(q)
    q.set_defaults(func=cmd_quantize)


def cmd_quantize(args) -> int:
    """One process, or (--workers, torchrun) one rank of several: cli/workers.py."""
    workers.check_workers(args)
    if args.workers and args.workers > 1:
        return workers.launch_workers(args)
    with workers.joined(args) as comm:
        return _quantize(args, comm)


def _quantize(args, comm) -> int:
    from lowbit.memory import check_fits
    from lowbit.pipeline import quantize

    recipe = _recipe_from_args(args)
    if args.format != "lowbit":
        from lowbit.cli.quantize_gguf import cmd_quantize_gguf

        return cmd_quantize_gguf(args, recipe)
    if comm is not None and recipe.budget is not None:
        raise ConfigError("a size budget (--target-bpw / --target-size) is not run distributed: its search runs "
                          "the whole model many times over in one process; leave out --workers / torchrun")
    if args.stream:
        from lowbit.cli.quantize_stream import cmd_quantize_streamed

        return cmd_quantize_streamed(args, recipe, comm)
    _check_eval_flags(args)
    out = _check_inputs(args, recipe, comm is None or comm.lead)
    dtype = resolve_dtype(args.dtype)
    loaded, names, est = _load_and_check(args, recipe, dtype)
    _say(f"recipe: {recipe.describe()}; {len(names)} linear layers")
    _say(f"estimate: model {_mb(est['model_bytes'])}, calibration activations {_mb(est['calib_bytes'])}, "
         f"Hessians {_mb(est['hessian_bytes'])}, peak memory {_mb(est['peak_bytes'])}; "
         f"roughly {est['seconds'] / 60:.1f} min on a 2-core CPU")
    check_fits(est["peak_bytes"], f"quantizing {args.model}" + (" and evaluating it" if args.eval else ""),
               memory_options(args, recipe, dtype, est.get("stream_peak_bytes")))
    result = quantize(loaded, recipe, data_dir=args.data_dir, progress=not args.quiet, comm=comm)
    if comm is not None:
        if not comm.lead:
            return 0  # rank 0 writes the checkpoint
        _say(workers.traffic_line(comm))
    size = result.size
    _say(f"quantized in {result.seconds:.1f}s; {size.bits_per_weight:.3f} bits/weight, model {_mb(size.model_bytes)}")
    if result.budget is not None:
        _say(result.budget.summary())

    path = _save(args, result, out)  # saved before evaluating, so a failing evaluation costs only the evaluation
    evals = _evaluate_saved(args, result, recipe, dtype, loaded, path) if args.eval else []
    if result.fallbacks and not args.allow_fallback:
        _say(f"lowbit: {result.fallback_summary()}; the checkpoint is saved, but it is not what the recipe asked "
             "for: check the weights and calibration data, or pass --allow-fallback to accept it (exit 0)")
        return 1
    if evals and evals[-1].non_finite:
        _say(f"lowbit: the evaluation of {path} is not finite: the checkpoint does not compute a usable model")
        return 1
    return 0


def _check_eval_flags(args) -> None:
    """--max-tokens and --seqlen against each other, with --eval."""
    if not args.eval:
        return
    if args.max_tokens is not None and args.max_tokens <= 0:
        raise ConfigError(f"--max-tokens {args.max_tokens}: evaluation needs at least one window of tokens; "
                          "give a positive count or leave --max-tokens out to use all the text")
    if args.seqlen is not None and args.seqlen < 2:
        raise ConfigError(f"--seqlen {args.seqlen}: a window needs at least 2 tokens (a context and a target)")
    if args.max_tokens is not None and args.seqlen is not None and args.max_tokens < args.seqlen:
        raise ConfigError(f"--max-tokens {args.max_tokens} is less than one evaluation window (--seqlen "
                          f"{args.seqlen}); raise --max-tokens or lower --seqlen")


def _check_inputs(args, recipe, writes: bool = True) -> Path:
    """The output folder (checked against the input model and --force, by the process that
    `writes` it), and the calibration and evaluation data, present: fail on those now, not after
    minutes of work."""
    from lowbit.data import calibration_documents, eval_text
    from lowbit.outputs import check_output

    out = check_output(args.output, args.force, input_paths(args)) if writes else Path(args.output)
    if recipe.needs_calibration:
        calibration_documents(recipe.calibration.dataset, args.data_dir)
    for ds in args.eval or ():
        eval_text(ds, args.data_dir)
    return out


def input_paths(args) -> list[Path]:
    """The input model's file or folder, which -o may never be or hold."""
    from lowbit.models import KNOWN_MODELS, known_model_path

    if args.model in KNOWN_MODELS:
        return [known_model_path(args.model, args.cache)]
    return [Path(args.model).expanduser()] if Path(args.model).expanduser().exists() else []


def _load_and_check(args, recipe, dtype):
    """The loaded model, the names of the layers to quantize, and the job's estimate, after the
    checks that need the model: a tied head, layer shapes and groups, enough tokens to evaluate."""
    from lowbit.cli.checks import check_layer_groups
    from lowbit.data import eval_tokens
    from lowbit.eval.perplexity import default_seqlen
    from lowbit.memory import rss_bytes
    from lowbit.models import load_model
    from lowbit.pipeline import (
        check_shapes,
        estimate,
        output_head,
        target_layers,
        with_head,
    )

    _say(f"loading {args.model} ({dtype}) ...")
    baseline = rss_bytes()  # the process before the model: torch, transformers, lowbit
    loaded = load_model(args.model, dtype=dtype, cache=args.cache)
    if recipe.head_bits:
        output_head(loaded.model)  # a tied head is refused now, not after quantizing
    recipe = with_head(loaded.model, recipe)  # an absent --head-bits: 8 bits where the head is untied
    names, _ = target_layers(loaded.model, recipe)
    check_shapes(loaded.model, names, recipe)
    check_layer_groups(loaded.model, names, recipe)
    if args.eval:
        seqlen = args.seqlen or default_seqlen(loaded.model)
        for ds in args.eval:
            n = eval_tokens(loaded.tokenizer, ds, args.max_tokens, args.data_dir).shape[1]
            if n < seqlen:
                raise ConfigError(f"--eval {ds}: {n} tokens to evaluate, fewer than one window of {seqlen}; "
                                  + ("raise --max-tokens or " if args.max_tokens is not None else "give more text or ")
                                  + "lower --seqlen")
    eval_seqlen = (args.seqlen or default_seqlen(loaded.model)) if args.eval else None
    est = estimate(loaded.model, recipe, baseline_bytes=baseline, eval_seqlen=eval_seqlen)
    est["stream_peak_bytes"] = estimate(loaded.model, recipe, baseline_bytes=baseline, stream=True)["peak_bytes"]
    return loaded, names, est


def _save(args, result, out: Path) -> Path:
    """The checkpoint saved at `out`; if the output changed while we worked (it was checked
    before), saved beside it instead and refused naming where, so the work is kept."""
    from lowbit.pipeline import save

    try:
        path = save(result, out, overwrite=args.force)
    except ConfigError as e:
        import os

        aside = out.with_name(f"{out.name}.lowbit-{os.getpid()}")
        save(result, aside)
        raise ConfigError(f"{e}; the new checkpoint was saved as {aside} instead: move it where you want it") from None
    from lowbit.checkpoint import Manifest

    stats = Manifest.read(path).stats
    _say(f"saved {path}: model {_mb(stats.model_bytes)} at 16 bits, {_mb(stats.disk_bytes)} on disk "
         f"(report: {path / 'REPORT.md'})")
    return path


def _evaluate_saved(args, result, recipe, dtype, loaded, path: Path) -> list:
    """--eval: the reference and the saved checkpoint's results, recorded in its manifest and
    printed; a failure says the checkpoint is saved and how to evaluate it later."""
    from lowbit.eval.evaluate import (
        REFERENCE_NOTE,
        evaluate,
        format_table,
        reference_result,
    )
    from lowbit.eval.report import record_evaluation
    from lowbit.models import load_model

    try:
        ref = load_model(args.model, dtype=dtype, cache=args.cache)
        cand = evaluate(result, args.eval, recipe.describe(), args.max_tokens, args.seqlen, ref, args.data_dir,
                        not args.quiet)
        evals = [reference_result(cand, ref.model), cand]
        record_evaluation(path, evals)
    except LowbitError as e:
        raise type(e)(f"evaluation failed: {e}. The checkpoint was saved at {path} before evaluating; "
                      f"evaluate it with `lowbit eval {path}`") from None
    except BaseException:
        _say(f"lowbit: evaluation stopped; the checkpoint was saved at {path} before evaluating")
        raise
    print(format_table(evals))
    for note in cand.notes:
        print(f"\nNote: {note}")
    if loaded.source.kind in ("known", "gguf"):
        print(f"\nNote: {REFERENCE_NOTE}")
    return evals


def memory_options(args, recipe, dtype, stream_peak: float | None = None) -> list[str]:
    """What would make a quantize job need less memory, for the message that refuses it;
    `stream_peak`: the estimated peak of the same job with --stream, when it is not streamed."""
    options = []
    if stream_peak is not None and recipe.budget is None:
        options.append(f"--stream (one block in memory at a time: about {stream_peak / 1e9:.2f} GB at its peak; "
                       "evaluate afterwards with `lowbit eval`)")
    if args.eval:
        options.append("evaluate later with `lowbit eval` (drop --eval) or a shorter --seqlen")
    if recipe.needs_calibration:
        c = recipe.calibration
        options.append(f"fewer or shorter calibration samples (--calib-samples, now {c.n_samples}; "
                       f"--calib-seqlen, now {c.seqlen})")
        if c.dtype == "float32":
            options.append("--calib-dtype bfloat16 (the calibration forward passes' activations in bfloat16)")
    if dtype == torch.float32:
        options.append("--dtype bf16 (half the model's memory; its weights are rounded to bf16 first)")
    options.append("a machine or container with more memory")
    return options
