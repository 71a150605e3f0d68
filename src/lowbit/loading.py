"""lowbit.load: a checkpoint folder to a runnable model, in two steps that know nothing of each
other: checkpoint.open_checkpoint (checked files -> records and dense tensors), then
runtime.convert.to_runtime (records -> runtime modules, fusion, attention).

    loaded = lowbit.load("out/smol-w4g64", runtime="packed")
    loaded.model, loaded.tokenizer, loaded.size.bits_per_weight
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lowbit.checkpoint import Manifest, open_checkpoint
from lowbit.errors import CheckpointError, ConfigError
from lowbit.eval.size import QuantizedSize, stored_size
from lowbit.memory import release_freed_memory
from lowbit.runtime.convert import KINDS, LayerError, embedding_to_map, to_runtime
from lowbit.runtime.packed import fusion_buffers

RUNTIMES = ("reference", "packed")  # load_checkpoint's runtime argument (int8: int8_activations=True)


@dataclass
class LoadedCheckpoint:
    model: nn.Module
    tokenizer: Any
    manifest: Manifest
    path: Path
    size: QuantizedSize | None = None  # from the stored records and dense tensors, whatever the runtime


def load(path: str | os.PathLike, runtime: str = "reference", dtype: torch.dtype | None = None,
         verify: bool | str = True) -> LoadedCheckpoint:
    """The checkpoint at `path` as a model running on `runtime` (runtime.convert.KINDS:
    "reference", "packed", or "int8" for integer activations on the packed kernels). `dtype`
    converts the dense tensors (default: as saved); `verify` as checkpoint.open_checkpoint.

    Every file is checked before it is parsed (open_checkpoint), and the model config.json
    describes is checked against the manifest and the headers before anything is allocated. The
    packed runtime reads each layer's packed codes straight into the buffers it runs from (the
    projections it fuses share one), tensor by tensor, so peak memory stays near the packed model's
    size, and keeps a separate input embedding mapped from the file.
    """
    if runtime not in KINDS:
        raise CheckpointError(f"runtime {runtime!r}: choose one of {', '.join(KINDS)}")
    with open_checkpoint(path, verify) as ck:
        dtype = dtype or ck.dtype
        model = ck.empty_model(dtype)
        stored = ck.weights
        records = {name: stored.meta(name) for name in stored}  # shapes and bytes, nothing read
        size = stored_size(model, records, ck.dense_meta(), {n: stored.bias_meta(n) for n in stored})
        if runtime == "packed":
            stored.codes_into = fusion_buffers(records)
        mapped = None
        if runtime != "reference":
            name = embedding_to_map(model)
            table = None if name is None else ck.mapped(f"{name}.weight")
            if table is not None and table.is_floating_point() \
                    and tuple(table.shape) == tuple(model.get_submodule(name).weight.shape):
                mapped = (f"{name}.weight", table)
        state = ck.dense_state(dtype, skip=[mapped[0]] if mapped else [])
        model.load_state_dict(state, strict=False, assign=True)
        del state
        model.tie_weights()
        try:
            to_runtime(model, stored, runtime, dtype, bias=stored.bias, embedding=mapped and mapped[1])
        except LayerError as e:
            if e.unsupported:
                raise CheckpointError(f"{ck.path}: {e}") from None
            raise CheckpointError(f"{ck.path}: layer {e.layer} is inconsistent with its manifest entry "
                                  f"({e.detail})") from None
        except ConfigError as e:
            raise CheckpointError(f"{ck.path}: {e}") from None
        still_empty = [n for n, p in model.named_parameters() if p.device.type == "meta"]
        if still_empty:
            raise CheckpointError(f"{ck.path}: no tensors for {still_empty[:5]}; the checkpoint is incomplete")
        model.eval()
        tokenizer = ck.tokenizer()
        result = LoadedCheckpoint(model, tokenizer, ck.manifest, ck.path, size)
    release_freed_memory()
    return result


def load_checkpoint(path: str | os.PathLike, dtype: torch.dtype | None = None, verify: bool | str = True,
                    runtime: str = "reference", int8_activations: bool = False) -> LoadedCheckpoint:
    """load() with the runtime named as before: runtime "reference" or "packed", and
    `int8_activations` (packed only) for the "int8" runtime."""
    if runtime not in RUNTIMES:
        raise CheckpointError(f"runtime {runtime!r}: choose one of {', '.join(RUNTIMES)}")
    if verify not in (True, False, "full"):
        raise ConfigError(f"verify={verify!r}: use True (hashes, remembered while files are unchanged), "
                          "'full' (hash every file) or False (sizes only)")
    if int8_activations and runtime != "packed":
        raise CheckpointError("int8 activations run in the packed runtime; load with runtime='packed'")
    return load(path, "int8" if int8_activations else runtime, dtype, verify)
