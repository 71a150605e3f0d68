"""`lowbit quantize` on several processes: `--workers M` launches M local ranks through
torch.distributed's elastic launcher (what torchrun runs), and every rank, whoever launched it,
joins the job here (calibration/distributed.py).

    lowbit quantize smollm2-135m --method gptq --bits 4 -o out/smol --workers 2
    torchrun --nnodes 2 --node-rank 0 --nproc-per-node 2 --master-addr HOST --master-port 29500 \\
        -m lowbit quantize smollm2-135m --method gptq --bits 4 -o out/smol

Rank 0 checks and writes the output and prints; the other ranks run quietly. A rank that stops
because another failed exits with code 3, so the launcher can tell the rank that failed first.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import signal
import sys
import uuid
from collections.abc import Iterator

from lowbit.errors import ConfigError, DistributedError

STOPPED_FOR_ANOTHER = 3  # the exit code of a rank that stopped because another rank failed


def add_arguments(q) -> None:
    q.add_argument("--workers", type=int, metavar="M", help="run the job on M local processes (torch.distributed, "
                   "gloo; the threads shared out: each gets total / M): the calibration samples and the layer "
                   "solves are split over them. Across machines, start every rank with torchrun instead "
                   "(README: Several processes and machines)")
    q.add_argument("--parallel", choices=("data", "layers"), default="data",
                   help="with several processes: 'data' (default) splits the calibration batches and the layer "
                   "solves (the checkpoint differs from one process's by float summation order, which GPTQ "
                   "amplifies as it does a change of thread count); 'layers' runs every sample on every rank and splits only the solves (the "
                   "checkpoint is one process's bit for bit)")


def in_distributed_env() -> bool:
    return int(os.environ.get("WORLD_SIZE") or 1) > 1


def check_workers(args) -> None:
    """--workers against the environment and the other flags."""
    if args.workers is not None and args.workers < 1:
        raise ConfigError(f"--workers {args.workers}: give a number of processes, 1 or more")
    if args.workers and args.workers > 1 and in_distributed_env():
        raise ConfigError("--workers starts its own processes, but this one is already a rank of a torchrun job: "
                          "leave --workers out (torchrun's --nproc-per-node says how many)")
    if ((args.workers and args.workers > 1) or in_distributed_env()) and args.format != "lowbit":
        raise ConfigError(f"--format {args.format} is not run distributed; leave out --workers / torchrun")


def launch_workers(args) -> int:
    """Run this command on args.workers local ranks (elastic launch, as torchrun does), the
    threads shared out; a rank's failure is a DistributedError naming it and saying what to do."""
    import torch
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    m = args.workers
    threads = max(1, torch.get_num_threads() // m)
    os.environ["OMP_NUM_THREADS"] = str(threads)
    argv = _without_workers(args.argv)
    config = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=m, run_id=str(uuid.uuid4()), rdzv_backend="c10d",
                          rdzv_endpoint="localhost:0", max_restarts=0, monitor_interval=0.1)
    if not args.quiet:
        print(f"lowbit: {m} processes of {threads} thread{'s' * (threads > 1)} each", file=sys.stderr, flush=True)
    logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)
    try:
        elastic_launch(config, sys.executable)("-u", "-m", "lowbit", *argv)
    except ChildFailedError as e:
        raise DistributedError(_failure_message(e, m, args)) from None
    return 0


def _without_workers(argv: list[str]) -> list[str]:
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == "--workers":
            skip = True
        elif not a.startswith("--workers="):
            out.append(a)
    return out


def _failure_message(e, m: int, args) -> str:
    """The rank that failed first (not one that stopped for another) and what to do."""
    failures = sorted(e.failures.items(), key=lambda kv: kv[1].timestamp)
    first = [(r, f) for r, f in failures if f.exitcode != STOPPED_FOR_ANOTHER] or failures
    rank, f = first[0]
    if f.exitcode == -signal.SIGTERM:  # still exiting after its failure when the launcher stopped the job
        how = "failed (it was still exiting when the launcher stopped the job; its `lowbit:` line above says why)"
    elif f.exitcode < 0:
        try:
            how = f"was killed by {signal.Signals(-f.exitcode).name}"
        except ValueError:
            how = f"was killed by signal {-f.exitcode}"
    else:
        how = f"failed (exit code {f.exitcode}; its `lowbit:` line above says why)"
    if args.stream:
        todo = (f"-o {args.output} keeps the blocks finished before it and is marked unfinished: run the same "
                "command with --resume to go on")
    else:
        todo = f"nothing was written to -o {args.output}: run the command again"
    return f"rank {rank} of {m} {how}; the other ranks were stopped. {todo}"


@contextlib.contextmanager
def joined(args) -> Iterator:
    """This process's Communicator when it is one rank of several (else None) for the length of
    the command: the ranks but 0 quiet, a failure recorded for the others to name, and the job
    left at the end."""
    from lowbit.calibration.distributed import join_from_env

    comm = join_from_env(data_parallel=args.parallel == "data")
    if comm is None:
        yield None
        return
    quiet = contextlib.ExitStack()
    if not comm.lead:
        args.quiet = True
        quiet.enter_context(contextlib.redirect_stdout(io.StringIO()))
        quiet.enter_context(contextlib.redirect_stderr(io.StringIO()))
    try:
        with quiet:
            yield comm
    except BaseException as e:
        comm.fail(e)
        raise
    finally:
        comm.close()


def traffic_line(comm) -> str:
    """What rank 0 received in the collectives, for its report."""
    kinds = ", ".join(f"{k} {v / 1e6:.1f} MB" for k, v in sorted(comm.received.items()))
    mode = "data + layer parallel" if comm.data_parallel else "layer parallel"
    return (f"distributed: {comm.world_size} ranks, {mode}; rank 0 received {sum(comm.received.values()) / 1e6:.1f} MB "
            f"in {comm.n_collectives} collectives ({kinds or 'none'})")
