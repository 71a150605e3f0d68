"""Time lowbit's quantize jobs on this checkout against an older revision, one after the other.

    python benchmarks/calibrate_speed.py --baseline 9004cf5 --jobs readme [qwen-gptq qwen-budget]
        [--threads 2] [--out benchmarks/results/calibrate-speed.jsonl]
    python benchmarks/calibrate_speed.py --head-only --jobs qwen-gptq     # this checkout alone

Each job runs as a fresh `lowbit quantize` process, first from a detached worktree of the
baseline revision (made beside this checkout and removed after), then from this checkout, with
the same OMP thread count and the same data. A row per (job, revision) records the wall time, the
peak RSS of the process (ru_maxrss of the child, from wait4), the quantize seconds the manifest states and the
evaluation the job ran, so the speed-up is a ratio measured in one run on one machine. Run it on a
quiet machine: another process on the same cores makes both sides slower by different amounts.
`--head-only` runs this checkout alone (a job whose baseline row is already in the file, or too
long to run twice): its rows carry no ratio.

Jobs:
  readme       the README's main job (scripts/demo.sh): GPTQ w4g64 of smollm2-135m, 128 x 512
               calibration tokens, then WikiText-2 (8192 tokens) against the reference
  qwen-gptq    GPTQ w4g128 of qwen2.5-coder-1.5b, streamed (no evaluation)
  qwen-budget  the KL-probed budget at 3.0 bits per weight on qwen2.5-coder-1.5b (GPTQ inside)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
JOBS = {
    "readme": ["smollm2-135m", "--method", "gptq", "--bits", "4", "--group-size", "64", "--eval", "wikitext2",
               "--max-tokens", "8192"],
    "qwen-gptq": ["qwen2.5-coder-1.5b", "--method", "gptq", "--bits", "4", "--group-size", "128", "--stream"],
    "qwen-budget": ["qwen2.5-coder-1.5b", "--method", "gptq", "--target-bpw", "3.0"],
}


def run_job(src: Path, job: str, out: Path, threads: int) -> dict:
    """One `lowbit quantize` of `job` with lowbit imported from `src`; its time, memory and results."""
    env = {**os.environ, "PYTHONPATH": str(src), "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    cmd = [sys.executable, "-m", "lowbit.cli", "quantize", *JOBS[job], "-o", str(out), "--force"]
    log = out.with_suffix(".log")
    t0 = time.perf_counter()
    with log.open("w") as f:
        proc = subprocess.Popen(cmd, env=env, stdout=f, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)  # this child's own rusage: its peak RSS
    seconds = time.perf_counter() - t0
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{job} from {src} failed:\n{log.read_text()[-3000:]}")
    manifest = json.loads((out / "manifest.json").read_text())
    evals = {m["model"]: m["datasets"] for m in manifest.get("evaluation") or []}
    row = {"job": job, "command": "lowbit quantize " + " ".join(JOBS[job]), "threads": threads,
           "wall_seconds": round(seconds, 1), "quantize_seconds": round(manifest["stats"]["seconds"], 1),
           "peak_rss_bytes": usage.ru_maxrss * 1024,
           "bits_per_weight": manifest["stats"]["bits_per_weight"]}
    for model, datasets in evals.items():
        if model != "reference":
            row["eval"] = {name: {k: d[k] for k in ("ppl", "kl_mean", "top1_agreement")} for name, d in datasets.items()}
    return row


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--baseline", help="git revision to compare against (today's code)")
    ap.add_argument("--head-only", action="store_true", help="run this checkout alone, no baseline")
    ap.add_argument("--jobs", nargs="+", choices=sorted(JOBS), default=["readme"])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/calibrate-speed.jsonl")
    args = ap.parse_args(argv)
    if not args.head_only and not args.baseline:
        ap.error("give --baseline REV, or --head-only")
    head = _rev("HEAD")
    base = None if args.head_only else _rev(args.baseline)
    work = Path(tempfile.mkdtemp(prefix="calibrate-speed-"))
    tree = work / "baseline"
    if base:
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(tree), base], check=True,
                       capture_output=True)
    machine = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores"
    try:
        for job in args.jobs:
            rows = {}
            for rev, src in ([(base, tree / "src")] if base else []) + [(head, ROOT / "src")]:
                row = run_job(src, job, work / f"{job}-{rev}", args.threads)
                rows[rev] = {**row, "revision": rev, "baseline": base, "machine": machine,
                             "date": time.strftime("%Y-%m-%d")}
                shutil.rmtree(work / f"{job}-{rev}", ignore_errors=True)
                print(json.dumps(rows[rev]), flush=True)
            if base:
                rows[head]["speedup_vs_baseline"] = round(rows[base]["wall_seconds"] / rows[head]["wall_seconds"], 2)
                print(f"{job}: {rows[base]['wall_seconds']:.0f} s at {base} -> {rows[head]['wall_seconds']:.0f} s "
                      f"at {head} ({rows[head]['speedup_vs_baseline']}x)", flush=True)
            args.out.parent.mkdir(parents=True, exist_ok=True)
            with args.out.open("a") as f:
                for row in rows.values():
                    f.write(json.dumps(row) + "\n")
    finally:
        if base:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(tree)], check=False,
                           capture_output=True)
        shutil.rmtree(work, ignore_errors=True)
    return 0


def _rev(name: str) -> str:
    return subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", name], capture_output=True, text=True,
                          check=True).stdout.strip()


if __name__ == "__main__":
    sys.exit(main())
