"""to_runtime: the one module swap from records to runnable modules.

    model = to_runtime(model, weights, "packed")   # weights: {layer name: QuantizedWeight | PackedWeight}

`model` holds every tensor but the quantized weights (a model just quantized, or one built empty
from a checkpoint with its dense tensors loaded); each name in `weights` is a linear layer of it,
replaced by the module that runs its record:

- "reference": QuantLinear (one byte per code, dequantize then matmul);
- "packed": PackedLinear on the native kernels, built from the packed codes as they are (a
  PackedWeight's uniform codes are never unpacked); a layer whose groups the kernels cannot run
  (not a multiple of 8 columns tiling the input) stays a QuantLinear, said once in a warning.
  Then the decode attention (runtime/attention.py) and, for bfloat16 decode, one GEMV per group
  of projections that read one input (packed.fuse_projections);
- "int8": activations quantized per token and integer products (runtime/w8a8.py): 8-bit
  per-channel symmetric layers as W8A8Linear, 4-bit Integer Scale layers as W4A8Linear, other
  formats weight-only on PackedLinear (warned); a model with no integer format is refused.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping

import torch
from torch import nn

from lowbit.errors import ConfigError, ShapeError
from lowbit.memory import release_freed_memory
from lowbit.qtensor import PackedWeight, QuantizedWeight
from lowbit.runtime import w8a8
from lowbit.runtime.attention import use_fast_attention
from lowbit.runtime.embedding import MappedEmbedding
from lowbit.runtime.packed import PackedLinear, fuse_projections, kernels_fit
from lowbit.runtime.qlinear import QuantLinear
from lowbit.runtime.w8a8 import W4A8Linear, W8A8Linear

log = logging.getLogger(__name__)

KINDS = ("reference", "packed", "int8")
Record = QuantizedWeight | PackedWeight


class LayerError(ConfigError):
    """A record the chosen runtime cannot run (`unsupported`), or one inconsistent with itself;
    `layer` names it."""

    def __init__(self, layer: str, detail: str, unsupported: bool):
        super().__init__(f"layer {layer}: {detail}" if unsupported
                         else f"layer {layer} is inconsistent with its record ({detail})")
        self.layer, self.detail, self.unsupported = layer, detail, unsupported


def _unpacked(rec: Record) -> QuantizedWeight:
    return rec if isinstance(rec, QuantizedWeight) else rec.unpack()


def _packed_linear(rec: Record, bias: torch.Tensor | None, dtype: torch.dtype) -> PackedLinear:
    if isinstance(rec, PackedWeight):
        layer = PackedLinear.from_packed(rec.parts, rec.fmt, rec.shape, bias)
    else:
        layer = PackedLinear(rec, bias)
    if layer.bias is not None:
        layer.bias.data = layer.bias.data.to(dtype)
    return layer


def _module(rec: Record, bias: torch.Tensor | None, kind: str, dtype: torch.dtype) -> tuple[nn.Module, str | None]:
    """The runtime module of one record, and "reference" / "float" when it fell back to the
    reference QuantLinear / to weight-only products."""
    if kind != "reference" and not kernels_fit(rec.fmt, rec.shape[1]):
        return QuantLinear.from_quantized(_unpacked(rec), bias, dtype=dtype), "reference"
    if kind == "int8":
        qw = _unpacked(rec)
        if w8a8.supports_w4a8(qw):
            return W4A8Linear(qw, bias), None
        if w8a8.supports(qw):
            return W8A8Linear(qw, bias), None
        return PackedLinear(qw, bias), "float"  # e.g. an 8-bit group-wise output head
    if kind == "packed":
        return _packed_linear(rec, bias, dtype), None
    return QuantLinear.from_quantized(_unpacked(rec), bias, dtype=dtype), None


def _listed(names: list[str]) -> str:
    return ", ".join(names[:4]) + (" ..." if len(names) > 4 else "")


def to_runtime(model: nn.Module, weights: Mapping[str, Record], kind: str = "reference",
               dtype: torch.dtype | None = None, bias: Callable[[str], torch.Tensor | None] | None = None,
               embedding: torch.Tensor | None = None) -> nn.Module:
    """Put the runtime module of every record in `weights` in place in `model` (in place; returned).

    `kind`: one of KINDS (module docstring). `dtype`: the dtype biases run in (default: the
    model's). `bias(name)`: the bias of layer `name` (default: the bias of the module it
    replaces). `embedding` ("packed" and "int8"): the input embedding table, memory-mapped, to run
    as a MappedEmbedding (runtime/embedding.py) instead of a table in memory.

    Records are taken from `weights` one at a time (a checkpoint's StoredWeights reads each as it
    is asked for). Raises LayerError for a record the runtime cannot run or that does not fit
    together, and ConfigError when "int8" finds no layer with an integer format.
    """
    if kind not in KINDS:
        raise ConfigError(f"runtime {kind!r}: choose one of {', '.join(KINDS)}")
    if dtype is None:
        dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    fell_back: dict[str, list[str]] = {"reference": [], "float": []}
    for name in weights:
        if bias is not None:
            b = bias(name)
        else:
            b = getattr(model.get_submodule(name), "bias", None)
            b = None if b is None else b.detach()
        try:
            layer, fallback = _module(weights[name], b, kind, dtype)
        except ConfigError as e:  # a runtime that cannot run this layer's format
            raise LayerError(name, str(e), True) from None
        except (KeyError, ValueError, ShapeError) as e:
            raise LayerError(name, str(e), False) from None
        if fallback is not None:
            fell_back[fallback].append(name)
        model.set_submodule(name, layer)
    if kind == "int8" and weights and len(fell_back["float"]) == len(weights):
        raise ConfigError(
            "int8 activations need 8-bit per-channel symmetric layers (W8A8) or 4-bit layers with "
            "integer scales (W4A8, --integer-scale 8); this checkpoint has neither. Quantize with --bits 8 "
            "--group-size -1 --sym or --bits 4 --integer-scale 8, or run without --activations int8")
    if fell_back["reference"]:
        log.warning("%d layer(s) have groups or a grid the packed kernels cannot run (the affine grid and a "
                    "multiple of 8 columns that tiles the input are needed) and run on the slower reference path: %s", len(fell_back["reference"]),
                    _listed(fell_back["reference"]))
    if fell_back["float"]:
        log.warning("%d layer(s) have no int8-activation format and run weight-only: %s", len(fell_back["float"]),
                    _listed(fell_back["float"]))
    release_freed_memory()
    if kind == "reference":
        return model
    if embedding is not None:
        name = embedding_to_map(model)
        if name is not None and embedding.is_floating_point() \
                and tuple(embedding.shape) == tuple(model.get_submodule(name).weight.shape):
            model.set_submodule(name, MappedEmbedding(embedding, dtype, model.get_submodule(name).padding_idx))
    use_fast_attention(model)  # single-query decode attention without torch's CPU flash kernel
    if kind == "packed":
        fuse_projections(model)  # one decode GEMV for q/k/v and one for gate/up (bfloat16 path)
    return model


def embedding_to_map(model: nn.Module) -> str | None:
    """The name of the model's input embedding where it can run memory-mapped: a plain
    nn.Embedding that is not tied to the output head (Gemma's scaled one is not plain)."""
    emb = model.get_input_embeddings()
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    if type(emb) is not nn.Embedding or getattr(config, "tie_word_embeddings", False):
        return None
    return next((n for n, m in model.named_modules() if m is emb), None)
