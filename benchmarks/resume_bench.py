"""Kill a streamed quantize job with SIGKILL part way, resume it, and compare with a run never stopped.

    python benchmarks/resume_bench.py [--model smollm2-135m] [--kill-after 15] [--threads 2]
        [--out benchmarks/results/resume.json] [-- EXTRA QUANTIZE ARGS]

Three `lowbit quantize MODEL --stream` processes of the same job (GPTQ w4g64 by default, the
README's recipe) run one after the other: one to the end; one killed with SIGKILL from outside as
soon as its progress record lists --kill-after finished blocks (polled every 0.1 s: the kill lands
while the next block is being calibrated, as a crash would); then the same command with
--resume on the killed folder. The report: the wall time of each, what the resume cost beyond the
work the killed run had left (its forward passes through the finished blocks, to rebuild the next
block's inputs), and whether every tensor of the resumed checkpoint equals the uninterrupted
one's (torch.equal, tensor by tensor). Run it on a quiet machine for the times; the equality holds
regardless.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from safetensors import safe_open

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ["--method", "gptq", "--bits", "4", "--group-size", "64"]
PARTIAL_RECORD = "lowbit-partial.json"


def quantize_cmd(model: str, out: Path, extra: list[str]) -> list[str]:
    return [sys.executable, "-m", "lowbit.cli", "quantize", model, *RECIPE, *extra, "--stream", "-o", str(out), "-q"]


def finished_blocks(out: Path) -> int:
    try:
        return len(json.loads((out / PARTIAL_RECORD).read_text())["blocks"])
    except (OSError, ValueError, KeyError):
        return 0


def run(cmd: list[str], env: dict) -> float:
    t0 = time.perf_counter()
    subprocess.run(cmd, env=env, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - t0


def run_and_kill(cmd: list[str], env: dict, out: Path, after: int) -> float:
    """Start `cmd`, SIGKILL it once `after` blocks are recorded; the seconds it ran."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL)
    while finished_blocks(out) < after:
        if proc.poll() is not None:
            raise SystemExit(f"the job ended (exit {proc.returncode}) before {after} blocks were finished")
        time.sleep(0.1)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    return time.perf_counter() - t0


def tensors(folder: Path) -> dict[str, tuple[Path, str]]:
    found = {}
    for f in sorted(folder.rglob("*.safetensors")):
        with safe_open(f, framework="pt") as h:
            for name in h.keys():  # noqa: SIM118 - a safe_open handle is not iterable
                found[f"{f.relative_to(folder)}:{name}"] = (f, name)
    return found


def differing(a: Path, b: Path) -> list[str]:
    """Names of tensors that differ (or exist on one side only) between checkpoints a and b."""
    ta, tb = tensors(a), tensors(b)
    bad = sorted(set(ta) ^ set(tb))
    for key in sorted(set(ta) & set(tb)):
        (fa, na), (fb, nb) = ta[key], tb[key]
        with safe_open(fa, framework="pt") as ha, safe_open(fb, framework="pt") as hb:
            x, y = ha.get_tensor(na), hb.get_tensor(nb)
            if x.dtype != y.dtype or x.shape != y.shape or not bool((x == y).all()):
                bad.append(key)
    return bad


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--kill-after", type=int, default=15, help="finished blocks before the kill")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/resume.json")
    ap.add_argument("extra", nargs="*", help="more quantize arguments (after --)")
    args = ap.parse_args(argv)
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": str(args.threads),
           "MKL_NUM_THREADS": str(args.threads)}
    work = Path(tempfile.mkdtemp(prefix="resume-bench-"))
    try:
        full, resumed = work / "full", work / "resumed"
        t_full = run(quantize_cmd(args.model, full, args.extra), env)
        t_killed = run_and_kill(quantize_cmd(args.model, resumed, args.extra), env, resumed, args.kill_after)
        at_kill = finished_blocks(resumed)
        t_resume = run(quantize_cmd(args.model, resumed, args.extra) + ["--resume"], env)
        bad = differing(full, resumed)
        n_tensors = len(tensors(full))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    row = {"model": args.model, "command": "lowbit quantize " + " ".join([args.model, *RECIPE, *args.extra, "--stream"]),
           "threads": args.threads, "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
           "date": time.strftime("%Y-%m-%d"), "uninterrupted_seconds": round(t_full, 1),
           "killed_after_seconds": round(t_killed, 1), "blocks_finished_at_kill": at_kill,
           "resume_seconds": round(t_resume, 1),
           "extra_seconds": round(t_killed + t_resume - t_full, 1),
           "tensors_compared": n_tensors, "tensors_differing": bad}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(row, indent=2) + "\n")
    print(json.dumps(row, indent=2))
    return 0 if not bad else 1


if __name__ == "__main__":
    sys.exit(main())
