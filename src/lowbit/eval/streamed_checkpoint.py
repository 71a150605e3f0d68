"""A checkpoint opened to be evaluated one decoder block at a time (eval/streamed.py), for one that
does not fit in memory whole.

    with open_streamed("out/smol-w4g64", torch.float32) as ck:
        evaluate(ck, ["wikitext2"], "smol-w4g64")      # evaluate() streams it

The folder is checked as load_checkpoint checks it (checkpoint.open_checkpoint: files, sizes,
hashes, headers, each layer's tensors), the model config.json describes is built on the meta
device, and every parameter is checked to be stored, with its shape, before any is read.
StreamedModel then fills it block by block from DequantizedWeights: each quantized layer's weight
dequantized from its record as the reference runtime (load_checkpoint's default) computes it, its
bias as that runtime holds it, every other tensor as stored, so the numbers are those of the
checkpoint loaded whole. The size comes from the stored records, as load_checkpoint's does.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Self

import torch
from torch import nn

from lowbit.checkpoint import Manifest, StoredCheckpoint, open_checkpoint
from lowbit.checkpoint.dequantized import DequantizedWeights
from lowbit.errors import CheckpointError, ConfigError
from lowbit.eval.size import QuantizedSize, stored_size
from lowbit.models.skeleton import parameters_under


@dataclass
class StreamedCheckpoint:
    """An open checkpoint whose model holds no weights (every parameter on the meta device) and
    the tensors to fill it from; close() (or a with block) closes its files."""

    model: nn.Module
    tokenizer: Any
    manifest: Manifest
    path: Path
    size: QuantizedSize
    weights: DequantizedWeights
    dtype: torch.dtype

    def close(self) -> None:
        self.weights.checkpoint.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def open_streamed(path: str | os.PathLike, dtype: torch.dtype | None = None,
                  verify: bool | str = True) -> StreamedCheckpoint:
    """The checkpoint at `path`, checked and open, to be evaluated in `dtype` (default: as saved)
    one block at a time; `verify` as checkpoint.open_checkpoint."""
    if dtype is not None and (not isinstance(dtype, torch.dtype) or not dtype.is_floating_point):
        raise ConfigError(f"dtype must be a floating torch.dtype, got {dtype!r}")
    ck = open_checkpoint(path, verify)
    try:
        dtype = dtype or ck.dtype
        model = ck.empty_model(dtype)
        model.tie_weights()  # a tied head is one parameter with the embeddings
        _drop_unstored_biases(model, ck)
        weights = DequantizedWeights(ck)
        _check_stored(model, weights, ck.path)
        _load_buffers(model, ck, dtype)
        records = {name: ck.weights.meta(name) for name in ck.weights}  # shapes and bytes, nothing read
        size = stored_size(model, records, ck.dense_meta(), {n: ck.weights.bias_meta(n) for n in ck.weights})
        model.eval()
        return StreamedCheckpoint(model, ck.tokenizer(), ck.manifest, ck.path, size, weights, dtype)
    except BaseException:
        ck.close()
        raise


def _drop_unstored_biases(model: nn.Module, ck: StoredCheckpoint) -> None:
    """A quantized layer runs with the bias its record stores, or none (as the reference runtime's
    QuantLinear built from it does), whatever bias the empty model's nn.Linear has."""
    for name in ck.weights:
        layer = model.get_submodule(name)
        if layer.bias is not None and ck.weights.bias_meta(name) is None:
            layer.bias = None


def _check_stored(model: nn.Module, weights: DequantizedWeights, path: Path) -> None:
    """Every parameter of `model` (a tied one once) is stored with its shape."""
    names = parameters_under(model, "")
    missing = [n for n in names if n not in weights]
    if missing:
        raise CheckpointError(f"{path}: no tensors for {missing[:5]}; the checkpoint is incomplete")
    for name in names:
        want = tuple(model.get_parameter(name).shape)
        if weights.shape(name) != want:
            raise CheckpointError(f"{path}: {name} is stored with shape {list(weights.shape(name))}, the model "
                                  f"config.json describes has {list(want)}; re-run `lowbit quantize`")


def _load_buffers(model: nn.Module, ck: StoredCheckpoint, dtype: torch.dtype) -> None:
    """The stored tensors that are buffers, not parameters, of the model, as load_checkpoint puts
    them in place (the parameters are read block by block)."""
    params = {n for n, _ in model.named_parameters(remove_duplicate=False)}
    buffers = {k: ck.dense_tensor(k, dtype) for k in ck.dense_keys() if k not in params}
    if buffers:
        model.load_state_dict(buffers, strict=False, assign=True)
