"""`lowbit quantize ... --stream [--resume]`: quantize one decoder block in memory at a time
(lowbit.streaming), writing each finished block to -o as it goes; --resume continues an
interrupted run of the same command."""

from __future__ import annotations

import shlex

from lowbit.cli.common import _mb, _say
from lowbit.cli.workers import traffic_line
from lowbit.dtypes import resolve_dtype


def run_again(args) -> str:
    """The command line that started this run, without --resume and --force: what to run again,
    with --resume, to continue it."""
    argv = [a for a in getattr(args, "argv", []) if a not in ("--resume", "--force")]
    return shlex.join(["lowbit", *argv]) if argv else "lowbit quantize ... --stream"


def cmd_quantize_streamed(args, recipe, comm=None) -> int:
    """The streamed job; with `comm` (cli/workers.py) one rank of several, rank 0 owning -o."""
    from lowbit.cli.checks import check_layer_groups
    from lowbit.cli.quantize import input_paths, memory_options
    from lowbit.data import calibration_documents
    from lowbit.memory import check_fits, rss_bytes
    from lowbit.models.skeleton import load_skeleton
    from lowbit.pipeline import (
        check_shapes,
        estimate,
        output_head,
        target_layers,
        with_head,
    )
    from lowbit.streaming import check_stream_output, quantize_streamed

    if comm is None or comm.lead:
        check_stream_output(args.output, args.resume, args.force, input_paths(args))
    if recipe.needs_calibration:
        calibration_documents(recipe.calibration.dataset, args.data_dir)
    dtype = resolve_dtype(args.dtype)
    _say(f"reading {args.model}'s layout ({dtype}); its weights are read one block at a time ...")
    baseline = rss_bytes()
    sk = load_skeleton(args.model, dtype=dtype, cache=args.cache, progress=not args.quiet)
    if recipe.head_bits:
        output_head(sk.model)  # a tied head is refused now, not after quantizing
    full = with_head(sk.model, recipe)
    names, _ = target_layers(sk.model, full)
    check_shapes(sk.model, names, full)
    check_layer_groups(sk.model, names, full)
    est = estimate(sk.model, full, baseline_bytes=baseline, stream=True)
    _say(f"recipe: {full.describe()}; {len(names)} linear layers, streamed block by block")
    _say(f"estimate: model {_mb(est['model_bytes'])} (one block in memory at a time), calibration activations "
         f"{_mb(est['calib_bytes'])}, peak memory {_mb(est['peak_bytes'])}; roughly {est['seconds'] / 60:.1f} min "
         "on a 2-core CPU")
    check_fits(est["peak_bytes"], f"quantizing {args.model} streamed", memory_options(args, full, dtype))
    result = quantize_streamed(sk, recipe, args.output, dtype=dtype, data_dir=args.data_dir, cache=args.cache,
                               resume=args.resume, force=args.force, progress=not args.quiet,
                               command=run_again(args), comm=comm)
    if result is None:
        return 0  # a rank but 0: rank 0 writes and reports
    if comm is not None:
        _say(traffic_line(comm))
    if result.resumed_blocks:
        _say(f"resumed after {result.resumed_blocks} finished blocks")
    size = result.size
    _say(f"quantized in {result.seconds:.1f}s, peak memory {_mb(result.peak_rss_bytes)}; "
         f"{size.bits_per_weight:.3f} bits/weight, model {_mb(size.model_bytes)}")
    _say(f"saved {result.path} (report: {result.path / 'REPORT.md'}); evaluate it with `lowbit eval {result.path}`")
    if result.fallbacks and not args.allow_fallback:
        _say(f"lowbit: {len(result.fallbacks)} layers fell back to round-to-nearest (the report lists them); the "
             "checkpoint is saved, but it is not what the recipe asked for: pass --allow-fallback to accept it")
        return 1
    return 0
