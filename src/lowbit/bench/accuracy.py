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
- llamacpp-imatrix              : a llama.cpp type, quantized with an importance matrix that
                                  llama-imatrix computes on lowbit's calibration windows
                                  (the run's --calib-samples x --calib-seqlen)   e.g. llamacpp-imatrix:IQ3_XXS
- gguf                          : a GGUF file of the same model, evaluated as it is   e.g. gguf:out/m.gguf
- gguf-rtn, gguf-gptq,          : lowbit's own GGUF of a llama.cpp mix (the mix's block type per tensor,
  gguf-awq-gptq                   lowbit's rounding on it)   e.g. gguf-gptq:Q3_K_M
- gguf-budget                   : lowbit's GGUF whose block type per tensor a size budget chooses (KL-scored,
                                  GPTQ rounding), bits per weight of the decoder-block tensors   e.g. gguf-budget:3.0bpw
A setting may end in -is<k> for k-bit integer group scales (Integer Scale): gptq:w4g128-is8.
`--jobs` lists them; without it, every method in --methods runs at every --settings.
`--suite methods` is the weight-methods comparison at about 4, 3, 2.5 and 2 bits per weight.
With `llama_perplexity`, the GGUF rows (llamacpp, llamacpp-imatrix, gguf) are also measured by
llama.cpp's own evaluator, llama-perplexity: perplexity, KL divergence and top-1 agreement against
the reference's float32 GGUF on the same text (see lowbit.peers.llamacpp_perplexity).
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lowbit.bench.accuracy_jobs import (
    CALIBRATED,
    DEFAULT_METHODS,
    DEFAULT_SETTINGS,
    GGUF_METHODS,
    LOWBIT_GGUF,
    Setting,
    file_label,
    result_key,
    select_jobs,
    target_bpw,
)
from lowbit.bench.accuracy_render import render
from lowbit.bench.common import machine, run_in_child, write_section
from lowbit.errors import ConfigError, DataNotFoundError
from lowbit.memory import peak_rss_bytes


@dataclass(frozen=True)
class AccuracyBenchOptions:
    """What one `lowbit bench accuracy` run does and where it writes (the CLI builds it from its
    flags). The job lists stay the comma lists given: the recorded command repeats them."""

    models: tuple[str, ...] = ("smollm2-135m",)
    settings: str = ",".join(DEFAULT_SETTINGS)   # w<bits>g<group> list, with `methods`
    methods: str = ",".join(DEFAULT_METHODS)
    jobs: str | None = None                      # METHOD:SETTING list (replaces methods x settings)
    suite: str | None = None                     # a predefined job list (see SUITES)
    budget_generations: int = 10                 # evolutionary search steps of budget jobs
    render_only: bool = False
    data: str = "wikitext2,c4"                   # evaluation datasets
    max_tokens: int = 8192                       # evaluation tokens per dataset
    seqlen: int = 2048                           # evaluation window
    calib_samples: int = 128
    calib_seqlen: int = 512
    calib_dtype: str = "float32"
    llama_perplexity: bool = False               # GGUF rows also through llama-perplexity
    work_dir: str = "benchmarks/results"
    output: str = "BENCHMARKS.md"
    section: str = "accuracy"                    # the section of `output` rewritten (its plots are named after it)
    cache: str | None = None                     # model cache directory
    data_dir: str | None = None
    quiet: bool = False


def _job(spec: dict[str, Any], queue) -> None:
    """Child process: load, quantize, compare to the cached reference; put a result dict."""
    try:
        queue.put(_run_job(spec))
    except Exception as e:  # noqa: BLE001 - reported in the table, never silently dropped
        queue.put({**spec, "error": f"{type(e).__name__}: {e}"})


def _uniform_bpw(model, names, setting: Setting) -> float:
    """Bits per weight of a uniform asymmetric format over these layers (the size a budget job matches)."""
    from lowbit.qtensor import QuantFormat, format_nbytes

    total = n = 0
    for name in names:
        lin = model.get_submodule(name)
        total += format_nbytes(lin.out_features, lin.in_features,
                               QuantFormat.resolved(lin.in_features, setting.bits, setting.group_size, False))
        n += lin.weight.numel()
    return 8 * total / n


def _reference_folder(spec: dict[str, Any]) -> Path:
    """The job's model as a Hugging Face folder (a GGUF model converted once, dequantized)."""
    from lowbit.models import resolve_model
    from lowbit.models.convert import ensure_converted

    source = resolve_model(spec["model"], cache=spec.get("cache"), progress=False)
    return Path(ensure_converted(source.path, source.sha256, cache=spec.get("cache"), progress=False)
                if source.kind in ("known", "gguf") else source.path)


def _imatrix(spec: dict[str, Any], folder: Path, tools, extra: dict[str, Any]) -> Path:
    """llama-imatrix on the reference GGUF over the windows lowbit calibrates on in this run."""
    from transformers import AutoTokenizer

    from lowbit.data import calibration_samples
    from lowbit.peers.llamacpp import convert_to_gguf
    from lowbit.peers.llamacpp_imatrix import compute_imatrix, write_calibration_text
    from lowbit.recipes import CalibrationConfig

    c = CalibrationConfig(n_samples=spec["calib_samples"], seqlen=spec["calib_seqlen"])
    tokenizer = AutoTokenizer.from_pretrained(folder)
    samples = calibration_samples(tokenizer, c.dataset, c.n_samples, c.seqlen, c.seed, data_dir=spec.get("data_dir"))
    out = Path(spec["work"]) / "llamacpp"
    tag = f"{file_label(c.dataset)}-s{c.seed}-{c.n_samples}x{c.seqlen}"
    calib = write_calibration_text(tokenizer, samples, out / f"{folder.name}.calib-{tag}.txt")
    f32 = convert_to_gguf(folder, out, tools, progress=False)
    path = out / f"{folder.name}.imatrix-{tag}.gguf"
    reused, t0 = path.is_file(), time.perf_counter()
    compute_imatrix(f32, calib, path, tools, progress=False)
    extra["imatrix"] = {"dataset": c.dataset, "seed": c.seed, "chunks": calib.n_chunks, "n_ctx": calib.n_ctx,
                        "token_agreement": calib.agreement, "chunks_equal": calib.chunks_equal,
                        "seconds": time.perf_counter() - t0, "reused": reused}
    return path


def _gguf_quantized(spec: dict[str, Any], extra: dict[str, Any]):
    """A GGUF row's file (llama.cpp's quantizer on the model, with or without an importance
    matrix, or the file a gguf job names), loaded back: (model, bits per weight, file)."""
    from lowbit.peers.llamacpp import (
        built_tools,
        convert_to_gguf,
        ensure_llamacpp,
        load_llamacpp_quant,
        quantize_with_llamacpp,
        tensors_on_reference,
    )

    if spec["method"] == "gguf":
        gguf = Path(spec["setting"])
    elif spec["method"] in LOWBIT_GGUF:
        gguf = _lowbit_gguf(spec, extra)
    else:
        folder = _reference_folder(spec)
        tools = ensure_llamacpp(cache=spec.get("cache"), progress=False)
        imatrix = _imatrix(spec, folder, tools, extra) if spec["method"] == "llamacpp-imatrix" else None
        gguf = quantize_with_llamacpp(folder, spec["setting"], Path(spec["work"]) / "llamacpp", tools,
                                      progress=False, imatrix=imatrix)
    loaded = load_llamacpp_quant(gguf, cache=spec.get("cache"), progress=False)
    extra["llamacpp_tensor_types"] = loaded.tensor_types
    tools = built_tools(spec.get("cache"))
    if tools is not None:  # the reference's own float32 GGUF needs llama.cpp's converter
        reference = convert_to_gguf(_reference_folder(spec), Path(spec["work"]) / "llamacpp", tools, progress=False)
        try:
            extra["on_reference"] = tensors_on_reference(gguf, reference)
        except ConfigError:  # a file given as it is (gguf:PATH) whose tensors are named otherwise: not counted
            pass
    return loaded, loaded.bits_per_weight, gguf


def _lowbit_gguf(spec: dict[str, Any], extra: dict[str, Any]) -> Path:
    """lowbit's own GGUF of the job's mix, rounded by the job's method, calibrated on the run's
    calibration samples (the ones llama-imatrix sees in llamacpp-imatrix rows)."""
    from lowbit.models import load_model
    from lowbit.recipes import BudgetConfig, CalibrationConfig, Recipe
    from lowbit.to_gguf import quantize_to_gguf

    method = spec["method"].removeprefix("gguf-")
    loaded = load_model(spec["model"], cache=spec.get("cache"), progress=False)
    calib = CalibrationConfig(n_samples=spec["calib_samples"], seqlen=spec["calib_seqlen"],
                              dtype=spec.get("calib_dtype", "float32"))
    if method == "budget":  # the budget chooses every block tensor's type; the rounding is GPTQ's
        budget = BudgetConfig(target_bpw=target_bpw(spec["setting"]), generations=spec.get("budget_generations", 10),
                              offspring=2, search_tokens=2048)
        mix, recipe = None, Recipe(method="gptq", calibration=calib, budget=budget)
    else:
        mix, recipe = spec["setting"], Recipe(method=method, calibration=calib)
    out = Path(spec["work"]) / "lowbit-gguf" / f"{file_label(spec['model'])}.{method}.{spec['setting']}.gguf"
    out.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    res = quantize_to_gguf(loaded, recipe, mix, out, data_dir=spec.get("data_dir"), progress=False, overwrite=True)
    extra["gguf_seconds"] = time.perf_counter() - t0
    extra["gguf_fallbacks"] = len(res.fallbacks)
    if "budget" in res.quantized.extra:
        extra["budget"] = _budget_extra(res.quantized.extra["budget"])
    return out


def _budget_extra(b: dict[str, Any]) -> dict[str, Any]:
    """What a row keeps of a budget's report."""
    return {k: b.get(k) for k in ("target", "counts", "start", "starts", "start_kl", "final_kl", "accepted",
                                  "confirm", "kept", "only_fit")}


def _eval_text_file(spec: dict[str, Any], ds: str, tokenizer, n_tokens: int, path: Path) -> Path:
    """The start of a dataset's eval text that holds about `n_tokens` tokens (and a fifth more), as
    a file for llama-perplexity: its tokenizer need not read the whole text (SentencePiece in
    llama.cpp is slow on long text) to reach the same first tokens as lowbit's evaluator."""
    from lowbit.data import eval_text, eval_tokens

    if not path.is_file():
        text = eval_text(ds, spec.get("data_dir"))
        total = eval_tokens(tokenizer, ds, None, spec.get("data_dir")).shape[1]  # cached on disk
        partial = path.with_name(f".{path.name}.{os.getpid()}.partial")
        partial.write_text(text[: int(len(text) * min(1.0, 1.2 * n_tokens / total)) + 1000], encoding="utf-8")
        os.replace(partial, path)
    return path


def _llama_perplexity(spec: dict[str, Any], gguf: Path, tokenizer) -> dict[str, Any]:
    """llama-perplexity's numbers for a GGUF file per dataset: against the reference's float32
    GGUF on the first max_tokens // seqlen chunks of seqlen tokens of the dataset's eval text."""
    from lowbit.peers.llamacpp import convert_to_gguf, ensure_llamacpp
    from lowbit.peers.llamacpp_perplexity import llama_kl_divergence, save_kl_base

    tools = ensure_llamacpp(cache=spec.get("cache"), progress=False)
    out_dir = Path(spec["work"]) / "llamacpp"
    reference = convert_to_gguf(_reference_folder(spec), out_dir, tools, progress=False)
    chunks = max(1, spec["max_tokens"] // spec["seqlen"])
    found = {}
    for ds in spec["references"]:
        name = f"{reference.stem}.{file_label(ds)}-{chunks}x{spec['seqlen']}"
        text = _eval_text_file(spec, ds, tokenizer, (chunks + 1) * spec["seqlen"], out_dir / f"{name}.txt")
        base = out_dir / f"{name}.kld-base"
        save_kl_base(reference, text, spec["seqlen"], base, tools, chunks=chunks, progress=False)
        r = llama_kl_divergence(gguf, base, tools, progress=False)
        found[ds] = {"ppl": r.ppl, "ref_ppl": r.ref_ppl, "kl": r.kl_mean, "top1": r.top1_agreement,
                     "n_ctx": r.n_ctx, "n_chunks": r.n_chunks, "n_tokens_scored": r.n_tokens_scored}
    return found


def _quantized_in_place(spec: dict[str, Any], loaded, extra: dict[str, Any]) -> float:
    """Quantize the loaded model in place by the job's method (lowbit's, or the HQQ peer); its bits
    per weight, from the records."""
    from lowbit.pipeline import quantize, target_layers
    from lowbit.recipes import (
        BudgetConfig,
        CalibrationConfig,
        IntegerScaleConfig,
        Recipe,
    )

    method = spec["method"]
    base, _, iscale = spec["setting"].partition("-is")
    setting = None if target_bpw(base) is not None else Setting.parse(base)
    bits, gs = (setting.bits, setting.group_size) if setting else (None, None)
    calib = CalibrationConfig(n_samples=spec["calib_samples"], seqlen=spec["calib_seqlen"],
                              dtype=spec.get("calib_dtype", "float32"))
    if method == "hqq":
        from lowbit.peers import hqq_quantize_model

        names, _ = target_layers(loaded.model, Recipe(method="rtn", bits=bits, group_size=gs))
        return hqq_quantize_model(loaded.model, names, bits, gs, progress=False).bits_per_weight
    if method == "budget":
        names, _ = target_layers(loaded.model, Recipe())
        target = target_bpw(base) or _uniform_bpw(loaded.model, names, setting)
        budget = BudgetConfig(target_bpw=target, generations=spec.get("budget_generations", 10),
                              offspring=2, search_tokens=2048)
        recipe = Recipe(method="gptq", calibration=calib, budget=budget, head_bits=0)
    else:
        recipe = Recipe(method=method, bits=bits, group_size=gs, calibration=calib, head_bits=0,
                        integer_scale=IntegerScaleConfig(enabled=bool(iscale), bits=int(iscale or 8)))
    # head_bits=0: the rows compare the methods on the decoder blocks, the head dense in every row
    res = quantize(loaded, recipe, data_dir=spec.get("data_dir"), progress=False)
    if "budget" in res.extra:
        extra["budget"] = _budget_extra(res.extra["budget"])
    choices = [lr.extra["slim_choice"] for lr in res.layers.values() if "slim_choice" in lr.extra]
    if choices:
        extra["slim_choices"] = {c: choices.count(c) for c in sorted(set(choices))}
    return res.size.bits_per_weight


def _run_job(spec: dict[str, Any]) -> dict[str, Any]:
    import torch

    from lowbit.data import eval_tokens
    from lowbit.eval import ReferenceLogits, compare_to_reference
    from lowbit.models import load_model

    torch.manual_seed(0)
    t0 = time.perf_counter()
    extra: dict[str, Any] = {}
    gguf = None
    if spec["method"] in GGUF_METHODS:
        loaded, bpw, gguf = _gguf_quantized(spec, extra)
        load_rss = peak_rss_bytes()
    else:
        loaded = load_model(spec["model"], dtype=torch.float32, cache=spec.get("cache"), progress=False)
        load_rss = peak_rss_bytes()
        t0 = time.perf_counter()
        bpw = _quantized_in_place(spec, loaded, extra)
    seconds = time.perf_counter() - t0
    peak = peak_rss_bytes()
    out = {**spec, **extra, "bits_per_weight": bpw, "quant_seconds": seconds, "peak_rss_bytes": peak,
           "load_rss_bytes": load_rss, "machine": machine(), "datasets": {}}
    for ds, ref_path in spec["references"].items():
        tokens = eval_tokens(loaded.tokenizer, ds, spec["max_tokens"], spec.get("data_dir"))
        c = compare_to_reference(loaded.model, ReferenceLogits.open(ref_path), tokens, spec["seqlen"], progress=False)
        out["datasets"][ds] = {"ppl": c.ppl, "ref_ppl": c.ref_ppl, "kl": c.kl_mean, "top1": c.top1_agreement,
                               "n_tokens_scored": c.n_tokens_scored}
    if gguf is not None and spec.get("with_llama_perplexity"):
        tokenizer = loaded.tokenizer
        del loaded  # llama-perplexity runs beside this process: free the dequantized model first
        out["llama_perplexity"] = _llama_perplexity(spec, gguf, tokenizer)
    return out


def _run_in_child(spec: dict[str, Any], target=None) -> dict[str, Any]:
    def died(code: int | None) -> dict[str, Any]:
        return {"model": spec["model"], "method": spec["method"], "setting": spec["setting"],
                "error": f"the job's process exited with code {code} before reporting "
                         "(-9: killed, e.g. out of memory)"}

    return run_in_child(target or _job, spec, died)


def build_references(model: str, datasets: list[str], args: AccuracyBenchOptions, work: Path) -> dict[str, Any]:
    """Reference log-probs per dataset, cached under work/; returns paths and reference ppl."""
    import torch

    from lowbit.data import eval_tokens
    from lowbit.eval import ReferenceLogits
    from lowbit.eval.size import model_size
    from lowbit.models import load_model

    ref = load_model(model, dtype=torch.float32, cache=args.cache)
    out = {"paths": {}, "ppl": {}, "sha256": ref.source.sha256, "max_tokens": args.max_tokens,
           "seqlen": args.seqlen, "reference_bytes": model_size(ref.model).reference_bytes}
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


def run_accuracy_bench(opts: AccuracyBenchOptions) -> None:
    from tqdm.auto import tqdm

    from lowbit.models import resolve_model

    jobs = select_jobs(opts.suite, opts.jobs, opts.methods, opts.settings)
    datasets = [d for d in opts.data.split(",") if d]
    if not opts.render_only:
        for model in opts.models:  # a model that cannot be found fails before anything is written
            resolve_model(model, cache=opts.cache, progress=not opts.quiet)
    work = Path(opts.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    results_path = work / "accuracy.jsonl"
    done = {}
    if results_path.exists():
        for line in results_path.read_text().splitlines():
            r = json.loads(line)
            done[result_key(r)] = r
    if not opts.render_only:
        with open(work / "commands.txt", "a") as f:
            f.write(command_line(opts) + "\n")
        for model in opts.models:
            refs = build_references(model, datasets, opts, work)
            (work / f"reference-{file_label(model)}.json").write_text(json.dumps(refs, indent=2))
            for job in tqdm(jobs, desc=f"{model} jobs", disable=opts.quiet):
                key = result_key({"model": model, "method": job.method, "setting": job.setting,
                            "calib_dtype": opts.calib_dtype})
                if key in done and "error" not in done[key] and not _lacks_llama_perplexity(done[key], opts):
                    continue
                spec = {"model": model, "method": job.method, "setting": job.setting,
                        "calib_samples": opts.calib_samples, "calib_seqlen": opts.calib_seqlen,
                        "max_tokens": opts.max_tokens, "seqlen": opts.seqlen, "references": refs["paths"],
                        "cache": opts.cache, "data_dir": opts.data_dir, "work": str(work),
                        "budget_generations": opts.budget_generations, "calib_dtype": opts.calib_dtype,
                        "with_llama_perplexity": opts.llama_perplexity}
                if job.method not in GGUF_METHODS and target_bpw(job.setting) is None:
                    s = Setting.parse(job.setting.partition("-is")[0])
                    spec.update(bits=s.bits, group_size=s.group_size)
                r = _run_in_child(spec)
                if job.method in CALIBRATED:
                    r["calib_dtype"] = opts.calib_dtype
                done[result_key(r)] = r
                with open(results_path, "a") as f:
                    f.write(json.dumps(r) + "\n")
    if results_path.exists():  # another run may have added results meanwhile
        for line in results_path.read_text().splitlines():
            r = json.loads(line)
            done.setdefault(result_key(r), r)
    out = Path(opts.output)
    section = render(list(opts.models), datasets, done, work, plot_dir=out.parent, section=opts.section)
    write_section(out, section, opts.section)
    print(section)


def _lacks_llama_perplexity(r: dict[str, Any], opts: AccuracyBenchOptions) -> bool:
    """A GGUF row done without llama-perplexity, in a run that asks for it: run it again (its
    files are cached, so only the evaluations run)."""
    return opts.llama_perplexity and r["method"] in GGUF_METHODS and "llama_perplexity" not in r


def command_line(opts: AccuracyBenchOptions) -> str:
    """The command that reproduces the run."""
    if opts.suite:
        what = f"--suite {opts.suite} --budget-generations {opts.budget_generations}"
    elif opts.jobs:
        what = f"--jobs {opts.jobs}"
    else:
        what = f"--settings {opts.settings} --methods {opts.methods}"
    return (f"lowbit bench accuracy {' '.join(opts.models)} {what} "
            f"--data {opts.data} --max-tokens {opts.max_tokens} --seqlen {opts.seqlen} "
            f"--calib-samples {opts.calib_samples} --calib-seqlen {opts.calib_seqlen} --work-dir {opts.work_dir}"
            + (f" --calib-dtype {opts.calib_dtype}" if opts.calib_dtype != "float32" else "")
            + (" --llama-perplexity" if opts.llama_perplexity else "")
            + (f" --section {opts.section}" if opts.section != "accuracy" else ""))

