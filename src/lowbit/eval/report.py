"""Human-readable reports: REPORT.md next to each checkpoint and `lowbit info`, both read from the
typed manifest (checkpoint.Manifest); record_evaluation writes an evaluation into a saved
checkpoint's manifest and REPORT.md."""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path
from typing import Any

from lowbit.checkpoint import MANIFEST, REPORT, LayerEntry, Manifest, Stats
from lowbit.eval.evaluate import REFERENCE_NOTE, EvalResult, format_table
from lowbit.outputs import write_atomically


def layer_choice(e: LayerEntry) -> str:
    """One layer's format in a few characters: w3g64, w2.50g64-mixed, w4g128-int8scale."""
    if e.group_bits is not None:
        s = f"w{e.average_bits:.2f}g{e.fmt.group_size}-mixed{min(e.group_bits)}-{max(e.group_bits)}"
    else:
        s = f"w{e.fmt.bits}g{e.fmt.group_size}"
    if e.fmt.scale_bits:
        s += f"-int{e.fmt.scale_bits}scale"
    return s


def per_layer_summary(manifest: Manifest) -> dict[str, Any]:
    """What `lowbit info --json` adds to the manifest: effective bits per weight and each layer's choice."""
    st = manifest.stats or Stats()
    return {"bits_per_weight": st.bits_per_weight, "model_bytes": st.model_bytes, "disk_bytes": st.disk_bytes,
            "per_layer": {name: layer_choice(e) for name, e in manifest.layers.items()}}


def _formats_summary(layers: dict[str, LayerEntry]) -> list[str]:
    counts = Counter(
        (layer_choice(e), "sym" if e.fmt.symmetric else "asym", "perm" if e.perm else "")
        for e in layers.values()
    )
    return [f"- {n} layers: {c}, {s}{', act-order permutation' if p else ''}"
            for (c, s, p), n in counts.most_common()]


def _provenance(m: Manifest) -> list[str]:
    src = m.source
    cal = m.calibration
    lines = [
        f"- source: `{src.spec}` ({src.kind}), sha256 `{src.sha256}`",
        f"- calibration: {cal['dataset']}, {cal['n_samples']} x {cal['seqlen']} tokens, seed {cal['seed']}"
        if cal else "- calibration: none (data-free)",
    ]
    if m.lowbit_version:
        lines.append(f"- lowbit {m.lowbit_version}, checkpoint format {m.format_version}, "
                     f"created {m.created}, dtype {m.dtype}")
    return lines


def quantize_report(m: Manifest, evals: list[EvalResult]) -> str:
    """REPORT.md: what a checkpoint is (from its manifest `m`) and how it measured (`evals`)."""
    r = m.recipe
    st = m.stats
    title = f"{r['method']} {r['bits']}-bit, group {r['group_size']}"
    if r.get("rules"):
        title = f"{r['method']}, bit width and group size chosen per layer"
    out = [
        f"# lowbit checkpoint: {title}",
        "",
        "## Result",
        f"- effective bits per weight (decoder-block layers, scales and zeros counted): {st.bits_per_weight:.3f}",
        *([(f"- output head rounded to {r['head_bits']} bits (RTN, groups of {r.get('head_group_size')}); "
            "`--head-bits 0` keeps it dense")] if r.get("head_bits") else []),
        f"- model size (quantized layers packed, other tensors at 16 bits): {st.model_bytes / 1e6:.1f} MB",
        *([(f"- on disk: {st.disk_bytes / 1e6:.1f} MB (every file of this folder; the tensors outside the "
            f"quantized layers are stored in {m.dtype})")]
          if st.disk_bytes is not None else []),
        f"- quantization wall time: {st.seconds:.1f} s, peak RSS {st.peak_rss_bytes / 2**30:.2f} GiB",
        *([(f"- **{len(m.fallbacks)} layer(s) fell back to round-to-nearest** (their Hessian would not "
            f"factorize, so their error is not compensated): {', '.join(m.fallbacks)}")]
          if m.fallbacks else []),
        "",
    ]
    if evals:
        out += ["## Accuracy against the reference", "", format_table(evals), "",
                (f"Windows of {next(iter(evals[0].datasets.values())).seqlen} tokens, dtype {evals[0].dtype}. "
                f"{REFERENCE_NOTE}"), ""]
    else:
        out += ["No evaluation was run; use `lowbit eval CHECKPOINT --data wikitext2`.", ""]
    out += ["## Layer formats", *_formats_summary(m.layers), ""] if m.layers else []
    if m.budget:
        b = m.budget
        out += ["## Budget", (f"- target {b['target']}: {b['used_bytes']} of {b['budget_bytes']} bytes for the "
                f"quantized layers ({b['bits_per_weight']:.3f} bits/weight)")]
        if b.get("start_kl") is not None:
            starts = ", ".join(f"{k} {v:.4f}" for k, v in b["starts"].items())
            out.append(f"- search: KL on held-out calibration windows {b['start_kl']:.4f} at the best start "
                       f"({b['start']}), {b['final_kl']:.4f} after the evolutionary search ({b['accepted']} "
                       f"improvements); starts scored: {starts}")
            out.append(f"- on unseen calibration windows: start {b['confirm']['start']:.4f}, searched "
                       f"{b['confirm']['searched']:.4f}; kept the {b['kept']}" if b["confirm"] else
                       "- no offspring beat the start, so there was nothing to confirm: kept the start")
        elif b.get("only_fit"):
            out.append("- the smallest level in every layer is the only allocation that fits (no layer can move up a "
                       "level within the budget), so nothing was searched; add smaller levels to give it room")
        out.append("")
    out += ["## Provenance", *_provenance(m), "", "## Recipe", "```", _recipe_lines(r), "```", ""]
    if m.skipped:
        out += ["Kept in full precision: " + ", ".join(m.skipped), ""]
    return "\n".join(out)


def record_evaluation(checkpoint: str | os.PathLike, evaluations: list[EvalResult]) -> None:
    """Write `evaluations` into a saved checkpoint's manifest ("evaluation") and REPORT.md, each
    file replaced in one rename. Neither file is in the manifest's "files", so no hash changes."""
    path = Path(checkpoint)
    manifest = Manifest.read(path).with_evaluation([e.to_dict() for e in evaluations])
    write_atomically(path / MANIFEST, manifest.to_json())
    write_atomically(path / REPORT, quantize_report(manifest, list(evaluations)))


def _recipe_lines(d: dict[str, Any], prefix: str = "") -> str:
    lines = []
    for k, v in d.items():
        if k == "rules" and len(v) > 8:
            lines.append(f"{prefix}{k} = [{len(v)} per-layer rules; see the manifest]")
        elif isinstance(v, dict):
            lines.append(_recipe_lines(v, f"{prefix}{k}."))
        else:
            lines.append(f"{prefix}{k} = {v!r}")
    return "\n".join(lines)


def _used_recipe(recipe: dict[str, Any]) -> dict[str, Any]:
    """The recipe's fields that apply to its method (Recipe.used_dict); a recipe this version
    cannot read is shown as it was written."""
    from lowbit.errors import LowbitError
    from lowbit.recipes import Recipe

    try:
        return Recipe.from_dict(recipe).used_dict()
    except (LowbitError, TypeError, ValueError):
        return recipe


def info_text(manifest: Manifest) -> str:
    """`lowbit info`: the recipe's fields that apply, one line per distinct layer format with its
    count of layers, size, files and provenance (each layer's format: `lowbit info --json`)."""
    st = manifest.stats
    lines = ["recipe:"]
    lines += ["  " + s for s in _recipe_lines(_used_recipe(manifest.recipe)).splitlines()]
    lines.append(f"layer formats ({len(manifest.layers)} quantized layers):")
    lines += ["  " + s for s in _formats_summary(manifest.layers)]
    if st:
        on_disk = f", {st.disk_bytes / 1e6:.1f} MB on disk" if st.disk_bytes is not None else ""
        lines.append(f"bits per weight: {st.bits_per_weight:.3f}; model {st.model_bytes / 1e6:.1f} MB at "
                     f"16 bits{on_disk}; quantized in {st.seconds:.1f} s")
    files = manifest.files
    lines.append("files: " + ", ".join(f"{f} {m['bytes'] / 1e6:.1f} MB" for f, m in files.items()))
    lines.append("provenance:")
    lines += ["  " + s for s in _provenance(manifest)]
    return "\n".join(lines)
