"""Check a checkpoint folder before anything in it is parsed: the files its manifest lists (and
no others), their sizes and sha256, config.json, the tensor headers and each layer's tensor
shapes against its manifest entry, and the model config.json describes against the manifest.
A truncated or modified file is a CheckpointError, never a half-loaded model."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from torch import nn

from lowbit.checkpoint.manifest import (
    _PART,
    DENSE_FILE,
    TOKENIZER_FILE,
    UNHASHED,
    LayerEntry,
    Manifest,
    _check_file_name,
    _read_json,
)
from lowbit.checkpoint.tensors import _Tensors
from lowbit.errors import CheckpointError
from lowbit.formats import affine, pack
from lowbit.marks import CONFIG_FILE, MANIFEST, QUANT_FILE, QUANT_METHOD
from lowbit.models.hashing import external_stamp, sha256_file, stamped_sha256


def verify_files(path: Path, manifest: Manifest, hashes: bool = True, cache: Path | None = None) -> None:
    """The checkpoint folder holds exactly the files its manifest lists (besides manifest.json and
    REPORT.md), each a plain file inside the folder with its listed size and (with `hashes`) sha256.

    Run before any of the files is parsed. With a `cache` folder, a file's hash is remembered there
    (models.hashing: a stamp keyed by its path, trusted while its size and modification time are
    unchanged), so a checkpoint loaded again is not read twice; without one, every file is hashed."""
    path = Path(path)
    files = manifest.files
    for name in files:
        _check_file_name(name, path / MANIFEST)
    try:
        present = sorted(os.listdir(path))
    except OSError as e:
        raise CheckpointError(f"{path} could not be listed ({e})") from None
    unlisted = [n for n in present if n not in files and n not in UNHASHED]
    if unlisted:
        raise CheckpointError(
            f"{path}: {', '.join(unlisted[:5])} {'is' if len(unlisted) == 1 else 'are'} not in the manifest, so no "
            "sha256 covers what loading might read from them; remove them, or re-run `lowbit quantize`")
    folder = Path(os.path.realpath(path))
    for fname, meta in files.items():
        f = path / fname
        target = Path(os.path.realpath(f))  # never raises, unlike resolve() on a link loop
        if f.is_symlink() and target.parent != folder:
            raise CheckpointError(f"{f} is a link to {target}, outside the checkpoint folder; a checkpoint "
                                  "holds its own files: copy them in, or re-run `lowbit quantize`")
        if not f.is_file():
            raise CheckpointError(f"{f} is missing or not a file; the checkpoint is incomplete, "
                                  "re-run `lowbit quantize`")
        size = f.stat().st_size
        if size != meta["bytes"]:
            raise CheckpointError(
                f"{f} is {size} bytes but the manifest says {meta['bytes']}: the file is truncated or "
                "was replaced; re-run `lowbit quantize` or copy the checkpoint again"
            )
    if not hashes:
        return
    for fname, meta in files.items():
        f = path / fname
        sha = sha256_file(f) if cache is None else stamped_sha256(f, external_stamp(f, cache))
        if sha != meta["sha256"]:
            raise CheckpointError(
                f"{f} does not match the sha256 in {MANIFEST}: it was modified after saving; "
                "re-run `lowbit quantize` or copy the checkpoint again"
            )


def _read_config(path: Path) -> Any:
    """The model config from the checkpoint's config.json, lowbit's quantization_config removed
    (transformers would otherwise look for a quantizer named lowbit) and built from transformers'
    own classes only: no code from the folder runs."""
    from transformers import CONFIG_MAPPING

    f = path / CONFIG_FILE
    config = _read_json(f, "model config")
    if not isinstance(config, dict):
        raise CheckpointError(f"{f} holds a JSON {type(config).__name__}, not an object; re-run `lowbit quantize`")
    q = config.pop("quantization_config", None)
    if not (isinstance(q, dict) and q.get("quant_method") == QUANT_METHOD):
        raise CheckpointError(f"{f}: quantization_config does not name lowbit ({q!r}); the checkpoint is damaged, "
                              "re-run `lowbit quantize`")
    config.pop("auto_map", None)  # classes from the folder's own code, which lowbit never runs
    model_type = config.get("model_type")
    if not isinstance(model_type, str) or model_type not in CONFIG_MAPPING:
        raise CheckpointError(f"{f}: model_type {model_type!r} is not an architecture transformers "
                              f"knows; upgrade transformers or re-run `lowbit quantize`")
    try:
        return CONFIG_MAPPING[model_type].from_dict(config)
    except (ValueError, TypeError, KeyError, AttributeError) as e:
        raise CheckpointError(f"{f} is not a valid {model_type} config ({e}); re-run `lowbit quantize`") from None


def _layer_parts(quant: _Tensors, layers: dict[str, LayerEntry]) -> dict[str, list[str]]:
    """{layer name: the parts stored for it (codes, scales, codes.b3, bias...)}; a tensor in
    quantized.safetensors that is no part of a layer in the manifest is an error."""
    by_layer: dict[str, list[str]] = {}
    for k in quant.keys:
        name, _, part = k.rpartition(".")
        if part.startswith("b") and part[1:].isdigit():  # codes.b3 / zeros.b3
            name, _, kind = name.rpartition(".")
            part = f"{kind}.{part}"
        if name not in layers or not (_PART.fullmatch(part) or part == "bias"):
            raise CheckpointError(f"{quant.path}: tensor {k!r} is not part of a quantized layer in the manifest; "
                                  "the checkpoint is damaged, re-run `lowbit quantize`")
        by_layer.setdefault(name, []).append(part)
    return by_layer


def _check_layer_tensors(name: str, entry: LayerEntry, parts: list[str], quant: _Tensors) -> None:
    """The stored tensors of layer `name` have the shapes its manifest entry implies (checked from
    the header, before any of them is read)."""
    out, n_in = entry.shape
    fmt = entry.fmt
    g = affine.n_groups(n_in, fmt.group_size)
    want: dict[str, tuple[int, ...]] = {"scales": (out, g)}
    if fmt.scale_bits:
        want["scale_mult"] = (out,)
    if entry.perm:
        want["perm"] = (n_in,)
    if entry.bias:
        want["bias"] = (out,)
    if entry.group_bits is not None:
        want["group_bits"] = (g,)
    else:
        want["codes"] = (out, pack.packed_length(n_in, fmt.bits))
        if not fmt.symmetric:
            want["zeros"] = (pack.packed_length(out * g, fmt.bits),)
    wrong = [f"{p} {quant.shape(f'{name}.{p}')} (expected {s})" for p, s in want.items()
             if quant.shape(f"{name}.{p}") != s]
    if entry.group_bits is not None:  # per-width parts: [out, packed row] codes, flat zeros
        widths = {p for p in parts if p.startswith("codes.b")}
        wrong += [f"{p} {quant.shape(f'{name}.{p}')}" for p in widths if len(quant.shape(f"{name}.{p}")) != 2
                  or quant.shape(f"{name}.{p}")[0] != out]
        if not widths:
            wrong.append("no codes")
    extra = sorted(set(parts) - set(want) - {p for p in parts if ".b" in p})
    if wrong or extra:
        raise CheckpointError(f"{quant.path}: layer {name} does not match its manifest entry (shape {list(entry.shape)}, "
                              f"{'; '.join(wrong + [f'unexpected {p}' for p in extra])}); the checkpoint is "
                              "damaged, re-run `lowbit quantize`")


def _check_against_model(model: nn.Module, layers: dict[str, LayerEntry], dense: _Tensors, path: Path) -> None:
    """Every manifest layer replaces an nn.Linear of its shape in the model built from config.json,
    and every tensor in the dense file is a model tensor of its shape: checked on the empty model,
    before any tensor is read."""
    for name, entry in layers.items():
        try:
            lin = model.get_submodule(name)
        except AttributeError:
            lin = None
        if not isinstance(lin, nn.Linear) or (lin.out_features, lin.in_features) != entry.shape:
            found = f"{lin.out_features}x{lin.in_features}" if isinstance(lin, nn.Linear) else type(lin).__name__
            raise CheckpointError(f"{path}: the manifest's layer {name} ({entry.shape[0]}x{entry.shape[1]}) is "
                                  f"not a linear layer of the model config.json describes ({found}); re-run "
                                  "`lowbit quantize`")
    expected = {k: tuple(t.shape) for k, t in model.state_dict().items()}
    for k in dense.keys:
        if expected.get(k) != dense.shape(k):
            what = ("is not a tensor of the model" if k not in expected
                    else f"has shape {dense.shape(k)}, the model {expected[k]}")
            raise CheckpointError(f"{dense.path}: {k} {what}; the checkpoint is damaged, re-run `lowbit quantize`")


def verify_checkpoint(path: str | os.PathLike, cache: Path | None = None) -> Manifest:
    """Everything load_checkpoint checks short of building the model, for `lowbit info --verify`:
    the manifest, the listing, sizes and sha256 of every file (hashed anew unless `cache`), the
    config, both tensor headers and each layer's tensors. Returns the manifest."""
    path = Path(path)
    manifest = Manifest.read(path)
    verify_files(path, manifest, True, cache)
    _read_config(path)
    _check_tokenizer_files(path, manifest)
    for fname in (QUANT_FILE, DENSE_FILE):
        tensors = _Tensors(path / fname)
        try:
            if fname == QUANT_FILE:
                by_layer = _layer_parts(tensors, manifest.layers)
                for name, entry in manifest.layers.items():
                    _check_layer_tensors(name, entry, by_layer.get(name, []), tensors)
        finally:
            tensors.close()
    return manifest


def _check_tokenizer_files(path: Path, manifest: Manifest) -> bool:
    """Whether the checkpoint has a tokenizer; one without tokenizer.json is an error, as lowbit
    saves fast tokenizers only and transformers would otherwise look for other formats."""
    files = manifest.files
    if not any(n.startswith("tokenizer") or n == "special_tokens_map.json" for n in files):
        return False
    if TOKENIZER_FILE not in files:
        raise CheckpointError(f"{path}: the manifest lists tokenizer files but not {TOKENIZER_FILE}; the "
                              "checkpoint is incomplete, re-run `lowbit quantize`")
    return True
