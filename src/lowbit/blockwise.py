"""The steps quantize takes per layer and per block, shared by the in-memory job (pipeline.py)
and the streamed one (streaming.py): the one dispatch of a layer to its method's core
(LayerQuantizer), what calibrating a block does (block_steps), the output head's rounding.

While a job runs, a quantized layer runs as a dense Linear holding exactly the weight its record
dequantizes to (dense_twin): the next layers and blocks are calibrated on the quantized outputs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from lowbit.algorithms.cores import CORES, LayerJob, LayerResult
from lowbit.algorithms.rtn import rtn_quantize
from lowbit.calibration.sequential import BlockSteps, run_sequential
from lowbit.calibration.smoothing import smooth_block
from lowbit.data import calibration_samples
from lowbit.errors import ConfigError
from lowbit.models.arch import decoder_layers
from lowbit.models.load import LoadedModel
from lowbit.qtensor import BlockWeight, QuantizedWeight
from lowbit.recipes import METHODS, LayerSpec, Recipe


@dataclass
class LayerReport:
    fmt: dict[str, Any]
    shape: tuple[int, int]
    loss: float | None = None       # GPTQ proxy loss
    damp: float | None = None       # damping finally used (GPTQ)
    extra: dict[str, Any] = field(default_factory=dict)  # method details (AWQ alpha, ...)
    fallback: bool = False          # GPTQ's Hessian never factorized: quantized round-to-nearest

    def to_dict(self) -> dict[str, Any]:
        return {"fmt": self.fmt, "shape": list(self.shape), "loss": self.loss, "damp": self.damp, "extra": self.extra,
                "fallback": self.fallback}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> LayerReport:
        return cls(d["fmt"], tuple(d["shape"]), d["loss"], d["damp"], d["extra"], d["fallback"])


def block_prefix(model: nn.Module, i: int) -> str:
    """The qualified name of decoder block `i` (model.layers.3)."""
    layers = decoder_layers(model)
    for name, module in model.named_modules():
        if module is layers:
            return f"{name}.{i}"
    raise ConfigError("could not locate the decoder layers in the model")



def dense_twin(lin: nn.Linear, qw: QuantizedWeight, dtype: torch.dtype) -> nn.Linear:
    """An nn.Linear computing exactly what QuantLinear.from_quantized(qw, lin.bias) computes."""
    twin = nn.Linear(lin.in_features, lin.out_features, bias=lin.bias is not None, device="meta")
    twin.weight = nn.Parameter(qw.dequantize(dtype), requires_grad=False)
    if lin.bias is not None:
        twin.bias = nn.Parameter(lin.bias.detach().to(dtype), requires_grad=False)
    return twin



class LayerQuantizer:
    """The records and reports quantize collects, layer by layer, and the one dispatch to a core."""

    def __init__(self, model: nn.Module, recipe: Recipe, specs: dict[str, LayerSpec]):
        self.model, self.recipe, self.specs = model, recipe, specs
        self.dtype = next(model.parameters()).dtype
        self.weights: dict[str, QuantizedWeight] = {}
        self.reports: dict[str, LayerReport] = {}

    def quantize(self, name: str, lin: nn.Linear, hessian: torch.Tensor | None = None,
                 inputs: torch.Tensor | None = None, details: dict[str, Any] | None = None) -> nn.Linear:
        """Quantize one layer by its method's core; returns the module to run in its place."""
        spec = self.specs[name]
        core = CORES[spec.method.core]
        if core.needs_hessian and hessian is None:
            raise ConfigError(f"method {spec.method.name!r}: its core {spec.method.core!r} needs a Hessian; "
                              "its table entry (lowbit.methods) must say needs_data=True")
        result = core.quantize(LayerJob(name, lin.weight.detach(), spec, self.recipe, hessian, inputs))
        return self.keep(name, lin, result, details or {})

    def keep(self, name: str, lin: nn.Linear, result: LayerResult, details: dict[str, Any]) -> nn.Linear:
        # While calibrating, a quantized layer runs as a dense Linear holding exactly the
        # weight its QuantLinear will dequantize (same numbers, no dequantize per call);
        # the QuantLinear modules are swapped in once every block is done.
        qw = result.qweight
        qw.check_finite(name)
        self.weights[name] = qw
        self.reports[name] = LayerReport(qw.fmt if isinstance(qw, BlockWeight) else qw.fmt.to_dict(), qw.shape, result.loss,
                                         None if result.fallback else result.damp,
                                         {**details, **result.details}, result.fallback)
        return dense_twin(lin, qw, self.dtype)


def quantize_data_free(layers: LayerQuantizer, names: list[str], progress: bool) -> None:
    """Every layer by its core, from its weight alone (no calibration data)."""
    model = layers.model
    for name in tqdm(names, desc=layers.recipe.method.upper(), unit="layer", disable=not progress):
        model.set_submodule(name, layers.quantize(name, model.get_submodule(name)))


def calibration_ids(loaded: LoadedModel, recipe: Recipe, data_dir: str | None) -> torch.Tensor:
    """The recipe's seeded calibration samples [n_samples, seqlen] (data/datasets.py)."""
    c = recipe.calibration
    return calibration_samples(loaded.tokenizer, c.dataset, c.n_samples, c.seqlen, c.seed, data_dir=data_dir)


def calibration_report(recipe: Recipe, ids: torch.Tensor) -> dict[str, Any]:
    """What the calibration was, for the manifest."""
    c = recipe.calibration
    return {"dataset": c.dataset, "n_samples": c.n_samples, "seqlen": c.seqlen, "seed": c.seed,
            "dtype": c.dtype, "n_tokens": int(ids.numel())}


def block_steps(layers: LayerQuantizer, n_tokens: int) -> BlockSteps:
    """What calibrate_block does to each block for layers.recipe: AWQ smoothing first when the
    method smooths (layers whose core needs no Hessian are quantized right after it), then each
    remaining layer by its core with its Hessian. The in-memory and the streamed jobs both run it."""
    model, recipe, specs = layers.model, layers.recipe, layers.specs
    method = METHODS[recipe.method]
    smoothed: dict[str, dict[str, Any]] = {}  # smoothing's report of layers still to quantize

    def prepare_block(i: int, block: nn.Module, run) -> dict[str, nn.Module]:
        prefix = block_prefix(model, i)
        out = {}
        for name, info in smooth_block(block, run, n_tokens, recipe.awq, prefix, specs).items():
            full = f"{prefix}.{name}"
            if CORES[specs[full].method.core].needs_hessian:
                smoothed[full] = info.report
            else:
                out[name] = layers.quantize(full, block.get_submodule(name), inputs=info.inputs, details=info.report)
        return out

    def quantize_group(i: int, linears: dict[str, nn.Linear], hessians: dict[str, torch.Tensor]):
        prefix = block_prefix(model, i)
        out = {}
        for name, lin in linears.items():
            full = f"{prefix}.{name}"
            if full in specs and full not in layers.weights:  # not skipped, nor quantized by prepare_block
                out[name] = layers.quantize(full, lin, hessians[name], details=smoothed.pop(full, {}))
        return out

    hessian_free = method.smoothing and not CORES[method.core].needs_hessian  # the smoothing step does all
    return BlockSteps(None if hessian_free else quantize_group, recipe.gptq.true_sequential,
                      prepare_block=prepare_block if method.smoothing else None)


def quantize_calibrated(layers: LayerQuantizer, loaded: LoadedModel, data_dir: str | None,
                        progress: bool) -> dict[str, Any]:
    """Every block in memory on calibration samples (calibration/sequential.py, block_steps).
    Returns what the calibration was."""
    ids = calibration_ids(loaded, layers.recipe, data_dir)
    steps = block_steps(layers, int(ids.numel()))
    run_sequential(layers.model, ids, steps.quantize_group, steps.true_sequential, progress,
                   prepare_block=steps.prepare_block, dtype=layers.recipe.calibration.dtype, replay=steps.replay,
                   tail_bytes=steps.tail_bytes)
    return calibration_report(layers.recipe, ids)


def quantize_head(layers: LayerQuantizer, name: str, lin: nn.Linear) -> None:
    """The output head `name` (recipe.head_bits): round-to-nearest, kept as a record beside the blocks'."""
    recipe = layers.recipe
    qw = rtn_quantize(lin.weight.detach(), recipe.head_format(lin.in_features),
                      recipe.clip if recipe.clip.enabled else None)
    layers.keep(name, lin, LayerResult(qw), {})
