"""quantize(model, recipe): the whole weight-quantization job, joined up.

    loaded = load_model("smollm2-135m")
    result = quantize(loaded, Recipe(method="gptq", bits=4, group_size=64))
    save(result, "out/smol-w4g64")

RTN needs no data; GPTQ draws seeded calibration samples and runs the sequential pipeline
(calibration/sequential.py). quantize returns a QuantizedModel: the records ({layer name:
QuantizedWeight}), the model holding every other tensor (its quantized layers swapped for
QuantLinear by runtime/convert.py, so it runs as the reference), the per-layer reports, the
calibration and budget reports. save() and QuantizedModel.size read the records.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from lowbit.algorithms.cores import CORES
from lowbit.blockwise import (
    LayerQuantizer,
    LayerReport,
    block_prefix,
    dense_twin,
    quantize_calibrated,
    quantize_data_free,
    quantize_head,
)
from lowbit.budget.plan import BudgetReport, plan_budget
from lowbit.calibration.sequential import TAIL_BYTES
from lowbit.checkpoint import save_checkpoint
from lowbit.dtypes import all_finite
from lowbit.errors import ConfigError
from lowbit.eval.evaluate import EvalResult
from lowbit.eval.report import quantize_report
from lowbit.eval.size import QuantizedSize, dense_tensors, head_name, quantized_size
from lowbit.memory import peak_rss_bytes, rss_bytes
from lowbit.models.arch import decoder_layers, sequential_linear_groups
from lowbit.models.load import LoadedModel
from lowbit.qtensor import QuantizedWeight
from lowbit.recipes import METHODS, Allocation, LayerSpec, Recipe

_dense_twin = dense_twin  # the name tests and callers knew
from lowbit.runtime.convert import to_runtime

if TYPE_CHECKING:
    from lowbit.calibration.distributed import Communicator

log = logging.getLogger(__name__)


@dataclass
class QuantizedModel:
    """What quantize produced: the records and everything else the job knows."""

    loaded: LoadedModel             # .model holds the dense tensors; its quantized layers run as QuantLinear
    recipe: Recipe
    weights: dict[str, QuantizedWeight]  # the one record per quantized layer
    layers: dict[str, LayerReport]
    skipped: list[str]
    calibration: dict[str, Any] | None
    seconds: float
    peak_rss_bytes: int
    budget: BudgetReport | None = None
    extra: dict[str, Any] = field(default_factory=dict)  # into the manifest as they are (budget, fallbacks)
    allocation: Allocation | None = None  # the budget's level per layer (exact names), when there was a budget

    @property
    def model(self) -> nn.Module:
        return self.loaded.model

    @property
    def tokenizer(self) -> Any:
        return self.loaded.tokenizer

    @property
    def size(self) -> QuantizedSize:
        """Bits per weight and bytes, from the records and the model's other tensors."""
        return quantized_size(self.weights, dense_tensors(self.model, self.weights), head_name(self.model))

    @property
    def fallbacks(self) -> list[str]:
        """Layers the recipe asked to calibrate that were quantized round-to-nearest instead,
        because their Hessian would not factorize (see algorithms/gptq.py)."""
        return [name for name, r in self.layers.items() if r.fallback]

    def fallback_summary(self) -> str | None:
        """One line saying which layers fell back, or None when none did."""
        names = self.fallbacks
        if not names:
            return None
        shown = ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
        return (f"{len(names)} of {len(self.layers)} layers fell back to round-to-nearest because their "
                f"Hessian would not factorize even with damping raised 100x: {shown}. Their error is not "
                "compensated; check the calibration data and the model's activations (a NaN or infinite "
                "activation gives a NaN Hessian), or raise gptq.damp")

    def manifest_info(self, evaluations: list[EvalResult] = ()) -> dict[str, Any]:
        """What the checkpoint manifest records about this job."""
        s = self.loaded.source
        size = self.size
        return {
            "source": {"spec": s.spec, "name": s.name, "kind": s.kind, "path": str(s.path) if s.path else None,
                       "sha256": s.sha256},
            "recipe": self.recipe.used_dict(self.allocation),
            "calibration": self.calibration,
            "stats": {"seconds": self.seconds, "peak_rss_bytes": self.peak_rss_bytes,
                      "bits_per_weight": size.bits_per_weight, "model_bytes": size.model_bytes,
                      "reference_bytes": size.reference_bytes},
            "skipped": self.skipped,
            "layer_stats": {n: {"loss": r.loss, "damp": r.damp, **({"fallback": True} if r.fallback else {}),
                                **r.extra} for n, r in self.layers.items()},
            "evaluation": [e.to_dict() for e in evaluations],
            **self.extra,
        }


QuantizeResult = QuantizedModel  # the name before records were kept


def save(result: QuantizedModel, out_dir: str | Path, evaluations: list[EvalResult] = (), overwrite: bool = False) -> Path:
    """Write result's records and dense tensors as a checkpoint folder with its manifest and REPORT.md. `overwrite` replaces
    an earlier lowbit checkpoint, never the source model (checkpoint.save_checkpoint)."""
    evaluations = list(evaluations)
    source = result.loaded.source.path
    return save_checkpoint(result.weights, result.model, result.loaded.tokenizer, out_dir, result.manifest_info(evaluations),
                           report=lambda manifest: quantize_report(manifest, evaluations), overwrite=overwrite,
                           protect=[source] if source is not None else [])


def target_layers(model: nn.Module, recipe: Recipe) -> tuple[list[str], list[str]]:
    """Full names of the decoder-block linear layers to quantize, and of those the recipe skips."""
    names, skipped = [], []
    for i, block in enumerate(decoder_layers(model)):
        prefix = block_prefix(model, i)
        for group in sequential_linear_groups(block):
            for name in group:
                full = f"{prefix}.{name}"
                (skipped if recipe.is_skipped(full) else names).append(full)
    return names, skipped


def output_head(model: nn.Module) -> tuple[str, nn.Linear]:
    """(name, module) of the output head, which must not share its weight with the embeddings:
    rounding a tied head would round the embedding table with it."""
    head = model.get_output_embeddings()
    if not isinstance(head, nn.Linear):
        raise ConfigError("this model has no linear output head to quantize; drop head_bits")
    if head.weight is model.get_input_embeddings().weight:
        raise ConfigError("this model's output head shares its weight with the input embeddings (tied), so "
                          "quantizing it would quantize the embeddings too; drop head_bits for this model")
    name = next(n for n, m in model.named_modules() if m is head)
    return name, head


def with_head(model: nn.Module, recipe: Recipe) -> Recipe:
    """`recipe` with its head_bits decided for `model` (Recipe.with_head): an absent head_bits
    rounds an untied output head to 8 bits, unless the recipe's skip list names it."""
    head = model.get_output_embeddings()
    untied = (isinstance(head, nn.Linear) and head.weight is not model.get_input_embeddings().weight
              and not recipe.is_skipped(next(n for n, m in model.named_modules() if m is head)))
    return recipe.with_head(untied)


def layer_specs(model: nn.Module, names: list[str], recipe: Recipe,
                allocation: Allocation | None = None) -> dict[str, LayerSpec]:
    """Each layer's method and format, resolved for its width once (Recipe.layer_spec). Fails
    before any work if a layer's width does not fit its format."""
    return {name: recipe.layer_spec(name, model.get_submodule(name).in_features, allocation) for name in names}


def check_shapes(model: nn.Module, names: list[str], recipe: Recipe) -> None:
    """Fail before any work if a layer's width does not fit its format (layer_specs, results unused)."""
    layer_specs(model, names, recipe)


def estimate(model: nn.Module, recipe: Recipe, baseline_bytes: float | None = None,
             eval_seqlen: int | None = None, stream: bool = False) -> dict[str, float]:
    """Rough memory (bytes) and time (seconds) for the job, printed before it starts.

    Time assumes ~60 GFLOP/s of useful work in the calibration forward passes (what a 2-core AVX2
    CPU gave in fp32: smollm2-135m, 128 x 512 tokens, took ~700 s before replay), about one pass per
    block with true-sequential GPTQ (each pass after the first replays what no longer changes:
    calibration/replay.py) and two without, plus the column loop of GPTQ. AWQ adds one pass and its grid search on
    up to awq.search_tokens tokens per layer; a budget adds one pass for the sensitivities and
    generations x offspring forward passes of the whole model on budget.search_tokens tokens.
    """
    names, _ = target_layers(model, recipe)
    block_params = sum(model.get_submodule(n).weight.numel() for n in names)
    model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    est = {"model_bytes": float(model_bytes), "calib_bytes": 0.0, "hessian_bytes": 0.0, "seconds": 0.0}
    if recipe.needs_calibration:
        c = recipe.calibration
        hidden = model.config.hidden_size
        itemsize = next(model.parameters()).element_size()
        tokens = c.n_samples * c.seqlen
        est["calib_bytes"] = float(2 * tokens * hidden * itemsize)
        widest = max(model.get_submodule(n).in_features for n in names)
        est["hessian_bytes"] = float(2 * widest * widest * 4)  # H and GPTQ's one working copy
        method = METHODS[recipe.method]
        hessians = CORES[method.core].needs_hessian
        passes = (1 if recipe.gptq.true_sequential else 2) if hessians else int(method.smoothing)
        flops = passes * 2 * block_params * tokens
        column_work = block_params * 60 / 1e9 if hessians else 0.0
        if method.smoothing:
            flops += 2 * block_params * tokens + recipe.awq.grid * 2 * block_params * min(tokens, recipe.awq.search_tokens)
        if recipe.budget is not None:
            b = recipe.budget
            levels = len(b.levels)
            flops += 2 * block_params * tokens + levels * 2 * block_params * 512
            flops += b.generations * b.offspring * 2 * block_params * b.search_tokens
        est["seconds"] = flops / 60e9 + column_work
    else:
        grid = recipe.clip.grid + 1 if recipe.clip.enabled else 1
        est["seconds"] = block_params * grid * 2e-8
    est["peak_bytes"] = peak_bytes(model, recipe, block_params, est, baseline_bytes, eval_seqlen, stream)
    return est


def peak_bytes(model: nn.Module, recipe: Recipe, block_params: int, est: dict[str, float],
               baseline_bytes: float | None = None, eval_seqlen: int | None = None, stream: bool = False) -> float:
    """The job's peak resident memory, in bytes: what the process held before loading the model
    (`baseline_bytes`: torch, transformers and lowbit imported; default its size now), the model,
    and the largest of the phases that follow.

    Quantizing keeps, per quantized weight, a dense twin of the model's dtype and one byte of
    codes beside the original (the originals are memory-mapped from the file and count once they
    are read); calibration adds the block inputs, one batch of 8 samples' activations (attention
    scores, the MLP's wide products), the attention outputs and the layer inputs kept for replay and
    the Hessians; a budget holds a fake-quantized copy of
    the block weights; saving serializes the dense tensors and the packed codes in memory.
    Evaluation (`eval_seqlen`: --eval's window) loads the reference beside the quantized model
    and holds both models' logits of one window with their log-softmax. Measured against peak
    RSS on smollm2-135m (BENCHMARKS.md, "Memory: the estimate against peak RSS").
    With `stream` (streaming.py) the model's place is taken by the tensors outside the blocks but
    the embeddings (read again at the end) and the largest block; its checkpoint is joined from the
    block files one tensor at a time.
    """
    baseline = float(rss_bytes() if baseline_bytes is None else baseline_bytes)
    model_bytes = est["model_bytes"]
    itemsize = next(model.parameters()).element_size()
    cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    quantizing = block_params * (itemsize + 1)
    work = 0.0
    if recipe.needs_calibration:
        c = recipe.calibration
        batch = min(8, c.n_samples)
        heads = getattr(cfg, "num_attention_heads", 1)
        wide = getattr(cfg, "intermediate_size", 4 * cfg.hidden_size)
        # the block's inputs, the outputs calibration/replay.py keeps (one tensor of their size) and
        # its tails: the MLP's wide inputs in memory; streamed (lean replay) the attention's tail
        # stands in for its kept outputs, within calib_bytes
        tail = 0.0 if stream else min(TAIL_BYTES, 4.0 * c.n_samples * c.seqlen * wide)
        # a Hessian pass holds H with one batch's activations; GPTQ's solve holds H with its working
        # copy (hessian_bytes counts both): one or the other, never all three
        activations = 4.0 * batch * c.seqlen * (3 * wide + heads * c.seqlen + 4 * cfg.hidden_size)
        work = est["calib_bytes"] + tail + est["hessian_bytes"] / 2 + max(est["hessian_bytes"] / 2, activations)
        if recipe.budget is not None:
            work += block_params * itemsize
    dense = model_bytes - block_params * itemsize
    saving = dense + block_params * max(recipe.bits, recipe.head_bits or 0, 2) / 8
    if stream:  # streaming.py: the tensors around the blocks and one block; an untied head at the end
        blocks = [sum(p.numel() for p in b.parameters()) for b in decoder_layers(model)]
        head = model.get_output_embeddings()
        untied = head is not None and head.weight is not model.get_input_embeddings().weight
        head_params = head.weight.numel() if untied else 0
        outside = model_bytes - sum(blocks) * itemsize  # embeddings, norms, the head
        embed = model.get_input_embeddings().weight.numel()  # freed while the blocks are calibrated
        calibrating = outside - (head_params + embed) * itemsize + max(blocks) * itemsize + quantizing / len(blocks) + work
        # the end: a rounded head's record replaces its float weight before the embeddings are read
        # again (streaming._quantize_head); the join writes a tensor at a time
        head_record = head_params * recipe.head_bits / 8 if recipe.head_bits else head_params * itemsize
        peak = baseline + max(calibrating, outside - head_params * itemsize + head_record)
    else:
        peak = baseline + model_bytes + quantizing + max(work, saving)
    if eval_seqlen:
        vocab = getattr(cfg, "vocab_size", 0)
        quantized_model = dense + block_params
        # one window's logits, float32 [seqlen, vocab], held about 11 times over by the comparison
        # (both models' logits and log-softmaxes, their difference, the reference's cached copy)
        evaluation = baseline + quantized_model + model_bytes + 4.0 * eval_seqlen * vocab * 11
        peak = max(peak, evaluation)
    return float(peak)


def check_finite_weights(model: nn.Module, prefix: str = "") -> None:
    """Refuse a model with a NaN or infinite value in any floating parameter, naming the tensor
    (`prefix` before the names: the module's own name in its model): quantized, it would give NaN
    or infinite scales (and, under GPTQ, NaN Hessians). Parameters on the meta device hold no
    values and are passed over."""
    for name, p in model.named_parameters(prefix.rstrip(".")):
        if not p.is_floating_point() or p.device.type == "meta" or all_finite(p.detach()):
            continue
        n_nan, n_inf = int(torch.isnan(p).sum()), int(torch.isinf(p).sum())
        hint = (f" (in {p.dtype}, values above {torch.finfo(p.dtype).max:.0f} overflow: if the file holds "
                "larger ones, load the model with --dtype float32)") if p.element_size() < 4 else ""
        raise ConfigError(
            f"the model's tensor {name} holds {n_nan} NaN and {n_inf} infinite values (of {p.numel()}){hint}; "
            "quantizing it would give NaN or infinite scales. The model file is damaged or was saved with "
            "overflowed weights: re-download or re-export it"
        )


def quantize(
    loaded: LoadedModel,
    recipe: Recipe,
    data_dir: str | None = None,
    progress: bool = True,
    block_types: Mapping[str, str] | None = None,
    comm: Communicator | None = None,
) -> QuantizedModel:
    """Quantize loaded.model with `recipe`; returns the records and what was done. The model is
    changed in place: its quantized layers run their records as QuantLinear.

    Refuses (ConfigError) a model with a non-finite weight before any work, and any layer whose
    quantized scales are not finite once stored. Layers where GPTQ fell back to round-to-nearest
    are recorded (LayerReport.fallback, QuantizedModel.fallbacks, extra["fallbacks"]) and
    warned about once; the caller decides whether that is an error.

    `block_types` (layer name -> llama.cpp block type, for every layer quantized) makes each layer
    a BlockWeight on that type, rounded by the recipe's method (to_gguf.py writes them to a GGUF);
    those layers keep running as dense twins of their records.

    `comm` (calibration/distributed.py: join_from_env) makes this call one rank of a distributed
    job: the calibration samples and the layer solves are shared over the ranks, and every rank
    returns the same records (saving them is rank 0's: comm.lead).
    """
    model = loaded.model
    check_finite_weights(model)
    recipe = with_head(model, recipe)
    names, skipped = target_layers(model, recipe)
    if not names:
        raise ConfigError("the recipe's skip list excludes every linear layer; nothing to quantize")
    t0 = time.perf_counter()
    extra: dict[str, Any] = {}
    specs = layer_specs(model, names, recipe)
    if block_types is not None:
        specs = {n: replace(spec, block_type=block_types[n]) for n, spec in specs.items()}
    budget_report = allocation = None
    if recipe.budget is not None and comm is not None:
        raise ConfigError("a size budget (--target-bpw / --target-size) is not run distributed: its search runs the "
                          "whole model many times over in one process; run it without torchrun or --workers")
    if recipe.budget is not None:
        allocation, budget_report = plan_budget(loaded, recipe, names, data_dir, progress)
        extra["budget"] = budget_report.to_dict()
        log.info(budget_report.summary())
        specs = layer_specs(model, names, recipe, allocation)
    layers = LayerQuantizer(model, recipe, specs, comm)
    calibration = None
    if METHODS[recipe.method].needs_data:
        calibration = quantize_calibrated(layers, loaded, data_dir, progress)
    else:
        quantize_data_free(layers, names, progress)
    if recipe.head_bits:
        quantize_head(layers, *output_head(model))
    records = {n: r for n, r in layers.weights.items() if isinstance(r, QuantizedWeight)}
    to_runtime(model, records, "reference", layers.dtype)  # each dense twin (its bias the layer's) -> QuantLinear
    peak = peak_rss_bytes()
    result = QuantizedModel(loaded, recipe, layers.weights, layers.reports, skipped, calibration,
                            time.perf_counter() - t0, peak, budget_report, extra, allocation)
    if result.fallbacks:
        extra["fallbacks"] = result.fallbacks  # into the manifest with the other extras
        log.warning(result.fallback_summary())
    return result
