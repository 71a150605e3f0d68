"""torch.distributed for a quantize job: which rank runs which calibration batches, and the few
collectives that join the ranks (`lowbit quantize --workers M`, or torchrun).

    comm = join_from_env()                    # None in one process: the single-process path, untouched
    ids = comm.shard(ids, batch_size=8)       # this rank's contiguous run of whole batches
    comm.combine_hessians(accs, block=3)      # every rank's partial sums, added in rank order
    record = comm.broadcast_object(record, src=1)  # a layer solved on rank 1, to every rank

Data parallel calibration: each rank runs its shard of the calibration batches (the very batches of
`batch_size` samples one process runs, so no sample's forward pass changes) through the block; the
Hessians' unscaled sums, AWQ's input statistics and the token counts are then combined so that
every rank holds bitwise the same numbers: each sum is cut in one chunk per rank, rank r adds
chunk r of every rank's partial sum in rank order (all_to_all), and the sums are all-gathered.
gloo's all_reduce adds in an order it does not specify; this order is fixed, and each rank
receives 2 (W - 1) / W of a Hessian per group whatever the number of ranks W.
H then differs from one process's only by the order of the float32 additions (one process adds
batch after batch; here each rank adds its own batches, then the ranks' sums are added). GPTQ
amplifies such last-bit changes on a deep model as it does a change of thread count
(benchmarks/results/distributed_scaling.md). `data_parallel=False` runs every batch on every
rank: H is one process's, bit for bit.

Layer parallel solves (blockwise.LayerQuantizer.quantize_all): the layers of a group are solved
round-robin over the ranks and each record broadcast from its rank; a solve depends on (W, H)
alone, so that part is one process's bit for bit.

Failures: a collective waits in a loop that looks at the other ranks every second through the
job's TCP store (torchrun's, or rank 0's): each rank records where it is, beats a counter from a
thread, and writes its error there when it fails. A rank that failed, whose process is gone, or
whose heartbeat stopped for STALE_S seconds is named in the DistributedError the others raise.
"""

from __future__ import annotations

import io
import os
import signal
import socket
import threading
import time
from collections.abc import Mapping
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from lowbit.calibration.activations import InputRecorder
from lowbit.calibration.hessian import HessianAccumulator
from lowbit.errors import ConfigError, DistributedError

COLLECTIVE_TIMEOUT_S = 3600.0  # the longest a rank waits for the others in one collective (a slow solve)
BEAT_S = 0.5                   # a rank's heartbeat period
STALE_S = 30.0                 # a rank whose heartbeat stopped this long is taken for gone
_CHECK_S = 1.0                 # how often a waiting collective looks at the other ranks


def shard_range(n_samples: int, batch_size: int, rank: int, world_size: int) -> tuple[int, int]:
    """Rank `rank`'s samples [start, stop): a contiguous run of whole batches of `batch_size`,
    the batches split as evenly as they go over `world_size` ranks."""
    n_batches = -(-n_samples // batch_size)
    lo, hi = rank * n_batches // world_size, (rank + 1) * n_batches // world_size
    return min(lo * batch_size, n_samples), min(hi * batch_size, n_samples)


def join_from_env(data_parallel: bool = True, timeout_s: float = COLLECTIVE_TIMEOUT_S) -> Communicator | None:
    """The communicator of this process when torchrun (or `--workers`) started it as one rank of
    several (WORLD_SIZE > 1, with RANK, MASTER_ADDR and MASTER_PORT); None for one process.
    gloo on CPUs, NCCL where CUDA is (the collectives then move their tensors to the GPU)."""
    world = int(os.environ.get("WORLD_SIZE") or 1)
    if world <= 1:
        return None
    missing = [k for k in ("RANK", "MASTER_ADDR", "MASTER_PORT") if not os.environ.get(k)]
    if missing:
        raise ConfigError(f"WORLD_SIZE={world} but {', '.join(missing)} unset: start the ranks with torchrun "
                          "(or `lowbit quantize --workers M`), which sets them")
    rank = int(os.environ["RANK"])
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    try:
        dist.init_process_group("nccl" if cuda else "gloo", init_method="env://",
                                timeout=timedelta(seconds=timeout_s))
        store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False,
                              timeout=timedelta(seconds=60))
    except (RuntimeError, ValueError) as e:
        raise DistributedError(f"rank {rank} of {world} could not join the job at {os.environ['MASTER_ADDR']}:"
                               f"{os.environ['MASTER_PORT']} ({str(e).strip().splitlines()[0]}); check that every "
                               "node runs the same torchrun command with the same --master-addr and "
                               "--master-port, and that the port is open") from None
    device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    return Communicator(rank, world, data_parallel, store, device, timeout_s,
                        run=os.environ.get("TORCHELASTIC_RUN_ID", os.environ["MASTER_PORT"]))


class Communicator:
    """One rank's view of the job: its place, the collectives (each counted in `received`:
    bytes this rank received, by kind), and the watch over the other ranks."""

    def __init__(self, rank: int, world_size: int, data_parallel: bool = True, store=None,
                 device: torch.device | None = None, timeout_s: float = COLLECTIVE_TIMEOUT_S, run: str = ""):
        self.rank, self.world_size, self.data_parallel = rank, world_size, data_parallel
        self.device = device or torch.device("cpu")
        self.timeout_s = timeout_s
        self.token_offset = 0          # tokens of the samples before this rank's shard (shard sets it)
        self.received: dict[str, int] = {}
        self.n_collectives = 0
        self._store, self._prefix = store, f"lowbit/{run}/"
        self._where = "starting"
        self._beats: dict[int, tuple[int, float]] = {}  # rank -> (last counter seen, when it changed)
        self._stop = threading.Event()
        self._sigterm = None
        self._failed = False
        if store is not None:
            self._set(f"who/{rank}", f"{socket.gethostname()} {os.getpid()}")
            threading.Thread(target=self._beat, name="lowbit-heartbeat", daemon=True).start()
            if threading.current_thread() is threading.main_thread():
                self._sigterm = signal.signal(signal.SIGTERM, self._on_sigterm)

    @property
    def lead(self) -> bool:
        """Rank 0: the one that writes the output and prints the report."""
        return self.rank == 0

    # ------------------------------------------------------------------ what each rank runs
    def shard(self, ids: torch.Tensor, batch_size: int) -> torch.Tensor:
        """This rank's calibration samples ids [n, seqlen] -> [n_rank, seqlen] (all of them when
        not data parallel). Refuses a shard without a whole batch."""
        if not self.data_parallel:
            return ids
        n = ids.shape[0]
        start, stop = shard_range(n, batch_size, self.rank, self.world_size)
        if stop <= start:
            n_batches = -(-n // batch_size)
            raise ConfigError(f"{n} calibration samples make {n_batches} batches of {batch_size}, fewer than the "
                              f"{self.world_size} ranks: give at least {self.world_size * batch_size} samples "
                              "(--calib-samples), use fewer processes, or --parallel layers (every rank runs "
                              "every sample; only the solves are shared)")
        self.token_offset = start * ids.shape[1]
        return ids[start:stop]

    # ------------------------------------------------------------------ combining statistics
    def combine_hessians(self, accs: Mapping[str, HessianAccumulator], block: int) -> None:
        """Every rank's partial Hessians of block `block`'s groups, summed in rank order (data parallel)."""
        if not self.data_parallel:
            return
        for name, acc in accs.items():
            total, n_tokens = acc.partial_sum()
            where = f"block {block}: the Hessian of {name}"
            acc.set_partial_sum(self.sum_in_rank_order(total, where), self.sum_ints(n_tokens, where))

    def combine_inputs(self, recs: Mapping[str, InputRecorder], block: int | str) -> None:
        """AWQ's input statistics of block `block`: |x| sums in rank order, the token samples joined
        in rank order (each rank sampled at the stride one process uses: InputRecorder.offset)."""
        if not self.data_parallel:
            return
        for name, rec in recs.items():
            where = f"block {block}: the input statistics of {name}"
            sample = torch.cat(self.gather_rows(rec.sample, where), 0)
            rec.set_totals(self.sum_in_rank_order(rec.abs_sum, where), self.sum_ints(rec.n_tokens, where), sample)

    # ------------------------------------------------------------------ collectives
    def sum_in_rank_order(self, t: torch.Tensor, where: str) -> torch.Tensor:
        """sum over ranks of `t`, each element added in rank order on one rank (all_to_all of one
        chunk per rank), then all-gathered: bitwise the same result on every rank."""
        w = self.world_size
        flat = t.reshape(-1)
        c = -(-flat.numel() // w)
        chunks = torch.zeros(w * c, dtype=t.dtype, device=self.device)
        chunks[: flat.numel()] = flat
        parts = torch.empty_like(chunks)
        self._run(f"{where} (all_to_all)", lambda: dist.all_to_all_single(parts, chunks, async_op=True))
        parts = parts.view(w, c)
        mine = parts[0].clone()
        for r in range(1, w):
            mine += parts[r]
        full = torch.empty(w * c, dtype=t.dtype, device=self.device)
        self._run(f"{where} (all_gather)", lambda: _all_gather_single(full, mine, async_op=True))
        self._count("sums", 2 * (w - 1) * c * t.element_size())
        return full[: flat.numel()].view(t.shape).to(t.device)

    def sum_ints(self, n: int, where: str) -> int:
        got = self._all_gather(torch.tensor([n], dtype=torch.int64, device=self.device), f"{where} (counts)")
        return int(sum(int(g) for g in got))

    def gather_rows(self, t: torch.Tensor, where: str) -> list[torch.Tensor]:
        """Every rank's t [n_r, ...] (n_r may differ), in rank order."""
        sizes = self._all_gather(torch.tensor([t.shape[0]], dtype=torch.int64, device=self.device), f"{where} (sizes)")
        sizes = [int(s) for s in sizes]
        padded = torch.zeros((max(sizes), *t.shape[1:]), dtype=t.dtype, device=self.device)
        padded[: t.shape[0]] = t
        parts = self._all_gather(padded, f"{where} (rows)")
        self._count("statistics", sum(s for r, s in enumerate(sizes) if r != self.rank) * t[0].numel() * t.element_size())
        return [p[:s].to(t.device) for p, s in zip(parts, sizes, strict=True)]

    def broadcast_object(self, obj: Any, src: int, where: str = "a record") -> Any:
        """`obj` (tensors, dataclasses: what torch.save takes) of rank `src`, on every rank."""
        size = torch.zeros(1, dtype=torch.int64, device=self.device)
        payload = None
        if self.rank == src:
            buf = io.BytesIO()
            torch.save(obj, buf)
            payload = torch.frombuffer(bytearray(buf.getvalue()), dtype=torch.uint8).to(self.device)
            size[0] = payload.numel()
        self._run(f"{where} (size)", lambda: dist.broadcast(size, src, async_op=True))
        if payload is None:
            payload = torch.empty(int(size[0]), dtype=torch.uint8, device=self.device)
        self._run(where, lambda: dist.broadcast(payload, src, async_op=True))
        if self.rank == src:
            return obj
        self._count("records", int(size[0]))
        return torch.load(io.BytesIO(payload.cpu().numpy().tobytes()), weights_only=False)

    def _all_gather(self, t: torch.Tensor, where: str) -> list[torch.Tensor]:
        out = torch.empty((self.world_size * t.shape[0], *t.shape[1:]), dtype=t.dtype, device=self.device)
        self._run(where, lambda: _all_gather_single(out, t.contiguous(), async_op=True))
        return list(out.view(self.world_size, *t.shape).unbind(0))

    def _count(self, kind: str, n: int) -> None:
        self.received[kind] = self.received.get(kind, 0) + n

    def _run(self, where: str, start) -> None:
        """Start a collective and wait for it, watching the other ranks (see the module docstring)."""
        self._where = where
        self.n_collectives += 1
        if self._store is not None:
            self._set(f"at/{self.rank}", where)
        try:
            work = start()
            deadline, check, pause = time.monotonic() + self.timeout_s, time.monotonic() + _CHECK_S, 1e-4
            while not work.is_completed():
                now = time.monotonic()
                if now >= check:
                    self._check_others(where)
                    check = now + _CHECK_S
                if now >= deadline:
                    raise DistributedError(f"rank {self.rank} of {self.world_size} waited {self.timeout_s:.0f} s for "
                                           f"the others at {where}; {self._where_others()}")
                time.sleep(pause)
                pause = min(pause * 2, 5e-3)
            work.wait()
        except DistributedError:
            raise
        except RuntimeError as e:  # the backend's error: a peer's connection closed, a timeout
            raise self._diagnosed(where, str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__,
                                  STALE_S + 2 * BEAT_S) from None

    # ------------------------------------------------------------------ watching the others
    def _set(self, key: str, value: str) -> None:
        self._store.set(self._prefix + key, value)

    def _get(self, key: str) -> str | None:
        full = self._prefix + key
        return self._store.get(full).decode() if self._store.check([full]) else None

    def _beat(self) -> None:
        key = self._prefix + f"beat/{self.rank}"
        while not self._stop.is_set():
            try:
                self._store.add(key, 1)
            except RuntimeError:  # the store is gone: the job is ending
                return
            self._stop.wait(BEAT_S)

    def _problem_of(self, r: int) -> str | None:
        """What is wrong with rank r, if anything: it failed, or is gone (a rank that stopped
        because of another is passed over: _check_others names the other)."""
        if self._get(f"done/{r}") is not None or self._get(f"stopped/{r}") is not None:
            return None
        failed = self._get(f"failed/{r}")
        if failed is not None:
            return f"failed: {failed}"
        last = self._get(f"at/{r}") or "joining the job"
        who = (self._get(f"who/{r}") or "").split()
        if len(who) == 2 and who[0] == socket.gethostname() and not _alive(int(who[1])):
            return (f"is gone: its process ({who[1]}) was killed by a signal (kill -9, the out-of-memory killer); "
                    f"its last collective: {last}")
        beat, now = self._store.add(self._prefix + f"beat/{r}", 0), time.monotonic()
        seen = self._beats.get(r)
        if seen is None or seen[0] != beat:
            self._beats[r] = (beat, now)
        elif now - seen[1] > STALE_S:
            return (f"stopped responding: no heartbeat for {now - seen[1]:.0f} s (its process or machine went away); "
                    f"its last collective: {last}")
        return None

    def _check_others(self, where: str) -> None:
        try:
            for r in range(self.world_size):
                if r != self.rank and (problem := self._problem_of(r)) is not None:
                    raise self._stopped_by(r, problem, where)
        except DistributedError:
            raise
        except RuntimeError as e:  # the store itself is gone
            raise DistributedError(f"rank {self.rank} of {self.world_size}: the job's store at "
                                   f"{os.environ.get('MASTER_ADDR')}:{os.environ.get('MASTER_PORT')} went away "
                                   f"({_first_line(e)}) while at {where}: node 0's launcher (torchrun) or rank 0 "
                                   f"stopped; {_WHAT_TO_DO}") from None

    def _diagnosed(self, where: str, what: str, wait_s: float) -> DistributedError:
        """The error to stop with: the rank that failed or went away, looked for up to `wait_s` s."""
        if self._store is not None:
            end = time.monotonic() + wait_s
            while True:
                try:
                    self._check_others(where)
                except DistributedError as e:
                    return e
                if time.monotonic() >= end:
                    break
                time.sleep(BEAT_S)
        return DistributedError(f"rank {self.rank} of {self.world_size} stopped at {where}: {what}; no other rank "
                                f"reported a failure; {_WHAT_TO_DO}")

    def _stopped_by(self, r: int, problem: str, where: str) -> DistributedError:
        return DistributedError(f"rank {r} of {self.world_size} {problem}. Rank {self.rank} stopped at {where}. "
                                f"{_WHAT_TO_DO}")

    def _where_others(self) -> str:
        return "; ".join(f"rank {r} is at {self._get(f'at/{r}')}" for r in range(self.world_size) if r != self.rank)

    def _on_sigterm(self, signum, frame) -> None:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)  # a second SIGTERM ends the process
        raise self._diagnosed(self._where, "its launcher sent SIGTERM (another rank failed, or the job was "
                              "cancelled)", 3.0)

    # ------------------------------------------------------------------ the end
    def fail(self, e: BaseException) -> None:
        """Record that this rank stops on `e`, for the others to name (a DistributedError is about
        another rank, and is recorded as such)."""
        self._failed = True
        if self._store is None:
            return
        key = "stopped" if isinstance(e, DistributedError) else "failed"
        try:
            self._set(f"{key}/{self.rank}", f"{type(e).__name__}: {_first_line(e)} (its last collective: {self._where})")
        except RuntimeError:
            pass

    def close(self) -> None:
        """Leave the job: the heartbeat stops, the SIGTERM handler goes, the process group ends."""
        self._stop.set()
        if self._store is not None and not self._failed:
            try:
                self._set(f"done/{self.rank}", "1")
            except RuntimeError:
                pass
        if self._sigterm is not None:
            signal.signal(signal.SIGTERM, self._sigterm)
            self._sigterm = None
        if dist.is_initialized() and not self._failed:  # a failing rank exits at once: the others wait on it
            dist.destroy_process_group()


_WHAT_TO_DO = ("Every rank stops; nothing is left looking finished: a streamed job (--stream) keeps its finished "
               "blocks, go on with the same command and --resume; any other job wrote nothing, run it again")


# all_gather_single: all_gather_into_tensor's newer name (the old one warns that it is deprecated)
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


def _first_line(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return lines[0] if lines else type(e).__name__


def _alive(pid: int) -> bool:
    """Whether process `pid` of this machine still runs (a zombie has stopped)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except (OSError, IndexError):
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True
