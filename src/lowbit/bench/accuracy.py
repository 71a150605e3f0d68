"""`lowbit bench accuracy`: the reference and every (method, setting) side by side in one run.

For each model: the reference's log-probabilities on the evaluation windows are computed once
and cached on disk (eval.kl.ReferenceLogits); then each job (RTN, GPTQ, HQQ at each bit width and
group size) runs in a fresh child process that loads the model, quantizes it (wall time and the
child's peak RSS measured), and compares it to the cached reference on the same token ids. The
results are appended as JSON lines (so an interrupted run keeps what it finished) and rendered
into a markdown section of BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import platform
import resource
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lowbit.errors import ConfigError, DataNotFoundError

METHODS = ("rtn", "gptq", "hqq")
DEFAULT_SETTINGS = ("w4g128", "w4g64", "w3g128", "w3g64", "w2g64")


@dataclass(frozen=True)
class Setting:
    bits: int
    group_size: int

    @classmethod
    def parse(cls, text: str) -> "Setting":
        try:
            b, g = text.lower().removeprefix("w").split("g")
            return cls(int(b), int(g))
        except ValueError:
            raise ConfigError(f"setting {text!r} is not of the form w<bits>g<group>, e.g. w4g128") from None

    def __str__(self) -> str:
        return f"w{self.bits}g{self.group_size}"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("models", nargs="*", default=["smollm2-135m"], help="models to benchmark")
    p.add_argument("--settings", default=",".join(DEFAULT_SETTINGS), help="comma list of w<bits>g<group>")
    p.add_argument("--methods", default=",".join(METHODS), help="comma list of rtn, gptq, hqq")
    p.add_argument("--data", default="wikitext2,c4", help="comma list of evaluation datasets")
    p.add_argument("--max-tokens", type=int, default=8192, help="evaluation tokens per dataset")
    p.add_argument("--seqlen", type=int, default=2048, help="evaluation window")
    p.add_argument("--calib-samples", type=int, default=128)
    p.add_argument("--calib-seqlen", type=int, default=512)
    p.add_argument("--work-dir", default="bench-work", help="reference caches and raw JSON results")
    p.add_argument("--output", default="BENCHMARKS.md", help="markdown file whose accuracy section is rewritten")


def _peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _job(spec: dict[str, Any], queue) -> None:
    """Child process: load, quantize, compare to the cached reference; put a result dict."""
    try:
        queue.put(_run_job(spec))
    except Exception as e:  # reported in the table, never silently dropped
        queue.put({**spec, "error": f"{type(e).__name__}: {e}"})


def _run_job(spec: dict[str, Any]) -> dict[str, Any]:
    import torch

    from lowbit.data import eval_tokens
    from lowbit.eval import ReferenceLogits, compare_to_reference
    from lowbit.eval.size import quantized_size
    from lowbit.models import load_model
    from lowbit.pipeline import quantize, target_layers
    from lowbit.recipes import CalibrationConfig, Recipe

    torch.manual_seed(0)
    loaded = load_model(spec["model"], dtype=torch.float32, cache=spec.get("cache"), progress=False)
    load_rss = _peak_rss()
    method, bits, gs = spec["method"], spec["bits"], spec["group_size"]
    t0 = time.perf_counter()
    if method == "hqq":
        from lowbit.peers import hqq_quantize_model

        names, _ = target_layers(loaded.model, Recipe(method="rtn", bits=bits, group_size=gs))
        peer = hqq_quantize_model(loaded.model, names, bits, gs, progress=False)
        bpw = peer.bits_per_weight
    else:
        recipe = Recipe(method=method, bits=bits, group_size=gs,
                        calibration=CalibrationConfig(n_samples=spec["calib_samples"], seqlen=spec["calib_seqlen"]))
        quantize(loaded, recipe, data_dir=spec.get("data_dir"), progress=False)
        bpw = quantized_size(loaded.model).bits_per_weight
    seconds = time.perf_counter() - t0
    peak = _peak_rss()
    out = {**spec, "bits_per_weight": bpw, "quant_seconds": seconds, "peak_rss_bytes": peak,
           "load_rss_bytes": load_rss, "datasets": {}}
    for ds, ref_path in spec["references"].items():
        tokens = eval_tokens(loaded.tokenizer, ds, spec["max_tokens"], spec.get("data_dir"))
        c = compare_to_reference(loaded.model, ReferenceLogits.open(ref_path), tokens, spec["seqlen"], progress=False)
        out["datasets"][ds] = {"ppl": c.ppl, "ref_ppl": c.ref_ppl, "kl": c.kl_mean, "top1": c.top1_agreement,
                               "n_tokens_scored": c.n_tokens_scored}
    return out


def _run_in_child(spec: dict[str, Any]) -> dict[str, Any]:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_job, args=(spec, queue))
    proc.start()
    result = queue.get()
    proc.join()
    return result


def build_references(model: str, datasets: list[str], args, work: Path) -> dict[str, Any]:
    """Reference log-probs per dataset, cached under work/; returns paths and reference ppl."""
    import torch

    from lowbit.data import eval_tokens
    from lowbit.eval import ReferenceLogits
    from lowbit.eval.size import quantized_size
    from lowbit.models import load_model

    ref = load_model(model, dtype=torch.float32, cache=args.cache)
    out = {"paths": {}, "ppl": {}, "sha256": ref.source.sha256, "max_tokens": args.max_tokens,
           "seqlen": args.seqlen, "reference_bytes": quantized_size(ref.model).reference_bytes}
    for ds in datasets:
        tokens = eval_tokens(ref.tokenizer, ds, args.max_tokens, args.data_dir)
        path = work / f"ref-{model}-{ds}-{args.max_tokens}-{args.seqlen}"
        try:
            cache = ReferenceLogits.open(path)
            cache.check_matches(tokens, args.seqlen)
        except (DataNotFoundError, ConfigError):
            cache = ReferenceLogits.build(ref.model, tokens, args.seqlen, path, progress=not args.quiet)
        out["paths"][ds] = str(path)
        out["ppl"][ds] = cache.ppl
    return out


def run_accuracy_bench(args) -> None:
    from tqdm.auto import tqdm

    settings = [Setting.parse(s) for s in args.settings.split(",") if s]
    methods = [m for m in args.methods.split(",") if m]
    bad = [m for m in methods if m not in METHODS]
    if bad:
        raise ConfigError(f"--methods: unknown {bad}; choose from {', '.join(METHODS)}")
    datasets = [d for d in args.data.split(",") if d]
    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    results_path = work / "accuracy.jsonl"
    done = {}
    if results_path.exists():
        for line in results_path.read_text().splitlines():
            r = json.loads(line)
            done[(r["model"], r["method"], r["bits"], r["group_size"])] = r
    with open(work / "commands.txt", "a") as f:
        f.write(command_line(args) + "\n")
    for model in args.models:
        refs = build_references(model, datasets, args, work)
        (work / f"reference-{model}.json").write_text(json.dumps(refs, indent=2))
        jobs = [(m, s) for s in settings for m in methods]
        for method, s in tqdm(jobs, desc=f"{model} jobs", disable=args.quiet):
            key = (model, method, s.bits, s.group_size)
            if key in done and "error" not in done[key]:
                continue
            spec = {"model": model, "method": method, "bits": s.bits, "group_size": s.group_size,
                    "calib_samples": args.calib_samples, "calib_seqlen": args.calib_seqlen,
                    "max_tokens": args.max_tokens, "seqlen": args.seqlen, "references": refs["paths"],
                    "cache": args.cache, "data_dir": args.data_dir}
            r = _run_in_child(spec)
            done[key] = r
            with open(results_path, "a") as f:
                f.write(json.dumps(r) + "\n")
    section = render(args, datasets, done, work)
    _write_section(Path(args.output), section)
    print(section)


def machine() -> str:
    import os

    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return (f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__}, "
            f"CPU capability {torch.backends.cpu.get_cpu_capability()}")


def command_line(args) -> str:
    return (f"lowbit bench accuracy {' '.join(args.models)} --settings {args.settings} --methods {args.methods} "
            f"--data {args.data} --max-tokens {args.max_tokens} --seqlen {args.seqlen} "
            f"--calib-samples {args.calib_samples} --calib-seqlen {args.calib_seqlen} --work-dir {args.work_dir}")


def render(args, datasets: list[str], results: dict, work: Path) -> str:
    commands = list(dict.fromkeys((work / "commands.txt").read_text().splitlines()))
    models = list(dict.fromkeys([k[0] for k in results] + list(args.models)))
    lines = [
        "## Accuracy: reference vs RTN, GPTQ and HQQ",
        "",
        "Commands (results accumulate in the work folder; a job already done is not rerun):",
        "",
        *[f"    {c}" for c in commands],
        "",
        f"Machine: {machine()}. Compute dtype float32. Evaluation: the first N tokens of each dataset "
        "(N and the window length are given per model) in non-overlapping windows (C4: documents "
        "1000-1999 of c4-validation-2k.jsonl); KL(reference || model) in nats per token and top-1 "
        "agreement on the same token ids. Calibration (GPTQ): the `calib` column, samples x tokens drawn from C4 "
        "documents 0-999, seed 0. RTN and GPTQ: asymmetric, integer zero points, float16 scales, clipping "
        "search; GPTQ damp 0.01, true-sequential, no act-order. HQQ 0.2.8 (data-free, its default "
        "optimizer, float zero and scale per group). Bits per weight count scales and zeros. Quantization "
        "time and peak RSS are of a fresh child process per job (model load included in the RSS).",
        "",
        "The reference is the GGUF model dequantized to float32: it was already quantized upstream "
        "(SmolLM2: Q4_1, asymmetric 4-bit g32; Qwen2.5-Coder: Q4_K/Q6_K), so these numbers measure "
        "the cost of re-quantizing it, not of quantizing an original bf16 checkpoint.",
        "",
    ]
    for model in models:
        ref = json.loads((work / f"reference-{model}.json").read_text())
        head = "| method | setting | bits/weight | " + " | ".join(
            f"{d} ppl | {d} KL | {d} top-1" for d in datasets) + " | quant time (s) | peak RSS (GiB) | calib |"
        lines += [f"### {model}", "",
                  f"Evaluation: first {ref['max_tokens']} tokens per dataset, windows of {ref['seqlen']}; "
                  f"reference sha256 {ref['sha256'][:16]}...", "", head, "|" + "---|" * (3 + 3 * len(datasets) + 3)]
        lines.append("| reference | fp32 | 32 | " + " | ".join(f"{ref['ppl'][d]:.3f} | 0 | 1" for d in datasets)
                     + " | - | - | - |")
        rows = sorted((r for k, r in results.items() if k[0] == model),
                      key=lambda r: (-r["bits"], -r["group_size"], METHODS.index(r["method"])))
        for r in rows:
            setting = f"w{r['bits']}g{r['group_size']}"
            if "error" in r:
                lines.append(f"| {r['method']} | {setting} | failed: {r['error']} |")
                continue
            cells = " | ".join(
                f"{r['datasets'][d]['ppl']:.3f} | {r['datasets'][d]['kl']:.4f} | {r['datasets'][d]['top1']:.3f}"
                for d in datasets)
            calib = f"{r['calib_samples']}x{r['calib_seqlen']}" if r["method"] == "gptq" else "none"
            lines.append(f"| {r['method']} | {setting} | {r['bits_per_weight']:.3f} | {cells} | "
                         f"{r['quant_seconds']:.0f} | {r['peak_rss_bytes'] / 2**30:.2f} | {calib} |")
        lines.append("")
    return "\n".join(lines)


MARK_BEGIN = "<!-- bench:accuracy:begin -->"
MARK_END = "<!-- bench:accuracy:end -->"


def _write_section(path: Path, section: str) -> None:
    """Replace the accuracy section of the file (between markers), keeping everything else."""
    block = f"{MARK_BEGIN}\n{section}\n{MARK_END}\n"
    text = path.read_text() if path.exists() else "# lowbit benchmarks\n\n"
    if MARK_BEGIN in text and MARK_END in text:
        a = text.index(MARK_BEGIN)
        b = text.index(MARK_END) + len(MARK_END) + 1
        text = text[:a] + block + text[b:]
    else:
        text = text.rstrip("\n") + "\n\n" + block
    path.write_text(text)
