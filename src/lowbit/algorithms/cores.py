"""The layer quantizers the pipeline dispatches to: core name -> Core (lowbit.methods names a core
per method). Each takes one LayerJob and returns one LayerResult, whatever the method:

    result = CORES[spec.method.core].quantize(LayerJob(name, weight, spec, recipe, hessian, inputs))

A core that needs a Hessian gets the layer's (calibration/hessian.py); a layer of a smoothed block
(AWQ) also gets its sampled inputs after smoothing.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from lowbit.algorithms.awq import awq_rtn_quantize
from lowbit.algorithms.ggml import ggml_gptq, ggml_rtn
from lowbit.algorithms.gptq import GPTQResult, gptq_quantize
from lowbit.algorithms.rtn import rtn_quantize
from lowbit.algorithms.slim import slim_quantize
from lowbit.errors import ConfigError
from lowbit.qtensor import BlockWeight, QuantizedWeight
from lowbit.recipes import ClipConfig, LayerSpec, Recipe


@dataclass(frozen=True)
class LayerJob:
    """One layer to quantize: everything a core may read."""

    name: str
    weight: torch.Tensor                 # [out, in]
    spec: LayerSpec                      # its method and format, resolved for its width
    recipe: Recipe                       # the run's settings: clip, gptq, slim, awq sections
    hessian: torch.Tensor | None = None  # [in, in], for a core that needs_hessian
    inputs: torch.Tensor | None = None   # [n, in]: sampled inputs after smoothing, when its block was smoothed

    @property
    def clip(self) -> ClipConfig | None:
        """The weight-error clipping search, None when the recipe turns it off."""
        return self.recipe.clip if self.recipe.clip.enabled else None


@dataclass
class LayerResult:
    qweight: QuantizedWeight | BlockWeight
    loss: float | None = None       # GPTQ's proxy loss
    damp: float | None = None       # damping finally used (GPTQ)
    fallback: bool = False          # GPTQ's Hessian never factorized: quantized round-to-nearest
    details: dict[str, Any] = field(default_factory=dict)  # method details for the layer report

    @classmethod
    def of_gptq(cls, res: GPTQResult, **details: Any) -> LayerResult:
        return cls(res.qweight, res.loss, res.damp_used, res.fallback, details)


LayerQuantizer = Callable[[LayerJob], LayerResult]


@dataclass(frozen=True)
class Core:
    quantize: LayerQuantizer
    needs_hessian: bool = False  # the pipeline collects the layer's Hessian H = 2/n sum x x^T first


def rtn_layer(job: LayerJob) -> LayerResult:
    """Round-to-nearest; in a smoothed block, with AWQ's output-error clipping (recipe.awq.clip).
    On a llama.cpp block type: its scale search, weighted by the mean squared input of each column
    when the block was smoothed (AWQ), by the data-free importance otherwise."""
    if job.spec.block_type is not None:
        importance = None if job.inputs is None else job.inputs.float().pow(2).mean(dim=0)
        return LayerResult(ggml_rtn(job.weight, job.spec.block_type, importance, job.name))
    if job.inputs is not None:
        return LayerResult(awq_rtn_quantize(job.weight, job.inputs, job.spec.fmt, job.clip, job.recipe.awq.clip))
    return LayerResult(rtn_quantize(job.weight, job.spec.fmt, job.clip))


def gptq_layer(job: LayerJob) -> LayerResult:
    if job.spec.block_type is not None:
        record, loss, damp = ggml_gptq(job.weight, job.hessian, job.spec.block_type, job.recipe.gptq, job.name)
        return LayerResult(record, loss, damp, damp == float("inf"))
    return LayerResult.of_gptq(gptq_quantize(job.weight, job.hessian, job.spec.fmt, job.recipe.gptq, job.clip))


def slim_layer(job: LayerJob) -> LayerResult:
    """SliM-LLM: GPTQ with salience-allocated widths per group, averaging spec.average_bits."""
    if job.spec.block_type is not None:
        raise ConfigError(f"{job.name}: SliM's per-group widths have no llama.cpp block type; use gptq or awq-gptq")
    sr = slim_quantize(job.weight, job.hessian, job.spec.fmt, job.spec.average_bits, job.recipe.gptq, job.clip,
                       job.recipe.slim)
    return LayerResult.of_gptq(sr.gptq, slim_k=sr.allocation.k if sr.chosen.startswith("table") else 0,
                               slim_error=sr.allocation.error, slim_base_error=sr.allocation.base_error,
                               slim_choice=sr.chosen, average_bits=sr.gptq.qweight.average_bits())


CORES: dict[str, Core] = {
    "rtn": Core(rtn_layer),
    "gptq": Core(gptq_layer, needs_hessian=True),
    "slim": Core(slim_layer, needs_hessian=True),
}
