"""The steps quantize takes per layer and per block, shared by the in-memory job (pipeline.py)
and the streamed one (streaming.py): the one dispatch of a layer to its method's core
(LayerQuantizer), what calibrating a block does (block_steps), the output head's rounding.

While a job runs, a quantized layer runs as a dense Linear holding exactly the weight its record
dequantizes to (dense_twin): the next layers and blocks are calibrated on the quantized outputs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

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

if TYPE_CHECKING:
    from lowbit.calibration.distributed import Communicator


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



@dataclass
class LayerTask:
    """One layer to quantize by LayerQuantizer.quantize_all: its Hessian or smoothed inputs when its core takes them."""

    name: str
    lin: nn.Linear
    hessian: torch.Tensor | None = None
    inputs: torch.Tensor | None = None
    details: dict[str, Any] = field(default_factory=dict)


class LayerQuantizer:
    """The records and reports quantize collects, layer by layer, and the one dispatch to a core.
    With `comm` (a rank of a distributed job), quantize_all shares the layers out over the ranks."""

    def __init__(self, model: nn.Module, recipe: Recipe, specs: dict[str, LayerSpec], comm: Communicator | None = None):
        self.model, self.recipe, self.specs, self.comm = model, recipe, specs, comm
        self.dtype = next(model.parameters()).dtype
        self.weights: dict[str, QuantizedWeight] = {}
        self.reports: dict[str, LayerReport] = {}
        self._turn = 0  # the rank that solves the next layer, round-robin over the job (quantize_all)

    def quantize(self, name: str, lin: nn.Linear, hessian: torch.Tensor | None = None,
                 inputs: torch.Tensor | None = None, details: dict[str, Any] | None = None) -> nn.Linear:
        """Quantize one layer by its method's core; returns the module to run in its place."""
        return self.keep(name, lin, self.solve(LayerTask(name, lin, hessian, inputs)), details or {})

    def solve(self, task: LayerTask) -> LayerResult:
        """One layer's result by its method's core."""
        spec = self.specs[task.name]
        core = CORES[spec.method.core]
        if core.needs_hessian and task.hessian is None:
            raise ConfigError(f"method {spec.method.name!r}: its core {spec.method.core!r} needs a Hessian; "
                              "its table entry (lowbit.methods) must say needs_data=True")
        return core.quantize(LayerJob(task.name, task.lin.weight.detach(), spec, self.recipe, task.hessian, task.inputs))

    def quantize_all(self, tasks: list[LayerTask]) -> dict[str, nn.Linear]:
        """Quantize independent layers (a group's, which share their input); returns {name: module
        to run in its place}. With a communicator, layer k is solved on rank (turn + k) mod W and
        its result broadcast from there: every rank keeps every record, each solved once."""
        comm = self.comm
        if comm is None or comm.world_size == 1:
            return {t.name: self.quantize(t.name, t.lin, t.hessian, t.inputs, t.details) for t in tasks}
        owners = [(self._turn + k) % comm.world_size for k in range(len(tasks))]
        self._turn = (self._turn + len(tasks)) % comm.world_size
        mine = {t.name: self.solve(t) for t, r in zip(tasks, owners, strict=True) if r == comm.rank}
        return {t.name: self.keep(t.name, t.lin, comm.broadcast_object(mine.get(t.name), r, f"the record of {t.name}"),
                                  t.details) for t, r in zip(tasks, owners, strict=True)}

    def keep(self, name: str, lin: nn.Linear, result: LayerResult, details: dict[str, Any],
             twin: bool = True) -> nn.Linear | None:
        # While calibrating, a quantized layer runs as a dense Linear holding exactly the
        # weight its QuantLinear will dequantize (same numbers, no dequantize per call);
        # the QuantLinear modules are swapped in once every block is done.
        qw = result.qweight
        qw.check_finite(name)
        self.weights[name] = qw
        self.reports[name] = LayerReport(qw.fmt if isinstance(qw, BlockWeight) else qw.fmt.to_dict(), qw.shape, result.loss,
                                         None if result.fallback else result.damp,
                                         {**details, **result.details}, result.fallback)
        return dense_twin(lin, qw, self.dtype) if twin else None


def quantize_data_free(layers: LayerQuantizer, names: list[str], progress: bool) -> None:
    """Every layer by its core, from its weight alone (no calibration data); shared out over the
    ranks of a distributed job."""
    model = layers.model
    if layers.comm is not None:
        for name, module in layers.quantize_all([LayerTask(n, model.get_submodule(n)) for n in names]).items():
            model.set_submodule(name, module)
        return
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
        tasks = []
        for name, info in smooth_block(block, run, n_tokens, recipe.awq, prefix, specs, layers.comm).items():
            full = f"{prefix}.{name}"
            if CORES[specs[full].method.core].needs_hessian:
                smoothed[full] = info.report
            else:
                tasks.append(LayerTask(full, block.get_submodule(name), inputs=info.inputs, details=info.report))
        return {name[len(prefix) + 1:]: m for name, m in layers.quantize_all(tasks).items()}

    def quantize_group(i: int, linears: dict[str, nn.Linear], hessians: dict[str, torch.Tensor]):
        prefix = block_prefix(model, i)
        tasks = [LayerTask(f"{prefix}.{name}", lin, hessians[name], details=smoothed.pop(f"{prefix}.{name}", {}))
                 for name, lin in linears.items()  # not skipped, nor quantized by prepare_block:
                 if f"{prefix}.{name}" in specs and f"{prefix}.{name}" not in layers.weights]
        return {name[len(prefix) + 1:]: m for name, m in layers.quantize_all(tasks).items()}

    hessian_free = method.smoothing and not CORES[method.core].needs_hessian  # the smoothing step does all
    return BlockSteps(None if hessian_free else quantize_group, recipe.gptq.true_sequential,
                      prepare_block=prepare_block if method.smoothing else None, comm=layers.comm)


def quantize_calibrated(layers: LayerQuantizer, loaded: LoadedModel, data_dir: str | None,
                        progress: bool) -> dict[str, Any]:
    """Every block in memory on calibration samples (calibration/sequential.py, block_steps).
    Returns what the calibration was."""
    ids = calibration_ids(loaded, layers.recipe, data_dir)
    steps = block_steps(layers, int(ids.numel()))
    run_sequential(layers.model, ids, steps.quantize_group, steps.true_sequential, progress, steps.batch_size,
                   prepare_block=steps.prepare_block, dtype=layers.recipe.calibration.dtype, replay=steps.replay,
                   tail_bytes=steps.tail_bytes, comm=layers.comm, lean=steps.lean)
    return calibration_report(layers.recipe, ids)


def quantize_head(layers: LayerQuantizer, name: str, lin: nn.Linear) -> None:
    """The output head `name` (recipe.head_bits): round-to-nearest, kept as a record beside the blocks'."""
    recipe = layers.recipe
    qw = rtn_quantize(lin.weight.detach(), recipe.head_format(lin.in_features),
                      recipe.clip if recipe.clip.enabled else None)
    layers.keep(name, lin, LayerResult(qw), {}, twin=False)  # nothing runs the head while quantizing
