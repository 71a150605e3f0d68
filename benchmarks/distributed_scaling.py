"""Wall time of one quantize job on 1, 2 and 4 processes at a fixed total thread count, the bytes
the collectives move per block, a two-"node" run on localhost, and how far each checkpoint is from
the one-process one.

    python benchmarks/distributed_scaling.py [--model smollm2-135m] [--samples 32] [--threads 2]

Runs, one after another (each `python -m lowbit quantize MODEL --method gptq --bits 4
--group-size 64 --calib-samples N`):
  1 x T   one process, T threads (the baseline of the times);
  1 x 1   one process, 1 thread: the checkpoint the runs of 1-thread ranks are compared with (a
          thread count changes float summation order too, see "codes" below);
  2 x T/2 `--workers 2`;  4 x max(1, T/4) `--workers 4` (oversubscribed when T < 4);
  2 x T/2 `--workers 2 --parallel layers` (every rank runs every sample; only the solves split);
  2 nodes two torchrun invocations, --nnodes 2 --node-rank 0|1 --nproc-per-node 1, on 127.0.0.1.
Wall time is the whole command (start-up, loading, calibration, saving); "quantize s" is the
job's own time (rank 0's quantize call). The bytes are what rank 0 received in collectives (the
job prints them), divided by the number of blocks. Codes: each checkpoint against the 1 x 1 one
(the fraction of codes that differ, of weights more than one step apart, and the sum of GPTQ's
proxy losses). GPTQ feeds each column's rounding error into the next columns, so one flipped code
moves others in its row and the next blocks' inputs: a last-bit change anywhere (thread count,
summation order) moves a sizable fraction of codes on a deep model, which is why the comparison is
at one thread per process. Results: benchmarks/results/distributed_scaling.json and .md; `--reuse`
keeps the runs whose checkpoint is in --work (their times from the JSON). Other work on the
machine competes for the same cores: say so when reporting.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"


def _env(threads: int) -> dict[str, str]:
    path = os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])
    return {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": path}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _parse(stderr: str) -> dict:
    got: dict = {}
    if m := re.search(r"quantized in ([\d.]+)s", stderr):
        got["quantize_s"] = float(m.group(1))
    if m := re.search(r"received ([\d.]+) MB in (\d+) collectives \(([^)]*)\)", stderr):
        got["received_mb"], got["collectives"] = float(m.group(1)), int(m.group(2))
        got["received_by_kind_mb"] = {k: float(v) for k, v in re.findall(r"(\w+) ([\d.]+) MB", m.group(3))}
    return got


def _run(name: str, commands: list[tuple[list[str], int]], out: Path) -> dict:
    """Run `commands` ([argv, threads] started together), wait for all; the time and what rank 0 printed."""
    t0 = time.perf_counter()
    procs = [subprocess.Popen(argv, env=_env(threads), stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
             for argv, threads in commands]
    errs = [p.communicate()[1] for p in procs]
    wall = time.perf_counter() - t0
    bad = [(p.returncode, e[-2000:]) for p, e in zip(procs, errs, strict=True) if p.returncode != 0]
    if bad:
        raise SystemExit(f"{name} failed: {bad}")
    row = {"run": name, "wall_s": round(wall, 1), "output": str(out)}
    for e in errs:
        row.update(_parse(e))
    print(f"{name}: {row}", flush=True)
    return row


def _differences(a: Path, b: Path) -> dict:
    """Codes that differ between two checkpoints (all, and in the first block), weights more than
    one step apart, and the sums of GPTQ's proxy losses."""
    from lowbit.checkpoint.read import open_checkpoint

    with open_checkpoint(a, verify=False) as ca, open_checkpoint(b, verify=False) as cb:
        n = differ = far = n0 = differ0 = 0
        for name in ca.weights:
            qa, qb = ca.weights[name].unpack(), cb.weights[name].unpack()
            d = int((qa.codes != qb.codes).sum())
            n, differ = n + qa.codes.numel(), differ + d
            if ".layers.0." in name:
                n0, differ0 = n0 + qa.codes.numel(), differ0 + d
            wa, wb = qa.dequantize(), qb.dequantize()
            step = torch.maximum(qa.float_scales(), qb.float_scales()).repeat_interleave(qa.fmt.group_size, 1)
            far += int(((wa - wb).abs() > step[:, : wa.shape[1]] * 1.001).sum())
    losses = [sum(s["loss"] for s in json.loads((p / "manifest.json").read_text())["layer_stats"].values() if s["loss"])
              for p in (a, b)]
    return {"codes_differing": differ, "codes": n, "fraction": differ / n, "first_block_fraction": differ0 / max(n0, 1),
            "beyond_one_step": far / n, "gptq_loss_sum": round(losses[1], 2), "reference_gptq_loss_sum": round(losses[0], 2)}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--samples", type=int, default=32)
    p.add_argument("--threads", type=int, default=2, help="total threads of every run")
    p.add_argument("--work", type=Path, default=None, help="folder for the checkpoints (default: a temporary one)")
    p.add_argument("--reuse", action="store_true", help="keep the runs whose checkpoint --work holds")
    args = p.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="lowbit-dist-"))
    base = [sys.executable, "-m", "lowbit", "quantize", args.model, "--method", "gptq", "--bits", "4",
            "--group-size", "64", "--calib-samples", str(args.samples), "-q"]
    t = args.threads
    before = {}
    if args.reuse and (RESULTS / "distributed_scaling.json").is_file():
        before = {r["run"]: r for r in json.loads((RESULTS / "distributed_scaling.json").read_text())["runs"]}

    def run(name: str, commands: list[tuple[list[str], int]], out: Path) -> dict:
        if args.reuse and (out / "manifest.json").is_file() and name in before:
            return before[name]
        return _run(name, commands, out)

    rows = [run(f"1 x {t}", [([*base, "-o", str(work / "one")], t)], work / "one"),
            run("1 x 1", [([*base, "-o", str(work / "one1t")], 1)], work / "one1t")]
    for m, extra in ((2, []), (4, []), (2, ["--parallel", "layers"])):
        name = f"{m} x {max(1, t // m)}" + (" layers" if extra else "")
        out = work / name.replace(" ", "")
        rows.append(run(name, [([*base, "-o", str(out), "--workers", str(m), *extra], t)], out))
    port = _free_port()
    nodes = [[sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node-rank", str(k),
              "--nproc-per-node", "1", "--master-addr", "127.0.0.1", "--master-port", str(port), "-m", "lowbit",
              *base[3:], "-o", str(work / "nodes")] for k in (0, 1)]
    rows.append(run(f"2 nodes x 1 x {max(1, t // 2)}", [(n, max(1, t // 2)) for n in nodes], work / "nodes"))
    from lowbit.models import load_model

    n_blocks = load_model(args.model).model.config.num_hidden_layers
    for row in rows:
        row["vs_one_process_1_thread"] = _differences(work / "one1t", Path(row["output"]))
        if "received_mb" in row:
            row["received_mb_per_block"] = round(row["received_mb"] / n_blocks, 2)
            row["collectives_per_block"] = round(row["collectives"] / n_blocks, 1)
    result = {"model": args.model, "method": "gptq w4g64", "calib_samples": args.samples, "total_threads": t,
              "cpus": os.cpu_count(), "blocks": n_blocks, "torch": torch.__version__, "runs": rows}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "distributed_scaling.json").write_text(json.dumps(result, indent=1) + "\n")
    (RESULTS / "distributed_scaling.md").write_text(_markdown(result))
    print(_markdown(result))


def _markdown(r: dict) -> str:
    one = r["runs"][0]["wall_s"]
    lines = [(f"# {r['model']} {r['method']}, {r['calib_samples']} calibration samples, {r['total_threads']} threads in "
             f"all, {r['cpus']} CPUs"), "",
             ("| run | wall s | speed-up | quantize s | MB received per block (rank 0) | collectives per block "
             "| codes differing from 1 x 1 (first block) | weights > 1 step apart | GPTQ loss sum |"),
             "|---|---|---|---|---|---|---|---|---|"]
    for row in r["runs"]:
        d = row["vs_one_process_1_thread"]
        lines.append(f"| {row['run']} | {row['wall_s']} | {one / row['wall_s']:.2f}x | {row.get('quantize_s', '')} | "
                     f"{row.get('received_mb_per_block', '')} | {row.get('collectives_per_block', '')} | "
                     f"{d['fraction']:.2%} ({d['first_block_fraction']:.2%}) | {d['beyond_one_step']:.2%} | "
                     f"{d['gptq_loss_sum']} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
