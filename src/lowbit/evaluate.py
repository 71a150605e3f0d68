"""Evaluate a model or a checkpoint: perplexity per dataset, and against a reference model the
KL divergence and top-1 agreement on the same windows, plus size accounting.

    result = evaluate(target, ["wikitext2"], max_tokens=32768, reference=ref)

`target` and `reference` are anything with `.model` and `.tokenizer` (a LoadedModel or a
LoadedCheckpoint). Both run in the same dtype.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from lowbit.data import eval_tokens
from lowbit.errors import ConfigError
from lowbit.eval import compare_to_reference, default_seqlen, perplexity
from lowbit.eval.size import quantized_size

REFERENCE_NOTE = (
    "The reference is the GGUF model dequantized to float. Its weights were already quantized "
    "upstream (e.g. SmolLM2 Q4_1: 4-bit, groups of 32 with a float offset each), so a format that "
    "can follow that grid re-quantizes it losslessly at g32; compare at other group sizes and bit "
    "widths, and see BENCHMARKS.md for how integer zero points fare against it."
)


@dataclass
class DatasetResult:
    dataset: str
    seqlen: int
    n_tokens: int            # tokens evaluated (before windowing)
    n_tokens_scored: int
    ppl: float
    ref_ppl: float | None = None
    kl_mean: float | None = None
    kl_p99: float | None = None
    top1_agreement: float | None = None
    seconds: float = 0.0
    kv: str | None = None            # compressed KV cache in the loop, if any
    kv_bytes: int | None = None      # bytes it held at the end of a window
    kv_bf16_bytes: int | None = None  # a bfloat16 cache of the same tokens


@dataclass
class EvalResult:
    model: str
    dtype: str
    size: dict[str, Any]
    datasets: dict[str, DatasetResult] = field(default_factory=dict)
    reference: dict[str, Any] | None = None
    recipe: str | None = None
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def evaluate(
    target: Any,
    datasets: list[str],
    name: str,
    max_tokens: int | None = None,
    seqlen: int | None = None,
    reference: Any | None = None,
    data_dir: str | None = None,
    progress: bool = True,
    kv: str | None = None,
    kv_chunk: int = 128,
) -> EvalResult:
    model = target.model
    seqlen = seqlen or default_seqlen(model)
    if seqlen < 2:
        raise ConfigError(f"--seqlen must be >= 2, got {seqlen}")
    dtype = next(model.parameters()).dtype
    if reference is not None:
        ref_dtype = next(reference.model.parameters()).dtype
        if ref_dtype != dtype:
            raise ConfigError(f"reference runs in {ref_dtype} but the model in {dtype}; use one --dtype for both")
        if reference.model.config.vocab_size != model.config.vocab_size:
            raise ConfigError("the reference model has a different vocabulary; it is not this model's source")
    result = EvalResult(model=name, dtype=str(dtype).removeprefix("torch."), size=quantized_size(model).to_dict())
    for ds in datasets:
        tokens = eval_tokens(target.tokenizer, ds, max_tokens, data_dir)  # [1, N]
        t0 = time.perf_counter()
        stats: dict = {}
        if reference is None:
            r = perplexity(model, tokens, seqlen, progress, desc=f"{ds} ppl", kv=kv, kv_chunk=kv_chunk)
            dr = DatasetResult(ds, seqlen, tokens.shape[1], r.n_tokens_scored, r.ppl)
            stats = {"kv_bytes": r.kv_bytes, "kv_bf16_bytes": r.kv_bf16_bytes}
        else:
            c = compare_to_reference(model, reference.model, tokens, seqlen, progress, desc=f"{ds} vs reference",
                                     kv=kv, kv_chunk=kv_chunk, kv_stats=stats)
            dr = DatasetResult(ds, seqlen, tokens.shape[1], c.n_tokens_scored, c.ppl, c.ref_ppl, c.kl_mean,
                               c.kl_p99, c.top1_agreement)
        if kv:
            dr.kv, dr.kv_bytes, dr.kv_bf16_bytes = kv, stats.get("kv_bytes"), stats.get("kv_bf16_bytes")
        dr.seconds = time.perf_counter() - t0
        result.datasets[ds] = dr
    return result


def reference_result(candidate: EvalResult, reference_model: torch.nn.Module) -> EvalResult:
    """The reference's own row, from the perplexities a comparison already measured."""
    rows = {k: DatasetResult(d.dataset, d.seqlen, d.n_tokens, d.n_tokens_scored, d.ref_ppl)
            for k, d in candidate.datasets.items()}
    return EvalResult("reference", candidate.dtype, quantized_size(reference_model).to_dict(), rows)


def format_table(results: list[EvalResult]) -> str:
    """A markdown table: one row per (model, dataset)."""
    head = "| model | bits/weight | size MB | dataset | tokens | ppl | ref ppl | KL (nats) | top-1 agree |"
    rows = [head, "|" + "---|" * 9]
    for r in results:
        bpw = r.size.get("bits_per_weight")
        mb = r.size["model_bytes"] / 1e6
        bpw_s = f"{bpw:.3f}" if bpw is not None else "16"
        for d in r.datasets.values():
            ref = (f"{d.ref_ppl:.3f} | {d.kl_mean:.4f} | {d.top1_agreement:.3f}"
                   if d.kl_mean is not None else "- | - | -")
            rows.append(f"| {r.model} | {bpw_s} | {mb:.1f} | {d.dataset} | {d.n_tokens_scored} | {d.ppl:.3f} | {ref} |")
    return "\n".join(rows)


def check_no_overlap(calibration: str | None, datasets: list[str]) -> None:
    """Named datasets keep calibration and evaluation text apart by construction (data/); a local
    file used for both is refused."""
    from pathlib import Path

    from lowbit.data import DATASETS

    if calibration is None or calibration in DATASETS:
        return
    for ds in datasets:
        if ds not in DATASETS and Path(ds).resolve() == Path(calibration).resolve():
            raise ConfigError(f"{ds} was this checkpoint's calibration set; evaluating on it would overlap. "
                              "Evaluate on another --data set.")


def load_reference_for(manifest: dict[str, Any], dtype: torch.dtype, cache: str | None = None):
    """Load the model a checkpoint was made from, as recorded in its manifest.

    Known names and hub ids resolve as given; files and folders by their recorded absolute path.
    A source whose sha256 differs from the recorded one is refused: KL against another model
    would be meaningless.
    """
    from lowbit.models import load_model

    src = manifest.get("source") or {}
    spec = src.get("path") if src.get("kind") in ("gguf", "hf_folder") else src.get("spec")
    if not spec:
        raise ConfigError("the checkpoint does not record its source model; pass --reference MODEL or --reference none")
    ref = load_model(spec, dtype=dtype, cache=cache)
    if src.get("sha256") and ref.source.sha256 and ref.source.sha256 != src["sha256"]:
        raise ConfigError(
            f"the source model at {spec} has sha256 {ref.source.sha256[:16]}..., but the checkpoint was made "
            f"from {src['sha256'][:16]}...; pass the original with --reference MODEL or use --reference none"
        )
    return ref
