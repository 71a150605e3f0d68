"""`lowbit bench kv MODEL`: compressed KV caches side by side on one model, in one run.

For each cache (a --kv name or a "<policy>@<budget>" label, "full" for the uncompressed cache):
perplexity with the cache in the loop (each window in chunks that see earlier chunks only through
the cache), needle-in-a-haystack retrieval and LAMBADA last-word accuracy, the bytes the cache
held (measured from its tensors) and their ratio to a bfloat16 cache of the same tokens.
Results go to <work-dir>/kv.jsonl (a finished cache is not rerun), then into the "kv" section of
BENCHMARKS.md with a plot of perplexity against KV bytes.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import torch

from lowbit.bench.common import machine, write_section
from lowbit.dtypes import add_dtype_argument, resolve_dtype
from lowbit.errors import ConfigError
from lowbit.memory import peak_rss_bytes

DEFAULT_CACHES = ("full,kivi8,kivi4,kivi3,kivi2,zipcache-h4-l2-r0.5,gear2-r4,hf-hqq4,hf-hqq2,"
                  "streaming@0.2,h2o@0.2,snapkv@0.2")
EVICTION = ("streaming", "h2o", "snapkv")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model")
    p.add_argument("--caches", default=DEFAULT_CACHES, help=f"comma list of caches (default {DEFAULT_CACHES})")
    p.add_argument("--data", default="wikitext2", help="perplexity text")
    p.add_argument("--max-tokens", type=int, default=4096, help="perplexity tokens (0: skip perplexity)")
    p.add_argument("--seqlen", type=int, default=2048)
    p.add_argument("--chunk", type=int, default=128, help="tokens per forward in the perplexity loop")
    p.add_argument("--needle-lengths", default="2048,4096", help="prompt lengths in tokens (comma list; empty: skip)")
    p.add_argument("--needle-depths", default="0.1,0.5,0.9")
    p.add_argument("--needle-per-cell", type=int, default=2)
    p.add_argument("--needle-filler", default="wikitext2", help="corpus the filler text is cut from")
    p.add_argument("--lambada", type=int, default=200, help="LAMBADA passages (0: skip)")
    add_dtype_argument(p, "float32", "the model's dtype (float32 by default, as the recorded results were "
                       "measured; results are keyed by the dtype that ran, auto resolved)")
    p.add_argument("--work-dir", default="benchmarks/results")
    p.add_argument("--output", default="BENCHMARKS.md")
    p.add_argument("--section", default="kv",
                   help="BENCHMARKS.md section (and plot suffix) to write; a second name keeps another run's table beside")
    p.add_argument("--render-only", action="store_true", help="rewrite the section from finished results")


def _settings(args) -> dict[str, Any]:
    return {"data": args.data, "max_tokens": args.max_tokens, "seqlen": args.seqlen, "chunk": args.chunk,
            "needle": [args.needle_lengths, args.needle_depths, args.needle_per_cell, args.needle_filler],
            "lambada": args.lambada, "dtype": str(resolve_dtype(args.dtype)).removeprefix("torch.")}


def _load_done(path: Path, model: str, settings: dict) -> dict[str, dict]:
    done = {}
    if path.exists():
        for line in path.read_text().splitlines():
            r = json.loads(line)
            if r["model"] == model and r["settings"] == settings:
                done[r["cache"]] = r
    return done


def run_kv_bench(args) -> None:
    from lowbit.runtime.kvcache import kv_label

    caches = [c.strip() for c in args.caches.split(",") if c.strip()]
    if not caches:
        raise ConfigError("--caches is empty: name at least one cache, e.g. full,kivi4")
    for c in caches:  # validate every name before the first model load
        if c.startswith("kvpress:"):
            pol, at, budget = c.removeprefix("kvpress:").partition("@")
            if pol not in EVICTION or not at:
                raise ConfigError(f"--caches {c!r}: the kvpress peer is kvpress:<{'|'.join(EVICTION)}>@<fraction>")
            kv_label(None, pol, budget)
        elif c != "full":
            pol, at, budget = c.partition("@")
            if at:
                kv_label(None, pol, budget)
            else:
                kv_label(c)
    if not args.render_only:  # a model that cannot be found fails before anything is written
        from lowbit.models import resolve_model

        resolve_model(args.model, cache=args.cache, progress=not args.quiet)
    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    results_path = work / "kv.jsonl"
    settings = _settings(args)
    done = _load_done(results_path, args.model, settings)
    todo = [c for c in caches if c not in done]
    if todo and not args.render_only:
        _run(args, todo, settings, results_path, done)
    section = render(args, [done[c] for c in caches if c in done], Path(args.output).parent)
    write_section(Path(args.output), section, args.section)
    print(section)


def _run(args, todo: list[str], settings: dict, results_path: Path, done: dict) -> None:
    from lowbit.data import eval_text, eval_tokens, lambada_passages
    from lowbit.eval.perplexity import perplexity
    from lowbit.eval.tasks import lambada_eval, needle_cases, needle_eval
    from lowbit.eval.windows import evaluating
    from lowbit.models import load_model
    from lowbit.runtime.kvcache import full_cache_nbytes

    dtype = resolve_dtype(args.dtype)
    progress = not args.quiet
    lm = load_model(args.model, dtype=dtype, cache=args.cache, progress=progress)
    model, tok = lm.model, lm.tokenizer
    tokens = eval_tokens(tok, args.data, args.max_tokens, args.data_dir) if args.max_tokens else None
    lengths = [int(x) for x in args.needle_lengths.split(",") if x]
    cases = []
    if lengths:
        filler_text = "".join(ch for ch in eval_text(args.needle_filler, args.data_dir) if not ch.isdigit())
        filler = torch.tensor(tok(filler_text[: 40 * max(lengths)], add_special_tokens=False)["input_ids"])
        cases = needle_cases(tok, filler, lengths, [float(x) for x in args.needle_depths.split(",")],
                             args.needle_per_cell)
    passages = lambada_passages(args.data_dir, args.lambada) if args.lambada else []
    for cache in todo:
        t0 = time.perf_counter()
        if cache.startswith("kvpress:"):
            r = _run_kvpress(args, lm, tok, cache, cases, settings)
            r["seconds"] = time.perf_counter() - t0
            with results_path.open("a") as f:
                f.write(json.dumps(r) + "\n")
            done[cache] = r
            continue
        kv = None if cache == "full" else cache
        with evaluating(model):
            ppl = None if tokens is None else perplexity(model, tokens, args.seqlen, progress, desc=f"{cache} ppl",
                                                         kv=kv, kv_chunk=args.chunk)
            needle = _peer_safe(cache, lambda kv=kv: needle_eval(model, tok, cases, kv, progress=progress), cases)
            lam = _peer_safe(cache, lambda kv=kv: lambada_eval(model, tok, passages, kv, progress=progress), passages)
        bf16 = full_cache_nbytes(model.config, args.seqlen) if ppl else None  # bytes are a perplexity window's
        r = {"model": args.model, "cache": cache, "settings": settings, "ppl": ppl and ppl.ppl,
             "kv_bytes": (ppl and ppl.kv_bytes) if kv else bf16, "kv_bf16_bytes": bf16,
             "tokens": ppl and ppl.n_tokens_scored,
             "needle": needle.to_dict() if needle else None, "lambada": lam.to_dict() if lam else None,
             "seconds": time.perf_counter() - t0, "peak_rss_bytes": peak_rss_bytes()}
        with results_path.open("a") as f:
            f.write(json.dumps(r) + "\n")
        done[cache] = r


def _peer_safe(cache: str, task, items):
    """Run a task; a peer cache (hf-*) that crashes on it is recorded as failed, not fatal.
    (transformers' HQQ cache packs 4-bit codes in pairs of rows and fails on odd token counts.)"""
    if not items:
        return None
    if not cache.startswith("hf-"):
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


def _run_kvpress(args, lm, tok, cache: str, cases, settings: dict) -> dict:
    """The kvpress peer on the same needle prompts (needle only: kvpress compresses a prompt)."""
    import re

    from lowbit.models.load import _loadable_location
    from lowbit.peers.kvpress import kvpress_needle

    press, _, budget = cache.removeprefix("kvpress:").partition("@")
    folder = _loadable_location(lm.source, args.cache, False)
    out = kvpress_needle(folder, [c.ids.tolist() for c in cases], press, float(budget), cache=args.cache,
                         progress=not args.quiet)
    cells: dict[str, list[int]] = {}
    for case, answer in zip(cases, out["tokens"]):
        m = re.search(r"\d+", tok.decode(answer))
        cells.setdefault(f"{case.length}/{case.depth:g}", []).append(int(bool(m) and m.group(0) == case.key))
    hits = [h for v in cells.values() for h in v]
    needle = {"task": "needle", "kv": cache, "n": len(hits), "accuracy": sum(hits) / max(1, len(hits)),
              "kv_bytes": None, "cells": {k: sum(v) / len(v) for k, v in cells.items()}}
    return {"model": args.model, "cache": cache, "settings": settings, "ppl": None, "kv_bytes": None,
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


def render(args, rows: list[dict], plot_dir: Path) -> str:
    full = next((r for r in rows if r["cache"] == "full"), None)
    title = f"## KV cache: {args.model}" + ("" if args.section == "kv" else f" ({args.section})")
    lines = [title, "",
             (f"Command: `lowbit bench kv {args.model} --caches {args.caches} --data {args.data} "
             f"--max-tokens {args.max_tokens} --seqlen {args.seqlen} --chunk {args.chunk} "
             f"--needle-lengths {args.needle_lengths or repr('')} --needle-depths {args.needle_depths} "
             f"--needle-per-cell {args.needle_per_cell} --lambada {args.lambada} --dtype {args.dtype}"
             + ("" if args.section == "kv" else f" --section {args.section}") + "`"), "",
             f"Machine: {machine()}. Model weights: the dequantized GGUF reference ({args.dtype}).", "",
             (f"- **ppl**: {args.data}, first {args.max_tokens} tokens, windows of {args.seqlen}; with a compressed "
             f"cache each window runs in chunks of {args.chunk} tokens that see earlier chunks only through the "
             "cache (the full cache runs each window in one forward; its KV bytes are those of a bfloat16 cache). Eviction budgets that are fractions "
             "apply to the tokens seen so far.") if args.max_tokens else "- **ppl** and **KV bytes**: not run.",
             ("- **KV bytes**: held by the cache at the end of a perplexity window, measured from its tensors "
             "(codes, scales, zeros, indices, the full-precision window); ratio to a bfloat16 cache of the same "
             "tokens."),
             (f"- **needle**: pass-key retrieval, prompts of {args.needle_lengths} tokens, depths "
             f"{args.needle_depths}, {args.needle_per_cell} keys per cell; filler cut from {args.needle_filler} "
             "with its digits removed; prefill in chunks of 512, an evicting cache compressed after the prompt; "
             "exact match of the greedy answer's first number.") if args.needle_lengths else "- **needle**: not run.",
             (f"- **LAMBADA**: first {args.lambada} passages, greedy last word (every token) read through the cache."
              if args.lambada else "- **LAMBADA**: not run."),
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
    png = plot(args.model, rows, plot_dir, "" if args.section == "kv" else f"-{args.section}")
    if png is not None:
        lines += ["", f"![perplexity against KV bytes]({png.name})"]
    return "\n".join(lines)


def _family(cache: str) -> str:
    """Which curve a cache belongs to in the plot: the method, plus its non-default options."""
    if cache.split("@")[0] in EVICTION or cache == "full":
        return "eviction" if cache != "full" else "full"
    head, *opts = cache.split("-")
    kind = "kivi" if head.startswith(("kivi", "int")) else "zipcache" if head == "zipcache" else head.rstrip("0123456789")
    extra = [o for o in opts if o[:1] in ("a", "c", "b", "g")] if kind == "kivi" else []
    return "-".join([kind, *extra])


def plot(model: str, rows: list[dict], out_dir: Path, suffix: str = "") -> Path | None:
    """Perplexity against KV bytes: every cache (left) and the low-bit ones close to the full
    cache (right), uniform KIVI widths joined into lines so a mixed scheme can be read against them."""
    pts = [r for r in rows if r.get("kv_bytes") and r.get("ppl") is not None]
    if not pts:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    full = next((r for r in rows if r["cache"] == "full" and r.get("ppl")), None)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.6))
    families = sorted({_family(r["cache"]) for r in pts})
    colors = {f: f"C{i % 10}" for i, f in enumerate(families)}
    near = [r for r in pts if full is None or (r["ppl"] <= 1.35 * full["ppl"] and r["cache"] != "full")]
    for ax, sel, small in ((axes[0], pts, False), (axes[1], near, True)):
        for fam in families:
            rs = sorted((r for r in sel if _family(r["cache"]) == fam), key=lambda r: r["kv_bytes"])
            if not rs:
                continue
            xs, ys = [r["kv_bytes"] / 1e6 for r in rs], [r["ppl"] for r in rs]
            line = fam.startswith("kivi") and len(rs) > 1
            ax.plot(xs, ys, ls="-" if line else "none", color=colors[fam], label=fam, ms=5,
                    marker="s" if fam == "eviction" else "o")
            for i, r in enumerate(rs):
                ax.annotate(r["cache"], (xs[i], ys[i]), fontsize=6 if small else 7,
                            xytext=(4, 4 if i % 2 else -9), textcoords="offset points")
        if full:
            ax.axhline(full["ppl"], color="grey", ls="--", lw=1, label="full cache")
        ax.set_xlabel("KV bytes held (MB)")
        ax.set_ylabel("perplexity")
    axes[0].set_yscale("log")
    if full and full.get("kv_bf16_bytes"):
        axes[0].axvline(full["kv_bf16_bytes"] / 1e6, color="grey", ls=":", lw=1, label="bf16 cache size")
    axes[0].set_title(f"{model}: every cache (squares: eviction)", fontsize=9)
    axes[1].set_title("low-bit caches within 35% of the full cache's perplexity", fontsize=9)
    axes[1].legend(fontsize=6, loc="upper right")
    path = out_dir / f"BENCHMARKS-kv-{model}{suffix}.png"
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
