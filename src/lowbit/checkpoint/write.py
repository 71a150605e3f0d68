"""Write a checkpoint folder: records and the model holding every other tensor in, one folder
out, moved into place in one rename.

A checkpoint folder holds
    manifest.json           format version, lowbit version, recipe, source model and its sha256,
                            calibration set and seed, per-layer format, sha256 of every tensor file
                            (checkpoint/manifest.py)
    quantized.safetensors   per quantized layer: packed codes, float16 scales, packed zeros,
                            optional permutation and bias (QuantizedWeight.packed())
    dense.safetensors       every other tensor (embeddings, norms, an untied LM head); not named
                            model.safetensors, so transformers' own from_pretrained finds no weights
                            and refuses the folder instead of loading random ones
    config.json, tokenizer files   so loading needs nothing but this folder; config.json carries
                            quantization_config {"quant_method": "lowbit", "format_version": 2}
    REPORT.md               written by the CLI

Reading one back: read.py (open_checkpoint), after verify.py's checks.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lowbit.checkpoint.manifest import (
    DENSE_FILE,
    FORMAT_VERSION,
    REPORT,
    LayerEntry,
    Manifest,
)
from lowbit.checkpoint.tensors import LazyTensors, write_tensors
from lowbit.errors import CheckpointError
from lowbit.marks import FORMAT, MANIFEST, QUANT_FILE
from lowbit.models.hashing import sha256_file
from lowbit.outputs import (
    STAGING_MARKER,
    apply_umask,
    check_output,
    make_staging,
    publish,
    remove_tree,
)
from lowbit.qtensor import QuantizedWeight


def split_state(weights: Mapping[str, QuantizedWeight], state: Mapping[str, torch.Tensor]
                ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], dict[str, LayerEntry]]:
    """(quantized tensors, dense tensors, per-layer manifest entries) from the records and the
    state dict of the model (or of the part of it, keys in full) holding every other tensor; tied
    tensors stored once. A quantized layer's bias is the state's `<name>.bias` and is stored with
    its record; whatever else the state holds under a quantized layer's name (its float weight, or
    a runtime module's buffers) is not stored."""
    quant: dict[str, torch.Tensor] = {}
    layers: dict[str, LayerEntry] = {}
    for name, qw in weights.items():
        for key, t in qw.packed().items():
            quant[f"{name}.{key}"] = t.contiguous()
        bias = state.get(f"{name}.bias")
        if bias is not None:
            quant[f"{name}.bias"] = bias.detach().contiguous()
        layers[name] = LayerEntry.of(qw, bias is not None)
    dense: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for key, t in state.items():
        owner = key.rsplit(".", 1)[0]
        if owner in weights:
            continue
        ptr = t.untyped_storage().data_ptr()
        if ptr in seen:  # tied weights (e.g. lm_head = embed_tokens): stored once, re-tied on load
            continue
        seen.add(ptr)
        dense[key] = t.detach().contiguous()
    return quant, dense, layers


def save_checkpoint(
    weights: Mapping[str, QuantizedWeight],
    model: nn.Module,
    tokenizer: Any,
    out_dir: str | os.PathLike,
    info: dict[str, Any],
    report: str | Callable[[Manifest], str] | None = None,
    overwrite: bool = False,
    protect: Iterable[str | os.PathLike] = (),
) -> Path:
    """Write the records `weights` ({layer name: QuantizedWeight}) and the rest of `model` (its
    config and every tensor not under a quantized layer's name) into a staging folder beside
    `out_dir`, then move it into place in one rename (outputs.publish): `out_dir` is never half
    written, and an existing folder is replaced only with `overwrite` and only if it is a lowbit
    checkpoint and none of `protect` (the input model) or the current directory
    (outputs.check_output).

    `info` goes into the manifest (recipe, source, calibration, stats...); info["stats"] gains
    disk_bytes, the bytes of the files written. `report` is REPORT.md's text, or a function of the
    finished Manifest that returns it. Every file written except manifest.json and REPORT.md is
    listed in the manifest's "files" with its size and sha256.
    """
    quant, dense, layers = split_state(weights, model.state_dict())
    dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
    return write_checkpoint(quant, dense, layers, model.config, tokenizer, dtype, out_dir, info, report, overwrite,
                            protect)


def write_checkpoint(
    quant: Mapping[str, torch.Tensor] | LazyTensors,
    dense: Mapping[str, torch.Tensor] | LazyTensors,
    layers: dict[str, LayerEntry],
    config: Any,
    tokenizer: Any,
    dtype: str,
    out_dir: str | os.PathLike,
    info: dict[str, Any],
    report: str | Callable[[Manifest], str] | None = None,
    overwrite: bool = False,
    protect: Iterable[str | os.PathLike] = (),
) -> Path:
    """save_checkpoint from the tensors split_state gives (quantized parts, dense tensors), the
    layers' manifest entries, the model's config and `dtype` (its name, "float32"): what a job
    that never holds the whole model (streaming.py) writes, from LazyTensors read one at a time.
    The tensor files are written a tensor at a time (tensors.write_tensors: save_file's bytes)."""
    out = check_output(out_dir, overwrite, protect)
    staging = make_staging(out)
    try:
        for fname, tensors in ((QUANT_FILE, quant), (DENSE_FILE, dense)):
            lazy = tensors if isinstance(tensors, LazyTensors) else LazyTensors.of(tensors)
            write_tensors(staging / fname, lazy.layout, lazy.read, {"format": FORMAT})
        config.save_pretrained(staging)
        _mark_config(staging / "config.json")
        if tokenizer is not None:
            tokenizer.save_pretrained(staging)
        files = _file_entries(staging)
        info = dict(info)
        if isinstance(info.get("stats"), dict):
            info["stats"] = {**info["stats"], "disk_bytes": sum(f["bytes"] for f in files.values())}
        manifest = Manifest(
            dtype=dtype,
            layers=layers,
            files=files,
            info=info,
            created=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        )
        (staging / MANIFEST).write_text(manifest.to_json())
        text = report(manifest) if callable(report) else report
        if text is not None:
            (staging / REPORT).write_text(text)
        apply_umask(staging)
        return publish(staging, out, overwrite, protect)
    except BaseException:
        if staging.is_dir():
            remove_tree(staging)
        raise


def _mark_config(path: Path) -> None:
    """Add lowbit's quantization_config to a saved config.json: lowbit strips it when it loads the
    checkpoint, and other tools see that the folder is not a plain Hugging Face model."""
    config = json.loads(path.read_text())
    config["quantization_config"] = {"quant_method": "lowbit", "format_version": FORMAT_VERSION}
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def _file_entries(folder: Path) -> dict[str, dict[str, Any]]:
    """{name: {"bytes", "sha256"}} of every file in a staging folder but the manifest, REPORT.md
    and the staging marker. A sub-folder is refused: the manifest lists plain names only."""
    entries = {}
    for f in sorted(folder.iterdir()):
        if f.name in (MANIFEST, REPORT, STAGING_MARKER):
            continue
        if not f.is_file() or f.is_symlink():
            raise CheckpointError(f"saving wrote {f.name}, which is not a plain file; a checkpoint holds plain "
                                  "files only (report this as a lowbit bug)")
        entries[f.name] = {"bytes": f.stat().st_size, "sha256": sha256_file(f)}
    return entries
