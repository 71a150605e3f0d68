"""`lowbit bench kv MODEL`: compressed KV caches side by side on one model, in one run.

For each cache (a --kv name or a "<policy>@<budget>" label, "full" for the uncompressed cache):
perplexity with the cache in the loop (each window in chunks that see earlier chunks only through
the cache), needle-in-a-haystack retrieval and LAMBADA last-word accuracy, the bytes the cache
held (measured from its tensors) and their ratio to a bfloat16 cache of the same tokens.
Results go to <work-dir>/kv.jsonl (a finished cache is not rerun), then into the "kv" section of
BENCHMARKS.md with a plot of perplexity against KV bytes.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from lowbit.bench.common import machine, write_section
from lowbit.dtypes import resolve_dtype
from lowbit.errors import ConfigError
from lowbit.memory import peak_rss_bytes
from lowbit.runtime.kvcache import POLICIES, CacheSpec, parse_cache, parse_policy
from lowbit.runtime.kvcache.spec import EvictSpec, HFQuantizedSpec

DEFAULT_CACHES = ("full,kivi8,kivi4,kivi3,kivi2,zipcache-h4-l2-r0.5,gear2-r4,hf-hqq4,hf-hqq2,"
                  "streaming@0.2,h2o@0.2,snapkv@0.2")
EVICTION = POLICIES


@dataclass(frozen=True)
class BenchCache:
    """One entry of --caches: the full cache, one of lowbit's caches (its CacheSpec), or the kvpress
    peer (kvpress:<policy>@<fraction>). `label` is the text it was given as, which keys its results."""

    label: str
    spec: CacheSpec | None = None   # lowbit's cache; None for "full" and for the peer
    peer: EvictSpec | None = None   # the kvpress peer's policy and budget

    @property
    def full(self) -> bool:
        return self.spec is None and self.peer is None


def parse_caches(text: str) -> tuple[BenchCache, ...]:
    """A --caches comma list -> its entries, every name validated (ConfigError naming it) before
    anything loads."""
    out = []
    for name in (c.strip() for c in text.split(",")):
        if not name:
            continue
        if name == "full":
            out.append(BenchCache(name))
        elif name.startswith("kvpress:"):
            pol, at, budget = name.removeprefix("kvpress:").partition("@")
            if pol not in EVICTION or not at:
                raise ConfigError(f"--caches {name!r}: the kvpress peer is kvpress:<{'|'.join(EVICTION)}>@<fraction>")
            out.append(BenchCache(name, peer=parse_policy(pol, budget)))
        else:
            out.append(BenchCache(name, spec=parse_cache(name)))
    if not out:
        raise ConfigError("--caches is empty: name at least one cache, e.g. full,kivi4")
    return tuple(out)


@dataclass(frozen=True)
class KVBenchOptions:
    """What one `lowbit bench kv` run measures and where it writes (the CLI builds it from its flags)."""

    model: str
    caches: tuple[BenchCache, ...] = field(default_factory=lambda: parse_caches(DEFAULT_CACHES))
    data: str = "wikitext2"             # perplexity text
    max_tokens: int = 4096              # perplexity tokens (0: skip perplexity)
    seqlen: int = 2048
    chunk: int = 128                    # tokens per forward in the perplexity loop
    needle_lengths: str = "2048,4096"   # comma lists as given (empty: skip); they key the recorded results
    needle_depths: str = "0.1,0.5,0.9"
    needle_per_cell: int = 2
    needle_filler: str = "wikitext2"    # corpus the filler text is cut from
    lambada: int = 200                  # LAMBADA passages (0: skip)
    dtype: str = "float32"              # as given (results are keyed by the dtype it resolves to)
    work_dir: str = "benchmarks/results"
    output: str = "BENCHMARKS.md"
    section: str = "kv"                 # BENCHMARKS.md section (and plot suffix)
    render_only: bool = False
    cache: str | None = None            # model cache directory
    data_dir: str | None = None
    quiet: bool = False


def command_line(opts: KVBenchOptions) -> str:
    """The command that reproduces the run."""
    return (f"lowbit bench kv {opts.model} --caches {','.join(c.label for c in opts.caches)} --data {opts.data} "
            f"--max-tokens {opts.max_tokens} --seqlen {opts.seqlen} --chunk {opts.chunk} "
            f"--needle-lengths {opts.needle_lengths or repr('')} --needle-depths {opts.needle_depths} "
            f"--needle-per-cell {opts.needle_per_cell} --lambada {opts.lambada} --dtype {opts.dtype}"
            + ("" if opts.section == "kv" else f" --section {opts.section}"))


def _settings(opts: KVBenchOptions) -> dict[str, Any]:
    return {"data": opts.data, "max_tokens": opts.max_tokens, "seqlen": opts.seqlen, "chunk": opts.chunk,
            "needle": [opts.needle_lengths, opts.needle_depths, opts.needle_per_cell, opts.needle_filler],
            "lambada": opts.lambada, "dtype": str(resolve_dtype(opts.dtype)).removeprefix("torch.")}


def _load_done(path: Path, model: str, settings: dict) -> dict[str, dict]:
    done = {}
    if path.exists():
        for line in path.read_text().splitlines():
            r = json.loads(line)
            if r["model"] == model and r["settings"] == settings:
                done[r["cache"]] = r
    return done


def run_kv_bench(opts: KVBenchOptions) -> None:
    if not opts.render_only:  # a model that cannot be found fails before anything is written
        from lowbit.models import resolve_model

        resolve_model(opts.model, cache=opts.cache, progress=not opts.quiet)
    work = Path(opts.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    results_path = work / "kv.jsonl"
    settings = _settings(opts)
    done = _load_done(results_path, opts.model, settings)
    todo = [c for c in opts.caches if c.label not in done]
    if todo and not opts.render_only:
        _run(opts, todo, settings, results_path, done)
    section = render(opts, [done[c.label] for c in opts.caches if c.label in done], Path(opts.output).parent)
    write_section(Path(opts.output), section, opts.section)
    print(section)


def _run(opts: KVBenchOptions, todo: list[BenchCache], settings: dict, results_path: Path, done: dict) -> None:
    from lowbit.data import eval_text, eval_tokens, lambada_passages
    from lowbit.eval.perplexity import perplexity
    from lowbit.eval.tasks import lambada_eval, needle_cases, needle_eval
    from lowbit.eval.windows import evaluating
    from lowbit.models import load_model
    from lowbit.runtime.kvcache import full_cache_nbytes

    dtype = resolve_dtype(opts.dtype)
    progress = not opts.quiet
    lm = load_model(opts.model, dtype=dtype, cache=opts.cache, progress=progress)
    model, tok = lm.model, lm.tokenizer
    tokens = eval_tokens(tok, opts.data, opts.max_tokens, opts.data_dir) if opts.max_tokens else None
    lengths = [int(x) for x in opts.needle_lengths.split(",") if x]
    cases = []
    if lengths:
        filler_text = "".join(ch for ch in eval_text(opts.needle_filler, opts.data_dir) if not ch.isdigit())
        filler = torch.tensor(tok(filler_text[: 40 * max(lengths)], add_special_tokens=False)["input_ids"])
        cases = needle_cases(tok, filler, lengths, [float(x) for x in opts.needle_depths.split(",")],
                             opts.needle_per_cell)
    passages = lambada_passages(opts.data_dir, opts.lambada) if opts.lambada else []
    for cache in todo:
        t0 = time.perf_counter()
        if cache.peer is not None:
            r = _run_kvpress(opts, lm, tok, cache, cases, settings)
            r["seconds"] = time.perf_counter() - t0
            with results_path.open("a") as f:
                f.write(json.dumps(r) + "\n")
            done[cache.label] = r
            continue
        kv = cache.spec
        peer = kv is not None and isinstance(kv.lowbit, HFQuantizedSpec)
        with evaluating(model):
            ppl = None if tokens is None else perplexity(model, tokens, opts.seqlen, progress,
                                                         desc=f"{cache.label} ppl", kv=kv, kv_chunk=opts.chunk)
            needle = _peer_safe(peer, lambda kv=kv: needle_eval(model, tok, cases, kv, progress=progress), cases)
            lam = _peer_safe(peer, lambda kv=kv: lambada_eval(model, tok, passages, kv, progress=progress), passages)
        bf16 = full_cache_nbytes(model.config, opts.seqlen) if ppl else None  # bytes are a perplexity window's
        r = {"model": opts.model, "cache": cache.label, "settings": settings, "ppl": ppl and ppl.ppl,
             "kv_bytes": (ppl and ppl.kv_bytes) if kv else bf16, "kv_bf16_bytes": bf16,
             "tokens": ppl and ppl.n_tokens_scored,
             "needle": needle.to_dict() if needle else None, "lambada": lam.to_dict() if lam else None,
             "seconds": time.perf_counter() - t0, "peak_rss_bytes": peak_rss_bytes()}
        with results_path.open("a") as f:
            f.write(json.dumps(r) + "\n")
        done[cache.label] = r


def _peer_safe(peer: bool, task, items):
    """Run a task; a peer cache (hf-*: peer=True) that crashes on it is recorded as failed, not fatal.
    (transformers' HQQ cache packs 4-bit codes in pairs of rows and fails on odd token counts.)"""
    if not items:
        return None
    if not peer:
        return task()
    try:
        return task()
    except RuntimeError as e:
        return _Failed(f"{type(e).__name__}: {str(e)[:160]}")


class _Failed:
    def __init__(self, why: str):
        self.why = why

    def to_dict(self) -> dict:
        return {"accuracy": None, "failed": self.why}


def _run_kvpress(opts: KVBenchOptions, lm, tok, cache: BenchCache, cases, settings: dict) -> dict:
    """The kvpress peer on the same needle prompts (needle only: kvpress compresses a prompt)."""
    import re

    from lowbit.models.load import _loadable_location
    from lowbit.peers.kvpress import kvpress_needle

    folder = _loadable_location(lm.source, opts.cache, False)
    out = kvpress_needle(folder, [c.ids.tolist() for c in cases], cache.peer.policy, cache.peer.budget,
                         cache=opts.cache, progress=not opts.quiet)
    cells: dict[str, list[int]] = {}
    for case, answer in zip(cases, out["tokens"]):
        m = re.search(r"\d+", tok.decode(answer))
        cells.setdefault(f"{case.length}/{case.depth:g}", []).append(int(bool(m) and m.group(0) == case.key))
    hits = [h for v in cells.values() for h in v]
    needle = {"task": "needle", "kv": cache.label, "n": len(hits), "accuracy": sum(hits) / max(1, len(hits)),
              "kv_bytes": None, "cells": {k: sum(v) / len(v) for k, v in cells.items()}}
    return {"model": opts.model, "cache": cache.label, "settings": settings, "ppl": None, "kv_bytes": None,
            "kv_bf16_bytes": None, "tokens": None, "needle": needle, "lambada": None,
            "peer": out["versions"], "kept_after_prompt": out["kept"], "peak_rss_bytes": peak_rss_bytes()}


def _task_cell(t: dict | None, spec: str) -> str:
    if t is None:
        return "-"
    if t.get("failed"):
        return "failed (see notes)"
    return spec.format(t["accuracy"])


def _fmt(x, spec="{:.3f}"):
    return "-" if x is None else spec.format(x)


def render(opts: KVBenchOptions, rows: list[dict], plot_dir: Path) -> str:
    full = next((r for r in rows if r["cache"] == "full"), None)
    title = f"## KV cache: {opts.model}" + ("" if opts.section == "kv" else f" ({opts.section})")
    lines = [title, "", f"Command: `{command_line(opts)}`", "",
             f"Machine: {machine()}. Model weights: the dequantized GGUF reference ({opts.dtype}).", "",
             (f"- **ppl**: {opts.data}, first {opts.max_tokens} tokens, windows of {opts.seqlen}; with a compressed "
             f"cache each window runs in chunks of {opts.chunk} tokens that see earlier chunks only through the "
             "cache (the full cache runs each window in one forward; its KV bytes are those of a bfloat16 cache). Eviction budgets that are fractions "
             "apply to the tokens seen so far.") if opts.max_tokens else "- **ppl** and **KV bytes**: not run.",
             ("- **KV bytes**: held by the cache at the end of a perplexity window, measured from its tensors "
             "(codes, scales, zeros, indices, the full-precision window); ratio to a bfloat16 cache of the same "
             "tokens."),
             (f"- **needle**: pass-key retrieval, prompts of {opts.needle_lengths} tokens, depths "
             f"{opts.needle_depths}, {opts.needle_per_cell} keys per cell; filler cut from {opts.needle_filler} "
             "with its digits removed; prefill in chunks of 512, an evicting cache compressed after the prompt; "
             "exact match of the greedy answer's first number.") if opts.needle_lengths else "- **needle**: not run.",
             (f"- **LAMBADA**: first {opts.lambada} passages, greedy last word (every token) read through the cache."
              if opts.lambada else "- **LAMBADA**: not run."),
             ("- **kvpress:** rows are NVIDIA's kvpress 0.5.5 (its own virtual environment, transformers<5.3) on "
              "the same model folder and needle prompts, prefilled in one forward as kvpress requires; its "
              "ObservedAttentionPress is H2O's score with eager attention. Needle only."),
             "", "| cache | KV bytes | vs bf16 | ppl | Δppl vs full | needle | LAMBADA | wall s |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        ratio = r["kv_bytes"] / r["kv_bf16_bytes"] if r.get("kv_bytes") else None
        delta = (r["ppl"] / full["ppl"] - 1) * 100 if full and r["ppl"] is not None else None
        lines.append(
            f"| {r['cache']} | {_fmt(r.get('kv_bytes') and r['kv_bytes'] / 1e6, '{:.2f} MB')} | "
            f"{_fmt(ratio, '{:.3f}')} | {_fmt(r['ppl'])} | {_fmt(delta, '{:+.2f}%')} | "
            f"{_task_cell(r['needle'], '{:.2f}')} | {_task_cell(r['lambada'], '{:.3f}')} | {r['seconds']:.0f} |")
    drawn = plot(opts.model, rows, plot_dir, "" if opts.section == "kv" else f"-{opts.section}")
    if drawn is not None:
        lines += ["", f"![perplexity against KV bytes]({drawn.path.name})"]
    return "\n".join(lines)


def _family(cache: str) -> str:
    """Which curve a cache belongs to in the plot: the method, plus its non-default options."""
    if cache.split("@")[0] in EVICTION or cache == "full":
        return "eviction" if cache != "full" else "full"
    head, *opts = cache.split("-")
    kind = "kivi" if head.startswith(("kivi", "int")) else "zipcache" if head == "zipcache" else head.rstrip("0123456789")
    extra = [o for o in opts if o[:1] in ("a", "c", "b", "g")] if kind == "kivi" else []
    return "-".join([kind, *extra])


@dataclass(frozen=True)
class KVPlot:
    """A written KV plot: its PNG, the number each plotted cache carries (its row in the side
    table), and the caches above the left panel's y range (drawn as arrows at its top edge)."""

    path: Path
    numbers: dict[str, int]
    above: tuple[str, ...]


def _side_table(ax, pts: list[dict], numbers: dict[str, int], color: dict[str, str]) -> None:
    """The caches by number, with their bytes and perplexity, as a column of text beside the plots."""
    ax.set_axis_off()
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    step = min(0.05, 0.92 / (len(pts) + 1))
    ax.text(0.0, 0.98, f"{'#':>3}  {'cache':<24}{'MB':>6}{'ppl':>9}", family="monospace", fontsize=7.5,
            va="top", weight="bold")
    for i, r in enumerate(pts):
        ax.text(0.0, 0.98 - (i + 1) * step, f"{numbers[r['cache']]:>3}  {r['cache'][:24]:<24}"
                f"{r['kv_bytes'] / 1e6:>6.2f}{r['ppl']:>9.2f}", family="monospace", fontsize=7.5, va="top",
                color=color[r["cache"]])


def plot(model: str, rows: list[dict], out_dir: Path, suffix: str = "", clip: float = 3.0) -> KVPlot | None:
    """Perplexity against KV bytes: every cache (left; y up to `clip` times the full cache's
    perplexity, caches above it as arrows at the top edge with their value) and the low-bit ones
    within 35% of the full cache (right), uniform KIVI widths joined into lines so a mixed scheme
    can be read against them. Each point carries a number placed clear of the other points and
    numbers; the side table names the caches by number, with their bytes and perplexity."""
    pts = [r for r in rows if r.get("kv_bytes") and r.get("ppl") is not None]
    if not pts:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from lowbit.bench.plotting import mark_above, place_labels

    full = next((r for r in rows if r["cache"] == "full" and r.get("ppl")), None)
    pts = sorted(pts, key=lambda r: (r["cache"] != "full", r["kv_bytes"], r["ppl"]))
    numbers = {r["cache"]: i + 1 for i, r in enumerate(pts)}
    families = sorted({_family(r["cache"]) for r in pts})
    colors = {f: f"C{i % 10}" for i, f in enumerate(families)}
    color = {r["cache"]: colors[_family(r["cache"])] for r in pts}
    fig = plt.figure(figsize=(13, 5.2))
    grid = fig.add_gridspec(1, 3, width_ratios=(1, 1, 0.62))
    axes = [fig.add_subplot(grid[0, 0]), fig.add_subplot(grid[0, 1])]
    table = fig.add_subplot(grid[0, 2])
    base = full["ppl"] if full else min(r["ppl"] for r in pts)
    near = [r for r in pts if full is None or (r["ppl"] <= 1.35 * full["ppl"] and r["cache"] != "full")]
    above: list[dict] = []
    for ax, sel, zoom in ((axes[0], pts, False), (axes[1], near, True)):
        if not sel:
            ax.set_axis_off()
            continue
        top = max(r["ppl"] for r in sel) if zoom else min(max(r["ppl"] for r in sel), clip * base)
        shown = [r for r in sel if r["ppl"] <= top]
        if not zoom:
            above = [r for r in sel if r["ppl"] > top]
        ys = [r["ppl"] for r in shown] + ([full["ppl"]] if full else [])
        span = (top - min(ys)) or 1.0
        xs = [r["kv_bytes"] / 1e6 for r in sel] + ([full["kv_bf16_bytes"] / 1e6] if full and not zoom else [])
        xspan = (max(xs) - min(xs)) or 1.0
        ax.set_xlim(min(xs) - 0.06 * xspan, max(xs) + 0.08 * xspan)
        ax.set_ylim(min(ys) - 0.06 * span, top + 0.1 * span)
        for fam in families:
            rs = sorted((r for r in shown if _family(r["cache"]) == fam), key=lambda r: r["kv_bytes"])
            if not rs:
                continue
            line = fam.startswith("kivi") and len(rs) > 1
            ax.plot([r["kv_bytes"] / 1e6 for r in rs], [r["ppl"] for r in rs], ls="-" if line else "none",
                    color=colors[fam], label=fam, ms=6, marker="s" if fam == "eviction" else "o", zorder=3)
        if full:
            ax.axhline(full["ppl"], color="grey", ls="--", lw=1, label="full cache's perplexity")
        place_labels(ax, [(r["kv_bytes"] / 1e6, r["ppl"]) for r in shown], [str(numbers[r["cache"]]) for r in shown],
                     [color[r["cache"]] for r in shown], fontsize=7.5)
        if not zoom and above:
            mark_above(ax, [r["kv_bytes"] / 1e6 for r in above], [r["ppl"] for r in above],
                       [color[r["cache"]] for r in above], top + 0.1 * span,
                       [f"#{numbers[r['cache']]}" for r in above])
        ax.set_xlabel("KV bytes held (MB)")
        ax.set_ylabel("perplexity")
        ax.grid(True, alpha=0.3)
    if full and full.get("kv_bf16_bytes"):
        axes[0].axvline(full["kv_bf16_bytes"] / 1e6, color="grey", ls=":", lw=1, label="bf16 cache size")
    axes[0].set_title(f"{model}: every cache (squares: eviction)" + (f"; y up to {clip:g}x the full cache" if above
                                                                     else ""), fontsize=9)
    axes[1].set_title("low-bit caches within 35% of the full cache's perplexity", fontsize=9)
    axes[0].legend(fontsize=6.5, loc="upper right")
    _side_table(table, pts, numbers, color)
    path = out_dir / f"BENCHMARKS-kv-{model}{suffix}.png"
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return KVPlot(path, numbers, tuple(r["cache"] for r in above))
