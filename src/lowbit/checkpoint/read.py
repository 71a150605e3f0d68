"""Open a checkpoint folder for reading: records out. Nothing here knows a runtime.

open_checkpoint checks the folder (verify.py: manifest, listing, sizes and hashes, config, both
tensor headers, every layer's tensor shapes) before anything is parsed or allocated, and hands
back a StoredCheckpoint: the empty model from config.json, the records (StoredWeights, read one
layer at a time, packed as stored) and the dense tensors. Putting runtime modules in place is
runtime/convert.py's job; lowbit.loading joins the two.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any, Self

import torch
from torch import nn

from lowbit.checkpoint.manifest import _PART, DENSE_FILE, LayerEntry, Manifest
from lowbit.checkpoint.tensors import _Tensors
from lowbit.checkpoint.verify import (
    _check_against_model,
    _check_layer_tensors,
    _check_tokenizer_files,
    _layer_parts,
    _read_config,
    verify_files,
)
from lowbit.errors import CheckpointError, ConfigError
from lowbit.marks import CONFIG_FILE, QUANT_FILE, looks_like_checkpoint
from lowbit.paths import cache_dir
from lowbit.qtensor import PackedWeight


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


def _read_tokenizer(path: Path) -> Any:
    """The checkpoint's tokenizer through AutoTokenizer, with no code from the folder."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path, trust_remote_code=False)
    except Exception as e:  # noqa: BLE001 - transformers and tokenizers raise many types on bad files
        raise CheckpointError(f"{path}: the tokenizer files could not be loaded ({type(e).__name__}: {e}); "
                              "re-run `lowbit quantize`") from None


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

    def __init__(self, path: Path, manifest: Manifest, config: Any, tokenizer: _Background | None,
                 quant: _Tensors, dense: _Tensors, parts: dict[str, list[str]]):
        self.path, self.manifest, self.config = path, manifest, config
        self.layers = manifest.layers
        self.dtype = getattr(torch, manifest.dtype)
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
        _check_against_model(model, self.layers, self._dense, self.path)
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

    def dense_tensor(self, key: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The dense tensor `key`, a float one converted to `dtype` (default: as saved), read into
        its own buffer."""
        return self._dense.get(key, dtype or self.dtype)

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
    manifest = Manifest.read(path)
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
        by_layer = _layer_parts(quant, manifest.layers)
        for name, entry in manifest.layers.items():
            _check_layer_tensors(name, entry, by_layer.get(name, []), quant)
    except BaseException:
        quant.close()
        dense.close()
        raise
    return StoredCheckpoint(path, manifest, config, tokenizer, quant, dense, by_layer)
