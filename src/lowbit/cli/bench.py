"""`lowbit bench accuracy | kv | speed`: the benchmarks that write BENCHMARKS.md (their flags and
runs live in lowbit.bench)."""

from __future__ import annotations

from lowbit.cli.common import common_arguments


def register(sub) -> None:
    b = sub.add_parser("bench", help="benchmarks that write BENCHMARKS.md")
    bsub = b.add_subparsers(dest="bench", required=True)
    ba = bsub.add_parser("accuracy", help="reference vs RTN / GPTQ / peers at several bit widths")
    from lowbit.bench.accuracy import add_arguments

    add_arguments(ba)
    common_arguments(ba)
    ba.set_defaults(func=cmd_bench)
    bk = bsub.add_parser("kv", help="compressed KV caches side by side: perplexity, needle, LAMBADA, bytes held")
    from lowbit.bench.kv import add_arguments as add_kv_arguments

    add_kv_arguments(bk)
    common_arguments(bk)
    bk.set_defaults(func=cmd_bench_kv)
    bs = bsub.add_parser("speed", help="checkpoints packed vs the bf16 model vs llama.cpp: load, prefill, decode, "
                                       "fraction of read bandwidth")
    from lowbit.bench.speed import add_arguments as add_speed_arguments

    add_speed_arguments(bs)
    common_arguments(bs, data=False)
    bs.set_defaults(func=cmd_bench_speed)


def cmd_bench(args) -> int:
    from lowbit.bench.accuracy import run_accuracy_bench

    run_accuracy_bench(args)
    return 0


def cmd_bench_speed(args) -> int:
    from lowbit.bench.speed import run_speed_bench

    run_speed_bench(args)
    return 0


def cmd_bench_kv(args) -> int:
    from lowbit.bench.kv import run_kv_bench

    run_kv_bench(args)
    return 0
