"""Write and read checkpoint folders: records in, records out. Nothing here knows a runtime.

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

save_checkpoint writes a dict[name, QuantizedWeight] and the model holding the dense tensors.
open_checkpoint checks the folder (manifest, listing, sizes and hashes, config, both tensor
headers, every layer's tensor shapes) before anything is parsed or allocated, and hands back a
StoredCheckpoint: the empty model from config.json, the records (StoredWeights, read one layer
at a time, packed as stored) and the dense tensors. A truncated or modified file is a
CheckpointError, never a half-loaded model. Putting runtime modules in place is runtime/convert.py's
job; lowbit.loading joins the two.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any, Self

import torch
from safetensors.torch import save_file
from torch import nn

from lowbit.checkpoint.manifest import (
    _PART,
    DENSE_FILE,
    FORMAT_VERSION,
    REPORT,
    TOKENIZER_FILE,
    UNHASHED,
    LayerEntry,
    Manifest,
    _check_file_name,
    _read_json,
    read_manifest,
)
from lowbit.checkpoint.tensors import _Tensors
from lowbit.errors import CheckpointError, ConfigError
from lowbit.formats import affine, pack
from lowbit.marks import (
    CONFIG_FILE,
    FORMAT,
    MANIFEST,
    QUANT_FILE,
    QUANT_METHOD,
    looks_like_checkpoint,
)
from lowbit.models.hashing import external_stamp, sha256_file, stamped_sha256
from lowbit.outputs import (
    STAGING_MARKER,
    apply_umask,
    check_output,
    make_staging,
    publish,
    remove_tree,
)
from lowbit.paths import cache_dir
from lowbit.qtensor import PackedWeight, QuantFormat, QuantizedWeight


def _split_state(weights: Mapping[str, QuantizedWeight], model: nn.Module
                 ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], dict[str, LayerEntry]]:
    """(quantized tensors, dense tensors, per-layer manifest entries) from the records and the
    model holding every other tensor; tied tensors stored once. A quantized layer's bias is the
    model's `<name>.bias` and is stored with its record; whatever else the model holds under a
    quantized layer's name (its float weight, or a runtime module's buffers) is not stored."""
    state = model.state_dict()
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
    report: str | Callable[[dict[str, Any]], str] | None = None,
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
    finished manifest that returns it. Every file written except manifest.json and REPORT.md is
    listed in the manifest's "files" with its size and sha256.
    """
    out = check_output(out_dir, overwrite, protect)
    staging = make_staging(out)
    try:
        quant, dense, layers = _split_state(weights, model)
        save_file(quant, staging / QUANT_FILE, metadata={"format": FORMAT})
        save_file(dense, staging / DENSE_FILE, metadata={"format": FORMAT})
        model.config.save_pretrained(staging)
        _mark_config(staging / "config.json")
        if tokenizer is not None:
            tokenizer.save_pretrained(staging)
        files = _file_entries(staging)
        info = dict(info)
        if isinstance(info.get("stats"), dict):
            info["stats"] = {**info["stats"], "disk_bytes": sum(f["bytes"] for f in files.values())}
        manifest = Manifest(
            dtype=str(next(model.parameters()).dtype).removeprefix("torch."),
            layers=layers,
            files=files,
            info=info,
            created=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        ).to_dict()
        (staging / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=False) + "\n")
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



# ---------------------------------------------------------------- reading a checkpoint
def is_checkpoint(path: str | os.PathLike) -> bool:
    """Whether to open `path` with load_checkpoint rather than as a model: looks_like_checkpoint, so
    a damaged checkpoint reaches load_checkpoint, which says what is wrong with it."""
    return looks_like_checkpoint(path)


class _Background:
    """fn(*args) in a thread; result() joins it and re-raises what it raised."""

    def __init__(self, fn, *args):
        import threading

        self._error: BaseException | None = None
        self._value = None

        def run():
            try:
                self._value = fn(*args)
            except BaseException as e:  # noqa: BLE001 - re-raised in the caller by result()
                self._error = e

        self._thread = threading.Thread(target=run, daemon=True)
        self._thread.start()

    def result(self):
        self._thread.join()
        if self._error is not None:
            raise self._error
        return self._value


def verify_files(path: Path, manifest: dict[str, Any], hashes: bool = True, cache: Path | None = None) -> None:
    """The checkpoint folder holds exactly the files its manifest lists (besides manifest.json and
    REPORT.md), each a plain file inside the folder with its listed size and (with `hashes`) sha256.

    Run before any of the files is parsed. With a `cache` folder, a file's hash is remembered there
    (models.hashing: a stamp keyed by its path, trusted while its size and modification time are
    unchanged), so a checkpoint loaded again is not read twice; without one, every file is hashed."""
    path = Path(path)
    files = manifest["files"]
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


def _read_tokenizer(path: Path) -> Any:
    """The checkpoint's tokenizer through AutoTokenizer, with no code from the folder."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path, trust_remote_code=False)
    except Exception as e:  # noqa: BLE001 - transformers and tokenizers raise many types on bad files
        raise CheckpointError(f"{path}: the tokenizer files could not be loaded ({type(e).__name__}: {e}); "
                              "re-run `lowbit quantize`") from None


def _layer_parts(quant: _Tensors, layers: dict[str, Any]) -> dict[str, list[str]]:
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


def _check_layer_tensors(name: str, meta: dict[str, Any], parts: list[str], quant: _Tensors) -> None:
    """The stored tensors of layer `name` have the shapes its manifest entry implies (checked from
    the header, before any of them is read)."""
    out, n_in = meta["shape"]
    fmt = QuantFormat.from_dict(meta)
    g = affine.n_groups(n_in, fmt.group_size)
    want: dict[str, tuple[int, ...]] = {"scales": (out, g)}
    if fmt.scale_bits:
        want["scale_mult"] = (out,)
    if meta.get("perm"):
        want["perm"] = (n_in,)
    if meta.get("bias"):
        want["bias"] = (out,)
    if "group_bits" in meta:
        want["group_bits"] = (g,)
    else:
        want["codes"] = (out, pack.packed_length(n_in, fmt.bits))
        if not fmt.symmetric:
            want["zeros"] = (pack.packed_length(out * g, fmt.bits),)
    wrong = [f"{p} {quant.shape(f'{name}.{p}')} (expected {s})" for p, s in want.items()
             if quant.shape(f"{name}.{p}") != s]
    if "group_bits" in meta:  # per-width parts: [out, packed row] codes, flat zeros
        widths = {p for p in parts if p.startswith("codes.b")}
        wrong += [f"{p} {quant.shape(f'{name}.{p}')}" for p in widths if len(quant.shape(f"{name}.{p}")) != 2
                  or quant.shape(f"{name}.{p}")[0] != out]
        if not widths:
            wrong.append("no codes")
    extra = sorted(set(parts) - set(want) - {p for p in parts if ".b" in p})
    if wrong or extra:
        raise CheckpointError(f"{quant.path}: layer {name} does not match its manifest entry (shape {meta['shape']}, "
                              f"{'; '.join(wrong + [f'unexpected {p}' for p in extra])}); the checkpoint is "
                              "damaged, re-run `lowbit quantize`")


def _check_against_model(model: nn.Module, layers: dict[str, Any], dense: _Tensors, path: Path) -> None:
    """Every manifest layer replaces an nn.Linear of its shape in the model built from config.json,
    and every tensor in the dense file is a model tensor of its shape: checked on the empty model,
    before any tensor is read."""
    for name, meta in layers.items():
        try:
            lin = model.get_submodule(name)
        except AttributeError:
            lin = None
        if not isinstance(lin, nn.Linear) or [lin.out_features, lin.in_features] != meta["shape"]:
            found = f"{lin.out_features}x{lin.in_features}" if isinstance(lin, nn.Linear) else type(lin).__name__
            raise CheckpointError(f"{path}: the manifest's layer {name} ({meta['shape'][0]}x{meta['shape'][1]}) is "
                                  f"not a linear layer of the model config.json describes ({found}); re-run "
                                  "`lowbit quantize`")
    expected = {k: tuple(t.shape) for k, t in model.state_dict().items()}
    for k in dense.keys:
        if expected.get(k) != dense.shape(k):
            what = ("is not a tensor of the model" if k not in expected
                    else f"has shape {dense.shape(k)}, the model {expected[k]}")
            raise CheckpointError(f"{dense.path}: {k} {what}; the checkpoint is damaged, re-run `lowbit quantize`")


def verify_checkpoint(path: str | os.PathLike, cache: Path | None = None) -> dict[str, Any]:
    """Everything load_checkpoint checks short of building the model, for `lowbit info --verify`:
    the manifest, the listing, sizes and sha256 of every file (hashed anew unless `cache`), the
    config, both tensor headers and each layer's tensors. Returns the manifest."""
    path = Path(path)
    manifest = read_manifest(path)
    verify_files(path, manifest, True, cache)
    _read_config(path)
    _check_tokenizer_files(path, manifest)
    for fname in (QUANT_FILE, DENSE_FILE):
        tensors = _Tensors(path / fname)
        try:
            if fname == QUANT_FILE:
                by_layer = _layer_parts(tensors, manifest["layers"])
                for name, meta in manifest["layers"].items():
                    _check_layer_tensors(name, meta, by_layer.get(name, []), tensors)
        finally:
            tensors.close()
    return manifest


def _check_tokenizer_files(path: Path, manifest: dict[str, Any]) -> bool:
    """Whether the checkpoint has a tokenizer; one without tokenizer.json is an error, as lowbit
    saves fast tokenizers only and transformers would otherwise look for other formats."""
    files = manifest["files"]
    if not any(n.startswith("tokenizer") or n == "special_tokens_map.json" for n in files):
        return False
    if TOKENIZER_FILE not in files:
        raise CheckpointError(f"{path}: the manifest lists tokenizer files but not {TOKENIZER_FILE}; the "
                              "checkpoint is incomplete, re-run `lowbit quantize`")
    return True




class StoredWeights(Mapping[str, PackedWeight]):
    """The records of an open checkpoint, {layer name: PackedWeight}, each read from the file when
    it is asked for (so a loader holds one layer's stored tensors at a time). `codes_into`: for
    some layers, a uint8 buffer of their packed codes' shape to read the codes straight into (the
    runtime's fusion buffers); `meta(name)` is the record with every tensor on the meta device
    (shapes, dtypes and bytes, nothing read); `bias(name)` the stored bias, or None."""

    def __init__(self, quant: _Tensors, layers: dict[str, LayerEntry], parts: dict[str, list[str]]):
        self._quant, self._layers, self._parts = quant, layers, parts
        self.codes_into: dict[str, torch.Tensor] = {}

    def __getitem__(self, name: str) -> PackedWeight:
        e = self._layers[name]
        into = self.codes_into.get(name)
        return PackedWeight(e.fmt, e.shape, {p: self._quant.get(f"{name}.{p}", out=into if p == "codes" else None)
                                             for p in self._parts.get(name, []) if _PART.fullmatch(p)})

    def __iter__(self) -> Iterator[str]:
        return iter(self._layers)

    def __len__(self) -> int:
        return len(self._layers)

    def meta(self, name: str) -> PackedWeight:
        e = self._layers[name]
        return PackedWeight(e.fmt, e.shape, {p: self._quant.meta(f"{name}.{p}") for p in self._parts.get(name, [])
                                             if _PART.fullmatch(p)})

    def bias(self, name: str) -> torch.Tensor | None:
        return self._quant.get(f"{name}.bias") if "bias" in self._parts.get(name, []) else None

    def bias_meta(self, name: str) -> torch.Tensor | None:
        return self._quant.meta(f"{name}.bias") if "bias" in self._parts.get(name, []) else None


class StoredCheckpoint:
    """An open, checked checkpoint folder (open_checkpoint): its manifest, the model config.json
    describes (built empty by empty_model), the records (`weights`) and the dense tensors
    (dense_state). close() (or a with block) closes the files; tokenizer() waits for the
    tokenizer, read in a thread beside the tensors."""

    def __init__(self, path: Path, manifest: dict[str, Any], config: Any, tokenizer: _Background | None,
                 quant: _Tensors, dense: _Tensors, parts: dict[str, list[str]]):
        self.path, self.manifest, self.config = path, manifest, config
        self.layers = {n: LayerEntry.from_dict(e) for n, e in manifest["layers"].items()}
        self.dtype = getattr(torch, manifest["dtype"])
        self._tokenizer, self._quant, self._dense = tokenizer, quant, dense
        self.weights = StoredWeights(quant, self.layers, parts)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._quant.close()
        self._dense.close()

    def tokenizer(self) -> Any:
        return None if self._tokenizer is None else self._tokenizer.result()

    def empty_model(self, dtype: torch.dtype | None = None) -> nn.Module:
        """The model config.json describes, with empty (meta) weights, checked against the manifest
        and the dense file's header: every quantized layer an nn.Linear of its shape, every dense
        tensor a model tensor of its shape."""
        from accelerate import init_empty_weights
        from transformers import AutoModelForCausalLM

        try:
            with init_empty_weights(include_buffers=False):
                model = AutoModelForCausalLM.from_config(self.config, dtype=dtype or self.dtype,
                                                         trust_remote_code=False)
        except ValueError as e:  # an architecture with no causal-LM class
            raise CheckpointError(f"{self.path / CONFIG_FILE}: transformers cannot build a causal language model "
                                  f"from it ({e})") from None
        _check_against_model(model, self.manifest["layers"], self._dense, self.path)
        return model

    def dense_keys(self) -> list[str]:
        return list(self._dense.keys)

    def dense_meta(self) -> dict[str, torch.Tensor]:
        """The dense tensors on the meta device (shapes and dtypes, nothing read)."""
        return {k: self._dense.meta(k) for k in self._dense.keys}

    def dense_state(self, dtype: torch.dtype | None = None, skip: Iterable[str] = ()) -> dict[str, torch.Tensor]:
        """The dense tensors, floats converted to `dtype` (default: as saved), but those in `skip`."""
        skip = set(skip)
        return {k: self._dense.get(k, dtype or self.dtype) for k in self._dense.keys if k not in skip}

    def mapped(self, key: str) -> torch.Tensor | None:
        """The dense tensor `key` memory-mapped from the file (_Tensors.mapped), or None where the
        file has no such tensor."""
        return None if self._dense.shape(key) is None else self._dense.mapped(key)


def open_checkpoint(path: str | os.PathLike, verify: bool | str = True) -> StoredCheckpoint:
    """The checkpoint folder `path`, checked and open for reading.

    Nothing in the folder is parsed before it is checked: first the manifest's structure, then that
    the folder holds exactly the files it lists (verify_files), then their sizes and, with `verify`,
    their sha256; then config.json (without its quantization_config, with no code from the folder),
    each tensor file's header (dtypes, shapes and byte ranges) and every layer's tensor shapes.

    `verify`: True checks every file's size and sha256 against the manifest, the hash taken from
    a stamp in lowbit's cache (paths.cache_dir) when the file is unchanged since it was last
    hashed (same size and modification time); "full" hashes every file regardless; False checks
    sizes only.
    """
    if verify not in (True, False, "full"):
        raise ConfigError(f"verify={verify!r}: use True (hashes, remembered while files are unchanged), "
                          "'full' (hash every file) or False (sizes only)")
    path = Path(path)
    manifest = read_manifest(path)
    verify_files(path, manifest, hashes=bool(verify), cache=None if verify == "full" else cache_dir())
    config = _read_config(path)
    # the tokenizer in a thread beside the weights: transformers parses tokenizer.json in Python
    # (about a second for a 150k vocabulary) while the tensors are mostly waiting on reads and
    # copies that let go of the GIL
    tokenizer = _Background(_read_tokenizer, path) if _check_tokenizer_files(path, manifest) else None
    quant = _Tensors(path / QUANT_FILE)
    try:
        dense = _Tensors(path / DENSE_FILE)
    except BaseException:
        quant.close()
        raise
    try:
        layers = manifest["layers"]
        by_layer = _layer_parts(quant, layers)
        for name, meta in layers.items():
            _check_layer_tensors(name, meta, by_layer.get(name, []), quant)
    except BaseException:
        quant.close()
        dense.close()
        raise
    return StoredCheckpoint(path, manifest, config, tokenizer, quant, dense, by_layer)
