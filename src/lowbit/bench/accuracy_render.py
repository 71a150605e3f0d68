"""The accuracy section of BENCHMARKS.md: one table per model (the reference, then every result by
size), what was measured and how, and a plot of perplexity against bits per weight."""

from __future__ import annotations

import itertools
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lowbit.bench.accuracy_gguf import plot_gguf_kl, same_type_table
from lowbit.bench.accuracy_jobs import (
    CALIBRATED,
    GGUF_METHODS,
    METHODS,
    file_label,
    result_key,
)
from lowbit.bench.common import machine


def _budget_notes(b: dict[str, Any]) -> str:
    """A budget row's allocation and search, in a few words."""
    counts = " ".join(f"{k}x{v}" for k, v in sorted(b["counts"].items()))
    kl = ""
    if b.get("start_kl") is not None:
        unseen = (f"unseen {b['confirm']['start']:.3f}->{b['confirm']['searched']:.3f}: kept the {b['kept']}"
                  if b["confirm"] else "no offspring beat it: kept the start")
        kl = (f"; search from {b['start']} (best of {len(b['starts'])} starts), KL {b['start_kl']:.3f}->"
              f"{b['final_kl']:.3f}, {unseen}")
    elif b.get("only_fit"):
        kl = "; the only allocation that fits, so nothing was searched"
    return f"{counts}{kl}"


def _notes(r: dict[str, Any]) -> str:
    if r["method"] == "budget" and "budget" in r:
        return f"size of {r['setting']}: {_budget_notes(r['budget'])}"
    if r["method"] == "gguf-budget" and "budget" in r:
        return f"lowbit's GGUF, a block type per tensor for {r['setting']} (GPTQ rounding): {_budget_notes(r['budget'])}"
    if r["method"] in GGUF_METHODS:
        types = " ".join(f"{k}x{v}" for k, v in sorted(r.get("llamacpp_tensor_types", {}).items()))
        if r.get("on_reference") and r["on_reference"][0]:
            same, total = r["on_reference"]
            types += f"; {same} of {total} equal the reference's own values (its source grid)"
        if r["method"].startswith("gguf-"):
            return (f"lowbit's GGUF of llama.cpp's {r['setting']} mix, rounded by {r['method'][5:]}; block tensors "
                    f"stored as {types}")
        if r["method"] == "gguf":
            return f"the GGUF file as it is; block tensors stored as {types}"
        im = r.get("imatrix")
        with_im = ""
        if im:
            n = im["chunks"] * im["n_ctx"]
            run = ("reused from an earlier row" if im.get("reused", im["seconds"] < 1)
                   else f"{im['seconds']:.0f} s of the quant time")
            with_im = (f" with llama-imatrix on {im['chunks']}x{im['n_ctx']} of lowbit's calibration tokens "
                       f"({round((1 - im['token_agreement']) * n)} of the {n} ids differ; imatrix {run})")
        return f"llama.cpp {r['setting']} of the same reference{with_im}; block tensors stored as {types}"
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


# The machine given to result rows written before rows recorded theirs.
LEGACY_MACHINE = "AMD EPYC, 2 cores, torch 2.13.0+cpu, CPU capability AVX2"


# What every table measured and how: rendered under the commands, after the machine sentence.
METHOD = (
    "Compute dtype float32. Evaluation: the first N tokens of each dataset "
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
    "through transformers' GGUF dequantization; llamacpp-imatrix: the same with llama-imatrix's importance "
    "matrix, computed on lowbit's calibration windows decoded to text (chunks of calib seqlen, one per "
    "sample). Bits per weight count scales and zeros (llama.cpp: the "
    "decoder-block weight tensors' bytes). Quantization time and peak RSS are of a fresh child process per "
    "job (model load included in the RSS)."
)

# Said once above the tables: the reference is not an original bf16 checkpoint.
REFERENCE_NOTE = (
    "The reference is the GGUF model dequantized to float32: it was already quantized upstream "
    "(SmolLM2: Q4_1, asymmetric 4-bit g32; Qwen2.5-Coder: Q4_K/Q6_K), so these numbers measure "
    "the cost of re-quantizing it, not of quantizing an original bf16 checkpoint."
)


TITLES = {"accuracy": "Accuracy: reference vs lowbit's methods and the peers",
          "gguf": "GGUF files: lowbit's rounding against llama.cpp's quantizer"}


def render(run_models: list[str], datasets: list[str], results: dict, work: Path, plot_dir: Path | None = None,
           section: str = "accuracy") -> str:
    """The accuracy section: every model with results, and those of this run (`run_models`). A
    section other than "accuracy" gets its own title and plot names."""
    commands = list(dict.fromkeys((work / "commands.txt").read_text().splitlines()))
    models = list(dict.fromkeys([k[0] for k in results] + list(run_models)))
    machines, numbers = machines_note(list(results.values()))
    lines = [
        f"## {TITLES.get(section, f'Accuracy ({section})')}",
        "",
        "Commands (results accumulate in the work folder; a job already done is not rerun):",
        "",
        *[f"    {c}" for c in commands],
        "",
        f"{machines} {METHOD}",
        "",
        REFERENCE_NOTE,
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
            setting = result_key(r)[2]
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
        lines += llama_perplexity_table(ref, [r for r in rows if "llama_perplexity" in r], datasets)
        ok = [r for r in rows if "error" not in r]
        if datasets:
            lines += same_type_table(ok, datasets[0])
        if plot_dir is not None and datasets:
            gguf_plot = plot_gguf_kl(model, ok, datasets[0], plot_dir)
            if gguf_plot is not None:
                lines += [f"![{datasets[0]} KL against bits per weight of the GGUF files, {model}]({gguf_plot.name})",
                          ""]
            plot = plot_pareto(model, [r for r in rows if "error" not in r], ref, datasets[0], plot_dir,
                               stem="pareto" if section == "accuracy" else f"{section}-pareto")
            if plot is not None:
                lines += [f"![{datasets[0]} perplexity against bits per weight, {model}]({plot.path.name})", ""]
    return "\n".join(lines)


def llama_perplexity_table(ref: dict[str, Any], rows: list[dict[str, Any]], datasets: list[str]) -> list[str]:
    """The GGUF rows as llama.cpp's own evaluator, llama-perplexity, measured them (no lines if none)."""
    if not rows:
        return []
    first = next(iter(rows[0]["llama_perplexity"].values()))
    intro = (f"llama-perplexity (llama.cpp's evaluator) on the same text: {first['n_chunks']} chunks of "
             f"{first['n_ctx']} tokens, each scored on its second half ({first['n_tokens_scored']} tokens), KL and "
             "top-1 against the reference's float32 GGUF; its perplexities are not comparable with the table above.")
    lines = [intro, "", "| method | setting | bits/weight | " + " | ".join(f"{d} ppl | {d} KL | {d} top-1" for d in datasets)
             + " |", "|" + "---|" * (3 + 3 * len(datasets))]
    refs = [next((r["llama_perplexity"][d]["ref_ppl"] for r in rows if d in r["llama_perplexity"]), None)
            for d in datasets]
    lines.append("| reference | f32 GGUF | 32 | " + " | ".join("- | - | -" if p is None else f"{p:.3f} | 0 | 1"
                                                            for p in refs) + " |")
    for r in rows:
        got = r["llama_perplexity"]
        cells = " | ".join(f"{got[d]['ppl']:.3f} | {got[d]['kl']:.4f} | {got[d]['top1']:.3f}" if d in got
                           else "- | - | -" for d in datasets)
        lines.append(f"| {r['method']} | {result_key(r)[2]} | {r['bits_per_weight']:.3f} | {cells} |")
    return [*lines, ""]


def pareto_front(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """The points no other point beats on both size and perplexity, by increasing size. Sizes
    equal to 3 decimals count as equal (rows rebuilt from rendered tables carry rounded sizes)."""
    front: list[tuple[float, float]] = []
    for x, y in sorted(points, key=lambda p: (round(p[0], 3), p[1])):
        if not front or y < front[-1][1]:
            front.append((x, y))
    return front


@dataclass(frozen=True)
class ParetoPlot:
    """A written Pareto plot: its PNG, the top of its y range, and the rows above that range (drawn
    as arrows at the top edge with their values): (method, setting, bits per weight, perplexity)."""

    path: Path
    y_top: float
    above: tuple[tuple[str, str, float, float], ...]


def plot_pareto(model: str, rows: list[dict[str, Any]], ref: dict[str, Any], dataset: str, out_dir: Path,
                clip: float = 5.0, stem: str = "pareto") -> ParetoPlot | None:
    """Perplexity against bits per weight, one marker per method, the Pareto front drawn. The y
    range stops at `clip` times the reference perplexity (log scale within it, plain numbers), so
    that the informative rows get the height; rows beyond it are arrows at the top edge with their
    values. None without matplotlib or rows."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.ticker import FuncFormatter, NullFormatter
    except ImportError:
        return None
    rows = [r for r in rows if dataset in r["datasets"]]
    if not rows:
        return None
    from lowbit.bench.plotting import compact, list_above, mark_above

    ref_ppl = ref["ppl"][dataset]
    ppl = [r["datasets"][dataset]["ppl"] for r in rows]
    top = min(max(ppl), clip * ref_ppl) * 1.04
    bottom = min(min(ppl), ref_ppl) / 1.04
    fig, ax = plt.subplots(figsize=(10, 5.6))
    markers = dict(zip(METHODS, itertools.cycle("os^vDP*Xhd<>p8")))
    colors = {m: f"C{i}" for i, m in enumerate(METHODS)}
    for method in METHODS:
        pts = [(r["bits_per_weight"], p) for r, p in zip(rows, ppl) if r["method"] == method and p <= top]
        if pts:
            ax.scatter(*zip(*pts), marker=markers[method], color=colors[method], label=method, s=36, zorder=3)
    front = pareto_front([(r["bits_per_weight"], p) for r, p in zip(rows, ppl)])
    ax.plot(*zip(*front), color="gray", lw=1, ls="--", label="Pareto front", zorder=2)
    ax.axhline(ref_ppl, color="black", lw=0.8, ls=":", label="reference")
    ax.set_yscale("log")
    ax.set_ylim(bottom, top)
    x_lo, x_hi = min(r["bits_per_weight"] for r in rows), max(r["bits_per_weight"] for r in rows)
    ax.set_xlim(x_lo - 0.15, x_hi + 0.15)
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.yaxis.set_minor_formatter(NullFormatter())
    ticks = [t for t in (10, 12, 14, 16, 20, 25, 30, 40, 50, 60, 80, 100, 150, 200, 300, 500, 1000)
             if bottom <= t <= top]
    ax.set_yticks(ticks)
    above = [(r, p) for r, p in zip(rows, ppl) if p > top]
    if above:
        above.sort(key=lambda rp: (rp[0]["bits_per_weight"], rp[1]))
        mark_above(ax, [r["bits_per_weight"] for r, _ in above], [p for _, p in above],
                   [colors[r["method"]] for r, _ in above], top, stacks=False)
        list_above(ax, [f"{compact(p):>5} {r['method']} {result_key(r)[2]} ({r['bits_per_weight']:.2f})"
                        for r, p in above], [colors[r["method"]] for r, _ in above],
                   "above the range: ppl, method, setting (bits/weight)")
    ax.set_xlabel("bits per weight (scales and zeros counted)")
    ax.set_ylabel(f"{dataset} perplexity (log scale)")
    ax.set_title(f"{model}: first {ref['max_tokens']} tokens, windows of {ref['seqlen']}\n"
                 f"(y up to {clip:g}x the reference perplexity; the {len(above)} rows above it: arrows at the top, "
                 "listed on the right)", fontsize=9)
    ax.grid(True, which="major", alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"BENCHMARKS-{stem}-{file_label(model)}.png"
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return ParetoPlot(path, top, tuple((r["method"], result_key(r)[2], r["bits_per_weight"], p) for r, p in above))
