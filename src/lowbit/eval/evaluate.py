"""Evaluate a model or a checkpoint: perplexity per dataset, and against a reference model the
KL divergence and top-1 agreement on the same windows, plus size accounting.

    result = evaluate(target, ["wikitext2"], max_tokens=32768, reference=ref)

`target` and `reference` are anything with `.model` and `.tokenizer` (a LoadedModel or a
LoadedCheckpoint), or a model to stream one decoder block at a time (eval/streamed.py): a Skeleton
(models/skeleton.py) or a StreamedCheckpoint (eval/streamed_checkpoint.py). Both run in the same
dtype.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from lowbit.checkpoint import Source
from lowbit.data import eval_tokens
from lowbit.errors import ConfigError
from lowbit.eval import compare_to_reference, default_seqlen, perplexity
from lowbit.eval.size import QuantizedSize, model_size
from lowbit.eval.streamed import StreamedModel, check_no_kv
from lowbit.eval.streamed_checkpoint import StreamedCheckpoint
from lowbit.models.skeleton import Skeleton
from lowbit.runtime.kvcache import CacheSpec, parse_cache

log = logging.getLogger(__name__)

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
    kv: str | None = None            # the label of the compressed KV cache in the loop, if any
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

    @property
    def non_finite(self) -> bool:
        """True if any measured perplexity or KL is NaN or infinite: the result means nothing."""
        return any(not math.isfinite(v) for d in self.datasets.values()
                   for v in (d.ppl, d.ref_ppl, d.kl_mean, d.kl_p99) if v is not None)


def implausible(d: DatasetResult, vocab_size: int | None) -> list[str]:
    """What is wrong with one dataset's numbers: not finite, or a perplexity above the vocabulary
    size (worse than guessing every token uniformly, which a working model never is)."""
    problems = []
    for label, v in (("perplexity", d.ppl), ("reference perplexity", d.ref_ppl)):
        if v is None:
            continue
        if not math.isfinite(v):
            problems.append(f"{label} is {v}")
        elif vocab_size and v > vocab_size:
            problems.append(f"{label} {v:.4g} is above the vocabulary size {vocab_size} (worse than a uniform guess)")
    for label, v in (("mean KL", d.kl_mean), ("99th-percentile KL", d.kl_p99)):
        if v is not None and not math.isfinite(v):
            problems.append(f"{label} is {v}")
    return problems


def _size(target: Any) -> QuantizedSize:
    """The size `target` reports from its records (a QuantizedModel, a loaded checkpoint), else that
    of its model with nothing quantized."""
    size = getattr(target, "size", None)
    return size if isinstance(size, QuantizedSize) else model_size(target.model)


def _streams(x: Any) -> bool:
    """Whether `x` is a model to stream (a Skeleton, a StreamedCheckpoint)."""
    return isinstance(x, Skeleton | StreamedCheckpoint)


def evaluate(
    target: Any,
    datasets: list[str],
    name: str,
    max_tokens: int | None = None,
    seqlen: int | None = None,
    reference: Any | None = None,
    data_dir: str | None = None,
    progress: bool = True,
    kv: CacheSpec | str | None = None,
    kv_chunk: int = 128,
) -> EvalResult:
    """`kv`: a compressed KV cache or eviction policy in the loop, as a CacheSpec or its --kv name
    or "<policy>@<budget>" label (parsed here, once). A streamed target or reference holds one
    decoder block in memory at a time (module docstring); a streamed target runs no `kv`."""
    kv = parse_cache(kv)
    model = target.model
    candidate = StreamedModel(target) if _streams(target) else model
    check_no_kv(candidate, kv)
    seqlen = seqlen or default_seqlen(model)
    if seqlen < 2:
        raise ConfigError(f"--seqlen must be >= 2, got {seqlen}")
    dtype = next(model.parameters()).dtype
    if _streams(reference):  # one that does not fit: every window through one block at a time
        reference = StreamedModel(reference)
    if reference is not None:
        ref_dtype = next(reference.model.parameters()).dtype
        if ref_dtype != dtype:
            raise ConfigError(f"reference runs in {ref_dtype} but the model in {dtype}; use one --dtype for both")
        if reference.model.config.vocab_size != model.config.vocab_size:
            raise ConfigError("the reference model has a different vocabulary; it is not this model's source")
    result = EvalResult(model=name, dtype=str(dtype).removeprefix("torch."), size=_size(target).to_dict())
    for ds in datasets:
        tokens = eval_tokens(target.tokenizer, ds, max_tokens, data_dir)  # [1, N]
        t0 = time.perf_counter()
        stats: dict = {}
        if reference is None:
            r = perplexity(candidate, tokens, seqlen, progress, desc=f"{ds} ppl", kv=kv, kv_chunk=kv_chunk)
            dr = DatasetResult(ds, seqlen, tokens.shape[1], r.n_tokens_scored, r.ppl)
            stats = {"kv_bytes": r.kv_bytes, "kv_bf16_bytes": r.kv_bf16_bytes}
        else:
            ref = reference if isinstance(reference, StreamedModel) else reference.model
            c = compare_to_reference(candidate, ref, tokens, seqlen, progress, desc=f"{ds} vs reference",
                                     kv=kv, kv_chunk=kv_chunk, kv_stats=stats)
            dr = DatasetResult(ds, seqlen, tokens.shape[1], c.n_tokens_scored, c.ppl, c.ref_ppl, c.kl_mean,
                               c.kl_p99, c.top1_agreement)
        if kv:
            dr.kv, dr.kv_bytes, dr.kv_bf16_bytes = kv.label, stats.get("kv_bytes"), stats.get("kv_bf16_bytes")
        dr.seconds = time.perf_counter() - t0
        result.datasets[ds] = dr
        problems = implausible(dr, getattr(model.config, "vocab_size", None))
        if problems:
            note = (f"{ds}: {'; '.join(problems)}. This result is not a measurement of a working model: the "
                    "model or checkpoint is broken (NaN or overflowing weights or activations; try --dtype float32)")
            result.notes.append(note)
            log.warning("%s", note)
    return result


def reference_result(candidate: EvalResult, reference_model: torch.nn.Module) -> EvalResult:
    """The reference's own row, from the perplexities a comparison already measured."""
    rows = {k: DatasetResult(d.dataset, d.seqlen, d.n_tokens, d.n_tokens_scored, d.ref_ppl)
            for k, d in candidate.datasets.items()}
    return EvalResult("reference", candidate.dtype, model_size(reference_model).to_dict(), rows)


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


def load_reference_for(src: Source, dtype: torch.dtype, cache: str | None = None, stream: bool = False):
    """Load the model a checkpoint was made from, as recorded in its manifest (Manifest.source).

    The manifest is data from the checkpoint's author, so nothing is fetched on its word: a known
    model must already be in the cache, a file or folder must exist here at its recorded path (of
    the recorded kind), and a hub repository is refused (pass it with --reference if you trust it).
    A source whose sha256 differs from the recorded one is refused: KL against another model would
    be meaningless. With `stream`, the model comes without its weights (models/skeleton.py), to be
    evaluated one block at a time (evaluate() takes it as the reference).
    """
    from pathlib import Path

    from lowbit.errors import ModelNotFoundError
    from lowbit.models import load_model, resolve_model
    from lowbit.models.skeleton import load_skeleton

    kind = src.kind
    spec = src.path if kind in ("gguf", "hf_folder") else src.spec
    if not spec or not isinstance(spec, str):
        raise ConfigError("the checkpoint does not record its source model; pass --reference MODEL or --reference none")
    if kind == "hub":
        raise ConfigError(f"the checkpoint names the hub repository {spec!r} as its source; lowbit does not download "
                          "what a checkpoint file names. If you trust it, pass --reference "
                          f"{spec}, or use --reference none")
    if kind not in ("known", "gguf", "hf_folder"):
        raise ConfigError(f"the checkpoint records a source of unknown kind {kind!r}; pass --reference MODEL or "
                          "--reference none")
    if kind != "known" and not Path(spec).exists():
        raise ModelNotFoundError(f"the checkpoint's source model {spec} ({kind}) does not exist on this machine; pass "
                                 "--reference MODEL with a copy of it, or --reference none")
    try:
        source = resolve_model(spec, cache=cache, fetch=False, progress=False)
    except ModelNotFoundError as e:
        raise ModelNotFoundError(f"{e}; or pass --reference MODEL, or --reference none") from None
    if source.kind != kind:
        raise ConfigError(f"the checkpoint's source {spec!r} is recorded as {kind} but is a {source.kind} here; "
                          "pass --reference MODEL or --reference none")
    ref = load_skeleton(source, dtype, cache, progress=False) if stream else load_model(source, dtype=dtype, cache=cache)
    if src.sha256 and ref.source.sha256 and ref.source.sha256 != src.sha256:
        raise ConfigError(
            f"the source model at {spec} has sha256 {ref.source.sha256[:16]}..., but the checkpoint was made "
            f"from {src.sha256[:16]}...; pass the original with --reference MODEL or use --reference none"
        )
    return ref
