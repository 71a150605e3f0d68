"""A model without its weights, for jobs that stream a model through memory one block at a time.

    sk = load_skeleton("smollm2-135m")             # every parameter on the meta device
    names = parameters_under(sk.model, "model.layers.0")
    materialize(sk.model, names, sk.weights, torch.float32)   # real tensors, read from the folder
    ...
    release(sk.model, names)                       # back on the meta device, their memory freed

The model is built from config.json under accelerate's init_empty_weights (parameters on the meta
device, buffers such as rotary frequencies real), and its weights are read from the folder's
safetensors files on demand (weights.py). A GGUF source is streamed from the safetensors folder the
loader converts it to (convert.py). Every tensor the model holds is checked to be in the folder,
with its shape, before any is read.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import init_empty_weights
from accelerate.utils import set_module_tensor_to_device
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from lowbit.errors import ConfigError, ModelNotFoundError
from lowbit.marks import check_not_checkpoint
from lowbit.models.checks import check_config, check_no_pickle
from lowbit.models.load import (
    LoadedModel,
    ModelSource,
    _loadable_location,
    resolve_model,
)
from lowbit.models.quantized_folders import quant_method
from lowbit.models.weights import FolderWeights, NamedTensors


@dataclass
class Skeleton:
    """A loaded model whose parameters are on the meta device, and the weights to fill them from."""

    loaded: LoadedModel
    weights: FolderWeights  # the folder's tensors by name
    dtype: torch.dtype

    @property
    def model(self) -> nn.Module:
        return self.loaded.model

    @property
    def tokenizer(self):
        return self.loaded.tokenizer

    @property
    def source(self) -> ModelSource:
        return self.loaded.source


def load_skeleton(spec_or_source: str | ModelSource, dtype: torch.dtype = torch.float32, cache: Path | None = None,
                  fetch: bool = True, progress: bool = True) -> Skeleton:
    """The model named by `spec_or_source` (as load_model takes it) with no weights in memory, its
    tokenizer, and its folder's tensors ready to be read. Refuses what cannot be streamed: a hub id
    (nothing local to read), a folder of GPTQ/AWQ weights, a folder whose tensors do not match its
    config."""
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ConfigError(f"dtype must be a floating torch.dtype, got {dtype!r}")
    source = spec_or_source
    if not isinstance(source, ModelSource):
        source = resolve_model(source, cache=cache, fetch=fetch, progress=progress)
    if source.kind == "hub":
        raise ConfigError(f"{source.spec} is a hub id: streaming reads the model's files from a local folder; "
                          "download it first (e.g. `hf download ORG/NAME --local-dir DIR`) and pass DIR")
    folder = Path(_loadable_location(source, cache, progress))
    check_not_checkpoint(folder)
    check_no_pickle(folder)
    check_config(folder)
    if quant_method(folder) is not None:
        raise ConfigError(f"{folder} holds {quant_method(folder)}-quantized weights, which are dequantized when the "
                          "whole model is loaded; quantize it without --stream")
    weights = FolderWeights(folder)
    try:
        config = AutoConfig.from_pretrained(folder, trust_remote_code=False)
        with init_empty_weights(include_buffers=False):
            model = AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=False)
        model.tie_weights()  # a tied head is then one parameter with the embeddings (not done on meta)
        tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=False)
    except OSError as e:
        raise ModelNotFoundError(f"could not load {source.kind} model {source.spec!r}: {e}") from None
    except ValueError as e:
        raise ConfigError(f"could not load {source.kind} model {source.spec!r}: {e} (lowbit loads only "
                          "architectures transformers knows, and never runs code from a model)") from None
    model.eval()
    _check_tensors(model, weights)
    return Skeleton(LoadedModel(model, tokenizer, source), weights, dtype)


def _check_tensors(model: nn.Module, weights: FolderWeights) -> None:
    """Every parameter of `model` (a tied one once) is in the folder with its shape."""
    for name in _owned_parameters(model):
        if name not in weights:
            raise ConfigError(f"{weights.folder} has no tensor {name}, which its config.json's model needs; "
                              "quantize without --stream (transformers may rename this model's tensors "
                              "when it loads them whole)")
        want = tuple(model.get_parameter(name).shape)
        if weights.shape(name) != want:
            raise ConfigError(f"{weights.shard(name)}: {name} has shape {list(weights.shape(name))}, the model's "
                              f"config.json says {list(want)}; the folder's files do not belong together")


def _owned_parameters(module: nn.Module) -> list[str]:
    """The names of `module`'s parameters, a tied parameter under its first name only."""
    return list(dict(module.named_parameters()))  # named_parameters drops duplicates


def parameters_under(module: nn.Module, prefix: str) -> list[str]:
    """The full names of `module`'s parameters under the submodule `prefix` ("" for all), a tied
    parameter under its first name only."""
    return [n for n in _owned_parameters(module) if not prefix or n.startswith(prefix + ".")]


def materialize(model: nn.Module, names: Iterable[str], weights: NamedTensors, dtype: torch.dtype) -> None:
    """Read the parameters `names` (full names) from `weights` into `model`, floats as `dtype`;
    tied parameters follow (a head tied to the embeddings is filled with them)."""
    for name, t in weights.get_many(names, dtype).items():
        set_module_tensor_to_device(model, name, "cpu", value=t)
    model.tie_weights()  # a new parameter replaced the shared one: tie the head to it again


def assign(model: nn.Module, tensors: Mapping[str, torch.Tensor]) -> None:
    """Put `tensors` ({full parameter name: tensor}) in `model` as its parameters."""
    for name, t in tensors.items():
        set_module_tensor_to_device(model, name, "cpu", value=t)


def release(model: nn.Module, names: Iterable[str]) -> None:
    """The parameters `names` back on the meta device: the memory their weights held is freed."""
    for name in names:
        set_module_tensor_to_device(model, name, "meta")
