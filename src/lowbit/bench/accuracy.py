"""`lowbit bench accuracy`: the reference and every (method, setting) side by side in one run.

For each model: the reference's log-probabilities on the evaluation windows are computed once
and cached on disk (eval.kl.ReferenceLogits); then each job runs in a fresh child process that
loads the model, quantizes it (wall time and the child's peak RSS measured), and compares it to
the cached reference on the same token ids. The results are appended as JSON lines (so an
interrupted run keeps what it finished) and rendered into a markdown section of BENCHMARKS.md,
with a plot of perplexity against bits per weight per model.

A job is METHOD:SETTING:
- rtn, gptq, awq, awq-gptq, hqq : w<bits>g<group>            e.g. gptq:w3g128
- slim, awq-slim                : w<avg bits>g<group>        e.g. slim:w2.5g128
- budget                        : w<bits>g<group>, meaning "the size of that uniform format":
                                  per-layer levels chosen for exactly its bits per weight (GPTQ);
                                  or <x>bpw, a size given directly   e.g. budget:2.92bpw
- llamacpp                      : a llama.cpp type           e.g. llamacpp:Q4_K_M
A setting may end in -is<k> for k-bit integer group scales (Integer Scale): gptq:w4g128-is8.
`--jobs` lists them; without it, every method in --methods runs at every --settings.
`--suite methods` is the weight-methods comparison at about 4, 3, 2.5 and 2 bits per weight.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import multiprocessing as mp
import platform
import re
import resource
import time
from dataclasses import dataclass
from pathlib import Path
from queue import Empty
from typing import Any

from lowbit.errors import ConfigError, DataNotFoundError
from lowbit.recipes import CALIB_DTYPES, SLIM_METHODS

METHODS = ("rtn", "gptq", "awq", "awq-gptq", "slim", "awq-slim", "budget", "hqq", "llamacpp")
DEFAULT_METHODS = ("rtn", "gptq", "hqq")
DEFAULT_SETTINGS = ("w4g128", "w4g64", "w3g128", "w3g64", "w2g64")
LLAMACPP_TYPES = ("Q4_K_M", "Q3_K_M", "Q2_K", "Q4_K_S", "Q5_K_M", "Q6_K", "Q8_0")


def _suite_methods() -> list[str]:
    jobs = []
    for uniform, avg in (("w4g128", "w4g128"), ("w3g128", "w3g128"), ("w2g32", "w2.5g128"), ("w2g128", "w2g128")):
        jobs += [f"{m}:{uniform}" for m in ("rtn", "gptq", "awq-gptq", "hqq")]
        jobs += [f"slim:{avg}", f"budget:{uniform}"]
    jobs += ["gptq:w4g128-is8", "gptq:w3g128-is8"]  # Integer Scale's cost against float16 scales
    return jobs + [f"llamacpp:{t}" for t in ("Q4_K_M", "Q3_K_M", "Q2_K")]


SUITES = {"methods": _suite_methods}


@dataclass(frozen=True)
class Setting:
    bits: int | float
    group_size: int

    @classmethod
    def parse(cls, text: str) -> Setting:
        try:
            b, g = text.lower().removeprefix("w").split("g")
            bits = float(b)
            return cls(int(bits) if bits.is_integer() else bits, int(g))
        except ValueError:
            raise ConfigError(f"setting {text!r} is not of the form w<bits>g<group>, e.g. w4g128") from None

    def __str__(self) -> str:
        return f"w{self.bits}g{self.group_size}"


@dataclass(frozen=True)
class Job:
    method: str
    setting: str   # w<bits>g<group>, or a llama.cpp type

    @classmethod
    def parse(cls, text: str) -> Job:
        method, _, setting = text.partition(":")
        if method not in METHODS or not setting:
            raise ConfigError(f"job {text!r}: use METHOD:SETTING with METHOD one of {', '.join(METHODS)} "
                              "(e.g. gptq:w3g128, slim:w2.5g128, llamacpp:Q4_K_M)")
        base, _, iscale = setting.partition("-is")
        if iscale and (method in ("hqq", "llamacpp", "budget") or not iscale.isdigit()):
            raise ConfigError(f"job {text!r}: -is<bits> (integer scales) applies to rtn, gptq, awq, awq-gptq, slim")
        if method == "llamacpp":
            if setting not in LLAMACPP_TYPES:
                raise ConfigError(f"job {text!r}: llama.cpp type must be one of {', '.join(LLAMACPP_TYPES)}")
        elif method == "budget" and setting.endswith("bpw"):
            if _target_bpw(setting) is None:
                raise ConfigError(f"job {text!r}: a budget's size is w<bits>g<group> or <bits per weight>bpw with "
                                  "bits per weight in (1, 16], e.g. budget:w3g128 or budget:2.92bpw")
        else:
            s = Setting.parse(base)
            if method not in SLIM_METHODS and not isinstance(s.bits, int):
                raise ConfigError(f"job {text!r}: fractional bits need method slim or awq-slim")
        return cls(method, setting)

    def __str__(self) -> str:
        return f"{self.method}:{self.setting}"


def _target_bpw(setting: str) -> float | None:
    """The bits per weight of a budget setting written <x>bpw (None for any other setting)."""
    m = re.fullmatch(r"(\d+(?:\.\d+)?)bpw", setting)
    return float(m.group(1)) if m and 1.0 < float(m.group(1)) <= 16.0 else None


def jobs_from_args(args) -> list[Job]:
    if getattr(args, "suite", None):
        return [Job.parse(j) for j in SUITES[args.suite]()]
    if getattr(args, "jobs", None):
        return [Job.parse(j) for j in args.jobs.split(",") if j]
    methods = [m for m in args.methods.split(",") if m]
    bad = [m for m in methods if m not in METHODS or m == "llamacpp"]
    if bad:
        raise ConfigError(f"--methods: unknown {bad}; choose from {', '.join(m for m in METHODS if m != 'llamacpp')} "
                          "(llama.cpp types go in --jobs, e.g. llamacpp:Q4_K_M)")
    return [Job.parse(f"{m}:{s}") for s in args.settings.split(",") if s for m in methods]


def file_label(model: str) -> str:
    """The model's part of a file name: a known name as it is; a path (a folder, a GGUF file, a hub
    id) as its last component and a short hash of the whole, so that two folders named alike differ."""
    if "/" not in model and "\\" not in model:
        return model
    tail = re.sub(r"[^\w.-]+", "_", Path(model).name).strip("_.") or "model"
    return f"{tail}-{hashlib.sha256(model.encode()).hexdigest()[:8]}"


def _key(r: dict[str, Any]) -> tuple[str, str, str, str]:
    """Result identity; records written before jobs had labels carry bits and group_size only,
    and those written before calibration had a dtype calibrated in float32. Methods without
    calibration (RTN, HQQ, llama.cpp) have one result whatever --calib-dtype said."""
    return (r["model"], r["method"], r.get("setting") or f"w{r['bits']}g{r['group_size']}",
            r.get("calib_dtype", "float32") if r["method"] in CALIBRATED else "float32")


def add_arguments(p: argparse.ArgumentParser) -> None:
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
    p.add_argument("--work-dir", default="benchmarks/results", help="reference caches and raw JSON results (the "
                   "JSON is kept in git there; the caches are ignored)")
    p.add_argument("--output", default="BENCHMARKS.md", help="markdown file whose accuracy section is rewritten")


def _peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _job(spec: dict[str, Any], queue) -> None:
    """Child process: load, quantize, compare to the cached reference; put a result dict."""
    try:
        queue.put(_run_job(spec))
    except Exception as e:  # noqa: BLE001 - reported in the table, never silently dropped
        queue.put({**spec, "error": f"{type(e).__name__}: {e}"})


def _uniform_bpw(model, names, setting: Setting) -> float:
    """Bits per weight of a uniform asymmetric format over these layers (the size a budget job matches)."""
    from lowbit.algorithms.rtn import resolve_format
    from lowbit.qtensor import format_nbytes

    total = n = 0
    for name in names:
        lin = model.get_submodule(name)
        total += format_nbytes(lin.out_features, lin.in_features,
                               resolve_format(lin.in_features, setting.bits, setting.group_size, False))
        n += lin.weight.numel()
    return 8 * total / n


def _run_job(spec: dict[str, Any]) -> dict[str, Any]:
    import torch

    from lowbit.data import eval_tokens
    from lowbit.eval import ReferenceLogits, compare_to_reference
    from lowbit.eval.size import quantized_size_of_modules as quantized_size
    from lowbit.models import load_model
    from lowbit.pipeline import quantize, target_layers
    from lowbit.recipes import (
        BudgetConfig,
        CalibrationConfig,
        IntegerScaleConfig,
        Recipe,
    )

    torch.manual_seed(0)
    method = spec["method"]
    t0 = time.perf_counter()
    extra: dict[str, Any] = {}
    if method == "llamacpp":
        from lowbit.models import resolve_model
        from lowbit.models.convert import ensure_converted
        from lowbit.peers.llamacpp import (
            ensure_llamacpp,
            load_llamacpp_quant,
            quantize_with_llamacpp,
        )

        source = resolve_model(spec["model"], cache=spec.get("cache"), progress=False)
        folder = (ensure_converted(source.path, source.sha256, cache=spec.get("cache"), progress=False)
                  if source.kind in ("known", "gguf") else source.path)
        tools = ensure_llamacpp(cache=spec.get("cache"), progress=False)
        gguf = quantize_with_llamacpp(folder, spec["setting"], Path(spec["work"]) / "llamacpp", tools, progress=False)
        loaded = load_llamacpp_quant(gguf, dtype=torch.float32, cache=spec.get("cache"), progress=False)
        bpw = loaded.bits_per_weight
        extra["llamacpp_tensor_types"] = loaded.tensor_types
        load_rss = _peak_rss()
    else:
        loaded = load_model(spec["model"], dtype=torch.float32, cache=spec.get("cache"), progress=False)
        load_rss = _peak_rss()
        base, _, iscale = spec["setting"].partition("-is")
        setting = None if _target_bpw(base) is not None else Setting.parse(base)
        bits, gs = (setting.bits, setting.group_size) if setting else (None, None)
        calib = CalibrationConfig(n_samples=spec["calib_samples"], seqlen=spec["calib_seqlen"],
                                  dtype=spec.get("calib_dtype", "float32"))
        t0 = time.perf_counter()
        if method == "hqq":
            from lowbit.peers import hqq_quantize_model

            names, _ = target_layers(loaded.model, Recipe(method="rtn", bits=bits, group_size=gs))
            peer = hqq_quantize_model(loaded.model, names, bits, gs, progress=False)
            bpw = peer.bits_per_weight
        else:
            if method == "budget":
                names, _ = target_layers(loaded.model, Recipe())
                target = _target_bpw(base) or _uniform_bpw(loaded.model, names, setting)
                budget = BudgetConfig(target_bpw=target, generations=spec.get("budget_generations", 10),
                                      offspring=2, search_tokens=2048)
                recipe = Recipe(method="gptq", calibration=calib, budget=budget)
            else:
                recipe = Recipe(method=method, bits=bits, group_size=gs, calibration=calib,
                                integer_scale=IntegerScaleConfig(enabled=bool(iscale), bits=int(iscale or 8)))
            res = quantize(loaded, recipe, data_dir=spec.get("data_dir"), progress=False)
            bpw = quantized_size(loaded.model).bits_per_weight
            if "budget" in res.extra:
                b = res.extra["budget"]
                extra["budget"] = {k: b[k] for k in ("target", "counts", "start", "starts", "start_kl", "final_kl",
                                                     "accepted", "confirm", "kept")}
            choices = [lr.extra["slim_choice"] for lr in res.layers.values() if "slim_choice" in lr.extra]
            if choices:
                extra["slim_choices"] = {c: choices.count(c) for c in sorted(set(choices))}
    seconds = time.perf_counter() - t0
    peak = _peak_rss()
    out = {**spec, **extra, "bits_per_weight": bpw, "quant_seconds": seconds, "peak_rss_bytes": peak,
           "load_rss_bytes": load_rss, "machine": machine(), "datasets": {}}
    for ds, ref_path in spec["references"].items():
        tokens = eval_tokens(loaded.tokenizer, ds, spec["max_tokens"], spec.get("data_dir"))
        c = compare_to_reference(loaded.model, ReferenceLogits.open(ref_path), tokens, spec["seqlen"], progress=False)
        out["datasets"][ds] = {"ppl": c.ppl, "ref_ppl": c.ref_ppl, "kl": c.kl_mean, "top1": c.top1_agreement,
                               "n_tokens_scored": c.n_tokens_scored}
    return out


def _run_in_child(spec: dict[str, Any], target=None) -> dict[str, Any]:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=target or _job, args=(spec, queue))
    proc.start()
    while True:  # a job killed without reporting (out of memory) is an error row, not a hung bench
        try:
            result = queue.get(timeout=5)
            break
        except Empty:
            if not proc.is_alive():
                return {"model": spec["model"], "method": spec["method"], "setting": spec["setting"],
                        "error": f"the job's process exited with code {proc.exitcode} before reporting "
                                 "(-9: killed, e.g. out of memory)"}
    proc.join()
    return result


def build_references(model: str, datasets: list[str], args, work: Path) -> dict[str, Any]:
    """Reference log-probs per dataset, cached under work/; returns paths and reference ppl."""
    import torch

    from lowbit.data import eval_tokens
    from lowbit.eval import ReferenceLogits
    from lowbit.eval.size import quantized_size_of_modules as quantized_size
    from lowbit.models import load_model

    ref = load_model(model, dtype=torch.float32, cache=args.cache)
    out = {"paths": {}, "ppl": {}, "sha256": ref.source.sha256, "max_tokens": args.max_tokens,
           "seqlen": args.seqlen, "reference_bytes": quantized_size(ref.model).reference_bytes}
    for ds in datasets:
        tokens = eval_tokens(ref.tokenizer, ds, args.max_tokens, args.data_dir)
        path = work / f"ref-{file_label(model)}-{ds}-{args.max_tokens}-{args.seqlen}"
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

    from lowbit.models import resolve_model

    jobs = jobs_from_args(args)
    datasets = [d for d in args.data.split(",") if d]
    if not args.render_only:
        for model in args.models:  # a model that cannot be found fails before anything is written
            resolve_model(model, cache=args.cache, progress=not args.quiet)
    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    results_path = work / "accuracy.jsonl"
    done = {}
    if results_path.exists():
        for line in results_path.read_text().splitlines():
            r = json.loads(line)
            done[_key(r)] = r
    if not args.render_only:
        with open(work / "commands.txt", "a") as f:
            f.write(command_line(args) + "\n")
        for model in args.models:
            refs = build_references(model, datasets, args, work)
            (work / f"reference-{file_label(model)}.json").write_text(json.dumps(refs, indent=2))
            for job in tqdm(jobs, desc=f"{model} jobs", disable=args.quiet):
                key = _key({"model": model, "method": job.method, "setting": job.setting,
                            "calib_dtype": args.calib_dtype})
                if key in done and "error" not in done[key]:
                    continue
                spec = {"model": model, "method": job.method, "setting": job.setting,
                        "calib_samples": args.calib_samples, "calib_seqlen": args.calib_seqlen,
                        "max_tokens": args.max_tokens, "seqlen": args.seqlen, "references": refs["paths"],
                        "cache": args.cache, "data_dir": args.data_dir, "work": str(work),
                        "budget_generations": args.budget_generations, "calib_dtype": args.calib_dtype}
                if job.method != "llamacpp" and _target_bpw(job.setting) is None:
                    s = Setting.parse(job.setting.partition("-is")[0])
                    spec.update(bits=s.bits, group_size=s.group_size)
                r = _run_in_child(spec)
                if job.method in CALIBRATED:
                    r["calib_dtype"] = args.calib_dtype
                done[_key(r)] = r
                with open(results_path, "a") as f:
                    f.write(json.dumps(r) + "\n")
    if results_path.exists():  # another run may have added results meanwhile
        for line in results_path.read_text().splitlines():
            r = json.loads(line)
            done.setdefault(_key(r), r)
    out = Path(args.output)
    section = render(args, datasets, done, work, plot_dir=out.parent)
    _write_section(out, section)
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
    if getattr(args, "suite", None):
        what = f"--suite {args.suite} --budget-generations {args.budget_generations}"
    elif getattr(args, "jobs", None):
        what = f"--jobs {args.jobs}"
    else:
        what = f"--settings {args.settings} --methods {args.methods}"
    return (f"lowbit bench accuracy {' '.join(args.models)} {what} "
            f"--data {args.data} --max-tokens {args.max_tokens} --seqlen {args.seqlen} "
            f"--calib-samples {args.calib_samples} --calib-seqlen {args.calib_seqlen} --work-dir {args.work_dir}"
            + (f" --calib-dtype {args.calib_dtype}" if getattr(args, "calib_dtype", "float32") != "float32" else ""))


CALIBRATED = ("gptq", "awq", "awq-gptq", "slim", "awq-slim", "budget")


def _notes(r: dict[str, Any]) -> str:
    if r["method"] == "budget" and "budget" in r:
        b = r["budget"]
        counts = " ".join(f"{k}x{v}" for k, v in sorted(b["counts"].items()))
        kl = ""
        if b.get("start_kl") is not None:
            unseen = (f"unseen {b['confirm']['start']:.3f}->{b['confirm']['searched']:.3f}: kept the {b['kept']}"
                      if b["confirm"] else "no offspring beat it: kept the start")
            kl = (f"; search from {b['start']} (best of {len(b['starts'])} starts), KL {b['start_kl']:.3f}->"
                  f"{b['final_kl']:.3f}, {unseen}")
        elif b.get("only_fit"):
            kl = "; the only allocation that fits, so nothing was searched"
        return f"size of {r['setting']}: {counts}{kl}"
    if r["method"] == "llamacpp":
        types = " ".join(f"{k}x{v}" for k, v in sorted(r.get("llamacpp_tensor_types", {}).items()))
        return f"llama.cpp {r['setting']} of the same reference; block tensors stored as {types}"
    if r["method"] == "hqq":
        return "hqq 0.2.8, float zero"
    if r["method"] == "slim" and r.get("slim_choices"):
        return "layers kept: " + ", ".join(f"{k} x{v}" for k, v in r["slim_choices"].items())
    return ""


def machines_note(rows: list[dict[str, Any]]) -> tuple[str, dict[str, int]]:
    """The machine sentence for a table and, when its rows come from several machines, their numbers.

    Rows are kept across sessions, and sessions do not always get the same CPU; a row records the
    machine it ran on (rows older than that field get `LEGACY_MACHINE`).
    """
    seen = list(dict.fromkeys(r.get("machine", LEGACY_MACHINE) for r in rows)) or [machine()]
    if len(seen) == 1:
        return f"Machine: {seen[0]}.", {}
    numbers = {m: i + 1 for i, m in enumerate(seen)}
    listed = "; ".join(f"({i}) {m}" for m, i in numbers.items())
    return (f"Machines (the `machine` column; compare times only between rows of one machine): {listed}.",
            numbers)


# The CPU of sessions 1-5, which wrote rows before they recorded their machine.
LEGACY_MACHINE = "AMD EPYC, 2 cores, torch 2.13.0+cpu, CPU capability AVX2"


def render(args, datasets: list[str], results: dict, work: Path, plot_dir: Path | None = None) -> str:
    commands = list(dict.fromkeys((work / "commands.txt").read_text().splitlines()))
    models = list(dict.fromkeys([k[0] for k in results] + list(args.models)))
    machines, numbers = machines_note(list(results.values()))
    lines = [
        "## Accuracy: reference vs lowbit's methods and the peers",
        "",
        "Commands (results accumulate in the work folder; a job already done is not rerun):",
        "",
        *[f"    {c}" for c in commands],
        "",
        (f"{machines} Compute dtype float32. Evaluation: the first N tokens of each dataset "
        "(N and the window length are given per model) in non-overlapping windows (C4: documents "
        "1000-1999 of c4-validation-2k.jsonl); KL(reference || model) in nats per token and top-1 "
        "agreement on the same token ids. Calibration: the `calib` column, samples x tokens drawn from C4 "
        "documents 0-999, seed 0. lowbit's formats: asymmetric, integer zero points, float16 scales, clipping "
        "search; GPTQ damp 0.01, true-sequential, no act-order. awq-gptq: AWQ smoothing (alpha grid 20, "
        "2048 sampled tokens) then GPTQ. slim: SliM-LLM widths per column group (setting = average code width), "
        "GPTQ inside; awq-slim: the same after AWQ's smoothing (searched one bit above the average's floor). "
        "budget: per-layer bit width and group size for the size of the named uniform format "
        "(or the bits per weight named, e.g. 2.92bpw) "
        "(candidate starts: greedy allocations on each layer's output error, raw and rescaled by a per-layer KL "
        "probe, and the uniform levels that fit; the best by KL on held-out calibration windows, then an evolutionary "
        "search, kept only if it also wins on unseen windows), GPTQ. "
        "HQQ 0.2.8 (data-free, its default optimizer, float zero and scale per group). llamacpp: llama.cpp's "
        "converter and quantizer (from the llama-cpp-python source release) on the same reference, loaded back "
        "through transformers' GGUF dequantization. Bits per weight count scales and zeros (llama.cpp: the "
        "decoder-block weight tensors' bytes). Quantization time and peak RSS are of a fresh child process per "
        "job (model load included in the RSS)."),
        "",
        ("The reference is the GGUF model dequantized to float32: it was already quantized upstream "
        "(SmolLM2: Q4_1, asymmetric 4-bit g32; Qwen2.5-Coder: Q4_K/Q6_K), so these numbers measure "
        "the cost of re-quantizing it, not of quantizing an original bf16 checkpoint."),
        "",
    ]
    for model in models:
        ref = json.loads((work / f"reference-{file_label(model)}.json").read_text())
        head = "| method | setting | bits/weight | " + " | ".join(
            f"{d} ppl | {d} KL | {d} top-1" for d in datasets) + " | quant time (s) | peak RSS (GiB) | calib | notes |"
        if numbers:
            head += " machine |"
        lines += [f"### {model}", "",
                  (f"Evaluation: first {ref['max_tokens']} tokens per dataset, windows of {ref['seqlen']}; "
                  f"reference sha256 {ref['sha256'][:16]}..."), "", head, "|" + "---|" * (3 + 3 * len(datasets) + 4 + bool(numbers))]
        lines.append("| reference | fp32 | 32 | " + " | ".join(f"{ref['ppl'][d]:.3f} | 0 | 1" for d in datasets)
                     + " | - | - | - | |" + (" |" if numbers else ""))
        rows = sorted((r for k, r in results.items() if k[0] == model),
                      key=lambda r: (-(r.get("bits_per_weight") or 0), METHODS.index(r["method"])))
        for r in rows:
            setting = _key(r)[2]
            if "error" in r:
                lines.append(f"| {r['method']} | {setting} | failed: {r['error']} |")
                continue
            cells = " | ".join(
                f"{r['datasets'][d]['ppl']:.3f} | {r['datasets'][d]['kl']:.4f} | {r['datasets'][d]['top1']:.3f}"
                if d in r["datasets"] else "- | - | -" for d in datasets)
            calib = f"{r['calib_samples']}x{r['calib_seqlen']}" if r["method"] in CALIBRATED else "none"
            if r["method"] in CALIBRATED and r.get("calib_dtype", "float32") != "float32":
                calib += f" ({r['calib_dtype']} forwards)"
            lines.append(f"| {r['method']} | {setting} | {r['bits_per_weight']:.3f} | {cells} | "
                         f"{r['quant_seconds']:.0f} | {r['peak_rss_bytes'] / 2**30:.2f} | {calib} | {_notes(r)} |"
                         + (f" {numbers[r.get('machine', LEGACY_MACHINE)]} |" if numbers else ""))
        lines.append("")
        if plot_dir is not None and datasets:
            png = plot_pareto(model, [r for r in rows if "error" not in r], ref, datasets[0], plot_dir)
            if png is not None:
                lines += [f"![{datasets[0]} perplexity against bits per weight, {model}]({png.name})", ""]
    return "\n".join(lines)


def pareto_front(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """The points no other point beats on both size and perplexity, by increasing size. Sizes
    equal to 3 decimals count as equal (rows rebuilt from rendered tables carry rounded sizes)."""
    front: list[tuple[float, float]] = []
    for x, y in sorted(points, key=lambda p: (round(p[0], 3), p[1])):
        if not front or y < front[-1][1]:
            front.append((x, y))
    return front


def plot_pareto(model: str, rows: list[dict[str, Any]], ref: dict[str, Any], dataset: str, out_dir: Path) -> Path | None:
    """Perplexity against bits per weight, one marker per method, the Pareto front drawn; PNG path."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    rows = [r for r in rows if dataset in r["datasets"]]
    if not rows:
        return None
    fig, ax = plt.subplots(figsize=(7, 4.5))
    markers = dict(zip(METHODS, "os^vDP*Xh"))
    for method in METHODS:
        pts = [(r["bits_per_weight"], r["datasets"][dataset]["ppl"]) for r in rows if r["method"] == method]
        if pts:
            ax.scatter(*zip(*pts), marker=markers[method], label=method, s=36)
    front = pareto_front([(r["bits_per_weight"], r["datasets"][dataset]["ppl"]) for r in rows])
    ax.plot(*zip(*front), color="gray", lw=1, ls="--", label="Pareto front")
    ax.axhline(ref["ppl"][dataset], color="black", lw=0.8, ls=":", label="reference")
    ax.set_yscale("log")
    ax.set_xlabel("bits per weight (scales and zeros counted)")
    ax.set_ylabel(f"{dataset} perplexity (log scale)")
    ax.set_title(f"{model}: first {ref['max_tokens']} tokens, windows of {ref['seqlen']}")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"BENCHMARKS-pareto-{file_label(model)}.png"
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


MARK_BEGIN = "<!-- bench:accuracy:begin -->"
MARK_END = "<!-- bench:accuracy:end -->"


def _write_section(path: Path, section: str, name: str = "accuracy") -> None:
    """Replace the `name` section of the file (between its markers), keeping everything else."""
    begin, end = f"<!-- bench:{name}:begin -->", f"<!-- bench:{name}:end -->"
    block = f"{begin}\n{section}\n{end}\n"
    text = path.read_text() if path.exists() else "# lowbit benchmarks\n\n"
    if begin in text and end in text:
        a = text.index(begin)
        b = text.index(end) + len(end) + 1
        text = text[:a] + block + text[b:]
    else:
        text = text.rstrip("\n") + "\n\n" + block
    path.write_text(text)
