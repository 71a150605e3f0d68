"""The GGUF part of the accuracy section: lowbit's GGUF files against llama.cpp's quantizer.

Two views of a model's GGUF rows (llamacpp, llamacpp-imatrix, gguf-<method>, gguf-budget):

- `same_type_table`: per llama.cpp mix, the KL of each quantizer's file of that mix. Files of one
  mix hold the same block type per tensor, so they have the same size and llama.cpp runs them with
  the same kernels; only the rounding differs. The last column is lowbit's best KL over
  llama-quantize's with an importance matrix (below 1: lowbit's file is the better one).
- `plot_gguf_kl`: KL against bits per weight, one series per quantizer family, each family's
  Pareto front drawn, so that "lowbit's curve below llama.cpp's" can be read off.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lowbit.bench.accuracy_jobs import file_label

# quantizer families of the GGUF rows, in legend order
FAMILIES = {
    "llamacpp": "llama-quantize",
    "llamacpp-imatrix": "llama-quantize + imatrix",
    "gguf-rtn": "lowbit GGUF, mix (rtn)",
    "gguf-gptq": "lowbit GGUF, mix (gptq)",
    "gguf-awq-gptq": "lowbit GGUF, mix (awq-gptq)",
    "gguf-budget": "lowbit GGUF, budget",
}
LOWBIT_MIX = ("gguf-rtn", "gguf-gptq", "gguf-awq-gptq")


def _kl(r: dict[str, Any], dataset: str) -> float | None:
    got = r.get("datasets", {}).get(dataset)
    return None if got is None else got["kl"]


def same_type_table(rows: list[dict[str, Any]], dataset: str) -> list[str]:
    """Markdown lines: one row per llama.cpp mix that both llama-quantize (with an importance
    matrix) and lowbit wrote; empty when there is none."""
    mixes = sorted({r["setting"] for r in rows if r["method"] in LOWBIT_MIX}
                   & {r["setting"] for r in rows if r["method"] == "llamacpp-imatrix"})
    if not mixes:
        return []
    cols = [m for m in FAMILIES if m != "gguf-budget" and any(r["method"] == m for r in rows)]
    intro = (f"Same llama.cpp mix, same block type per tensor (so the same size and llama.cpp speed), {dataset} KL "
             "by quantizer; the last column is lowbit's best over llama-quantize + imatrix (below 1: lowbit's file "
             "is better).")
    lines = [intro, "",
             "| mix | bits/weight | " + " | ".join(FAMILIES[m] for m in cols) + " | lowbit / imatrix |",
             "|" + "---|" * (3 + len(cols))]
    for mix in mixes:
        of_mix = {r["method"]: r for r in rows if r["setting"] == mix and r["method"] in cols}
        kls = {m: _kl(r, dataset) for m, r in of_mix.items()}
        ours = [kls[m] for m in LOWBIT_MIX if kls.get(m) is not None]
        peer = kls.get("llamacpp-imatrix")
        ratio = f"{min(ours) / peer:.2f}" if ours and peer else "-"
        bpw = of_mix.get("llamacpp-imatrix", next(iter(of_mix.values())))["bits_per_weight"]
        cells = " | ".join("-" if kls.get(m) is None else f"{kls[m]:.4f}" for m in cols)
        lines.append(f"| {mix} | {bpw:.3f} | {cells} | {ratio} |")
    return [*lines, ""]


def family_fronts(rows: list[dict[str, Any]], dataset: str) -> dict[str, list[tuple[float, float, str]]]:
    """family -> its Pareto front [(bits per weight, KL, setting)] by increasing size: the rows no
    other row of the family beats on both size and KL."""
    fronts: dict[str, list[tuple[float, float, str]]] = {}
    for method in FAMILIES:
        pts = sorted((r["bits_per_weight"], _kl(r, dataset), r["setting"]) for r in rows
                     if r["method"] == method and _kl(r, dataset) is not None)
        front: list[tuple[float, float, str]] = []
        for x, y, s in pts:
            if not front or y < front[-1][1]:
                front.append((x, y, s))
        if front:
            fronts[method] = front
    return fronts


def plot_gguf_kl(model: str, rows: list[dict[str, Any]], dataset: str, out_dir: Path) -> Path | None:
    """KL (log scale) against bits per weight of the GGUF rows, one series per family; None without
    matplotlib or with fewer than two families."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.ticker import FuncFormatter
    except ImportError:
        return None
    rows = [r for r in rows if r["method"] in FAMILIES and "error" not in r and _kl(r, dataset) is not None]
    fronts = family_fronts(rows, dataset)
    if len(fronts) < 2:
        return None
    fig, ax = plt.subplots(figsize=(9, 5.2))
    markers = dict(zip(FAMILIES, "os^vDP"))
    for i, method in enumerate(FAMILIES):
        pts = [(r["bits_per_weight"], _kl(r, dataset), r["setting"]) for r in rows if r["method"] == method]
        if not pts:
            continue
        color = f"C{i}"
        ax.scatter([p[0] for p in pts], [p[1] for p in pts], marker=markers[method], color=color, s=34, zorder=3,
                   label=FAMILIES[method])
        front = fronts[method]
        ax.plot([p[0] for p in front], [p[1] for p in front], color=color, lw=1, alpha=0.7, zorder=2)
        for x, y, s in pts:
            ax.annotate(s, (x, y), textcoords="offset points", xytext=(4, 3), fontsize=6, color=color)
    ax.set_yscale("log")
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.yaxis.set_minor_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.set_xlabel("bits per weight (decoder-block tensors' bytes in the file)")
    ax.set_ylabel(f"{dataset} KL to the reference (nats/token, log scale)")
    ax.set_title(f"{model}: GGUF files, lowbit's against llama-quantize's (lower is better)", fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"BENCHMARKS-gguf-kl-{file_label(model)}.png"
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
