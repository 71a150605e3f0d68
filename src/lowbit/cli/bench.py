"""`lowbit bench accuracy | kv | speed`: the benchmarks that write BENCHMARKS.md. Their flags live
here and become each bench's options dataclass (AccuracyBenchOptions, KVBenchOptions,
SpeedBenchOptions); the runs live in lowbit.bench and never see argparse."""

from __future__ import annotations

import argparse

from lowbit.cli.common import common_arguments


def register(sub) -> None:
    b = sub.add_parser("bench", help="benchmarks that write BENCHMARKS.md")
    bsub = b.add_subparsers(dest="bench", required=True)
    ba = bsub.add_parser("accuracy", help="reference vs RTN / GPTQ / peers at several bit widths")
    _accuracy_arguments(ba)
    common_arguments(ba)
    ba.set_defaults(func=cmd_bench)
    bk = bsub.add_parser("kv", help="compressed KV caches side by side: perplexity, needle, LAMBADA, bytes held")
    _kv_arguments(bk)
    common_arguments(bk)
    bk.set_defaults(func=cmd_bench_kv)
    bs = bsub.add_parser("speed", help="checkpoints packed vs the bf16 model vs llama.cpp: load, prefill, decode, "
                                       "fraction of read bandwidth")
    _speed_arguments(bs)
    common_arguments(bs, data=False)
    bs.set_defaults(func=cmd_bench_speed)


# ---------------------------------------------------------------- accuracy
def _accuracy_arguments(p: argparse.ArgumentParser) -> None:
    from lowbit.bench.accuracy_jobs import DEFAULT_METHODS, DEFAULT_SETTINGS, SUITES
    from lowbit.recipes import CALIB_DTYPES

    p.add_argument("models", nargs="*", default=["smollm2-135m"], help="models to benchmark")
    p.add_argument("--settings", default=",".join(DEFAULT_SETTINGS), help="comma list of w<bits>g<group>")
    p.add_argument("--methods", default=",".join(DEFAULT_METHODS), help="comma list of methods (see --jobs)")
    p.add_argument("--jobs", help="comma list of METHOD:SETTING, e.g. gptq:w3g128,slim:w2.5g128,llamacpp:Q2_K "
                   "(replaces --methods x --settings)")
    p.add_argument("--suite", choices=sorted(SUITES), help="a predefined job list: 'methods' compares the weight "
                   "methods and peers at about 4, 3, 2.5 and 2 bits per weight")
    p.add_argument("--budget-generations", type=int, default=10, help="evolutionary search steps of budget jobs")
    p.add_argument("--render-only", action="store_true", help="rewrite the section and plots from the results "
                   "already in the work folder; run nothing")
    p.add_argument("--data", default="wikitext2,c4", help="comma list of evaluation datasets")
    p.add_argument("--max-tokens", type=int, default=8192, help="evaluation tokens per dataset")
    p.add_argument("--seqlen", type=int, default=2048, help="evaluation window")
    p.add_argument("--calib-samples", type=int, default=128)
    p.add_argument("--calib-seqlen", type=int, default=512)
    p.add_argument("--calib-dtype", choices=CALIB_DTYPES, default="float32",
                   help="dtype of the calibration forwards (bfloat16: autocast, several times faster on CPUs with "
                        "native bf16; weights and Hessians stay float32); a separate row from float32 results")
    p.add_argument("--llama-perplexity", action="store_true", help="also measure every GGUF row (llamacpp, "
                   "llamacpp-imatrix, gguf, gguf-<method>) with llama.cpp's llama-perplexity --kl-divergence "
                   "against the reference's float32 GGUF (builds llama.cpp's tools once)")
    p.add_argument("--work-dir", default="benchmarks/results", help="reference caches and raw JSON results (the "
                   "JSON is kept in git there; the caches are ignored)")
    p.add_argument("--output", default="BENCHMARKS.md", help="markdown file whose accuracy section is rewritten")
    p.add_argument("--section", default="accuracy", help="the section of --output to rewrite (another name, e.g. "
                   "gguf, keeps a second set of results beside the accuracy tables: give it its own --work-dir)")


def accuracy_options(args: argparse.Namespace):
    """`lowbit bench accuracy`'s flags -> AccuracyBenchOptions."""
    from lowbit.bench.accuracy import AccuracyBenchOptions

    return AccuracyBenchOptions(
        models=tuple(args.models), settings=args.settings, methods=args.methods, jobs=args.jobs, suite=args.suite,
        budget_generations=args.budget_generations, render_only=args.render_only, data=args.data,
        max_tokens=args.max_tokens, seqlen=args.seqlen, calib_samples=args.calib_samples,
        calib_seqlen=args.calib_seqlen, calib_dtype=args.calib_dtype, llama_perplexity=args.llama_perplexity,
        work_dir=args.work_dir, output=args.output, section=args.section,
        cache=args.cache, data_dir=args.data_dir, quiet=args.quiet)


# ---------------------------------------------------------------- kv
def _kv_arguments(p: argparse.ArgumentParser) -> None:
    from lowbit.bench.kv import DEFAULT_CACHES
    from lowbit.dtypes import add_dtype_argument

    p.add_argument("model")
    p.add_argument("--caches", default=DEFAULT_CACHES, help=f"comma list of caches (default {DEFAULT_CACHES})")
    p.add_argument("--data", default="wikitext2", help="perplexity text")
    p.add_argument("--max-tokens", type=int, default=4096, help="perplexity tokens (0: skip perplexity)")
    p.add_argument("--seqlen", type=int, default=2048)
    p.add_argument("--chunk", type=int, default=128, help="tokens per forward in the perplexity loop")
    p.add_argument("--needle-lengths", default="2048,4096", help="prompt lengths in tokens (comma list; empty: skip)")
    p.add_argument("--needle-depths", default="0.1,0.5,0.9")
    p.add_argument("--needle-per-cell", type=int, default=2)
    p.add_argument("--needle-filler", default="wikitext2", help="corpus the filler text is cut from")
    p.add_argument("--lambada", type=int, default=200, help="LAMBADA passages (0: skip)")
    add_dtype_argument(p, "float32", "the model's dtype (float32 by default, as the recorded results were "
                       "measured; results are keyed by the dtype that ran, auto resolved)")
    p.add_argument("--work-dir", default="benchmarks/results")
    p.add_argument("--output", default="BENCHMARKS.md")
    p.add_argument("--section", default="kv",
                   help="BENCHMARKS.md section (and plot suffix) to write; a second name keeps another run's table beside")
    p.add_argument("--render-only", action="store_true", help="rewrite the section from finished results")


def kv_options(args: argparse.Namespace):
    """`lowbit bench kv`'s flags -> KVBenchOptions, every --caches name parsed (ConfigError naming a
    bad one before anything loads)."""
    from lowbit.bench.kv import KVBenchOptions, parse_caches

    return KVBenchOptions(
        model=args.model, caches=parse_caches(args.caches), data=args.data, max_tokens=args.max_tokens,
        seqlen=args.seqlen, chunk=args.chunk, needle_lengths=args.needle_lengths, needle_depths=args.needle_depths,
        needle_per_cell=args.needle_per_cell, needle_filler=args.needle_filler, lambada=args.lambada,
        dtype=args.dtype, work_dir=args.work_dir, output=args.output, section=args.section,
        render_only=args.render_only, cache=args.cache, data_dir=args.data_dir, quiet=args.quiet)


# ---------------------------------------------------------------- speed
def _speed_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoints", nargs="+", help="lowbit checkpoint folders (of one source model); CKPT@int8 runs "
                   "that one with int8 activations (W8A8: 8-bit per-channel symmetric checkpoints); a .gguf file runs "
                   "in llama.cpp's llama-bench, side by side with the others")
    p.add_argument("--prompt-tokens", type=int, default=512, help="prompt length for prefill / time to first token")
    p.add_argument("--new-tokens", type=int, default=64, help="tokens decoded greedily after the prompt")
    p.add_argument("--repeats", type=int, default=3, help="rounds; the table gives medians")
    p.add_argument("--threads", type=int, default=None, help="threads for every runtime (default: all cores)")
    p.add_argument("--no-llamacpp", action="store_true", help="skip llama.cpp (else it is built once, minutes)")
    p.add_argument("--no-bf16", action="store_true", help="skip the unquantized bfloat16 model")
    p.add_argument("--no-kernels", action="store_true", help="skip the matrix-vector kernel table")
    p.add_argument("--work-dir", default="benchmarks/results")
    p.add_argument("--output", default="BENCHMARKS.md")
    p.add_argument("--section", default="speed", help="BENCHMARKS.md section to write")


def speed_options(args: argparse.Namespace):
    """`lowbit bench speed`'s flags -> SpeedBenchOptions."""
    from lowbit.bench.speed import SpeedBenchOptions

    return SpeedBenchOptions(
        checkpoints=tuple(args.checkpoints), prompt_tokens=args.prompt_tokens, new_tokens=args.new_tokens,
        repeats=args.repeats, threads=args.threads, no_llamacpp=args.no_llamacpp, no_bf16=args.no_bf16,
        no_kernels=args.no_kernels, work_dir=args.work_dir, output=args.output, section=args.section,
        cache=args.cache)


# ---------------------------------------------------------------- commands
def cmd_bench(args: argparse.Namespace) -> int:
    from lowbit.bench.accuracy import run_accuracy_bench

    run_accuracy_bench(accuracy_options(args))
    return 0


def cmd_bench_speed(args: argparse.Namespace) -> int:
    from lowbit.bench.speed import run_speed_bench

    run_speed_bench(speed_options(args))
    return 0


def cmd_bench_kv(args: argparse.Namespace) -> int:
    from lowbit.bench.kv import run_kv_bench

    run_kv_bench(kv_options(args))
    return 0
