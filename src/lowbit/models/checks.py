"""What a model folder must be before lowbit loads it, and what transformers must report after.

lowbit loads only safetensors weights and never runs code shipped with a model:
  - pickled weights (*.bin, *.pt, *.pth, *.ckpt) can run code when unpickled: refused;
  - a config.json or tokenizer_config.json with `auto_map` names Python files in the folder that
    transformers would import (with trust_remote_code): refused, as is a model_type transformers
    does not know, for which only such code could build the model;
  - a folder that looks like a lowbit checkpoint is not a plain model folder;
  - a load that leaves weights missing (randomly initialized) or of the wrong shape is refused.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from lowbit.errors import ConfigError, ModelNotFoundError

log = logging.getLogger(__name__)

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")
_CONVERT_HINT = (
    "lowbit loads only safetensors weights, because unpickling a file can run code. In an environment "
    "you trust with this file, convert it: `model = AutoModelForCausalLM.from_pretrained(FOLDER); "
    "model.save_pretrained(NEW_FOLDER)` writes model.safetensors"
)


def check_no_pickle(folder: Path) -> None:
    """Refuse a folder whose weights are pickle files only."""
    if any(p.suffix == ".safetensors" for p in folder.iterdir()):
        return
    pickled = sorted(p.name for p in folder.iterdir() if p.is_file() and p.suffix in PICKLE_SUFFIXES)
    if pickled:
        raise ConfigError(f"folder {folder} holds pickled weights ({', '.join(pickled[:3])}) and no "
                          f"*.safetensors. {_CONVERT_HINT}")


def check_config(folder: Path) -> str:
    """Refuse a folder whose model would need code from the folder; returns its model_type."""
    from transformers import CONFIG_MAPPING

    config = _read_json(folder / "config.json")
    for name, cfg in (("config.json", config), ("tokenizer_config.json",
                                                _read_json(folder / "tokenizer_config.json", missing_ok=True))):
        if isinstance(cfg, dict) and cfg.get("auto_map"):
            raise ConfigError(
                f"{folder / name} has an auto_map ({', '.join(sorted(cfg['auto_map']))}): this model needs "
                "Python code from its folder, and lowbit never runs code from a model folder. Use a model "
                "that transformers supports natively"
            )
    model_type = config.get("model_type")
    if not isinstance(model_type, str) or not model_type:
        raise ConfigError(f"{folder / 'config.json'} has no model_type, so transformers cannot tell which "
                          "architecture it is; it is not a complete Hugging Face model folder")
    if model_type not in CONFIG_MAPPING:
        import transformers

        raise ConfigError(
            f"{folder / 'config.json'} names model_type {model_type!r}, which transformers "
            f"{transformers.__version__} does not know; building it would need code from the model folder, "
            "which lowbit never runs. Use a supported architecture or a newer transformers"
        )
    return model_type


def check_loading_info(info: Mapping[str, Any], what: str) -> None:
    """Refuse a load that left weights randomly initialized or reshaped (transformers' MISSING /
    MISMATCHED report); say once that unexpected tensors were ignored."""
    missing = sorted(info.get("missing_keys") or ())
    mismatched = sorted(str(k[0]) if isinstance(k, tuple) else str(k) for k in info.get("mismatched_keys") or ())
    if missing or mismatched:
        parts = []
        if missing:
            parts.append(f"{len(missing)} tensors missing ({_some(missing)})")
        if mismatched:
            parts.append(f"{len(mismatched)} tensors with the wrong shape ({_some(mismatched)})")
        raise ConfigError(
            f"{what} does not hold the weights its config describes: {'; '.join(parts)}. transformers would "
            "fill them with random values; the file is incomplete or its header/config disagrees with its "
            "tensors. Use a complete, unmodified copy of the model"
        )
    unexpected = sorted(info.get("unexpected_keys") or ())
    if unexpected:
        log.warning("%s holds %d tensors its config does not use, ignored: %s", what, len(unexpected),
                    _some(unexpected))


def _some(names: list[str], n: int = 3) -> str:
    return ", ".join(names[:n]) + (f" and {len(names) - n} more" if len(names) > n else "")


def _read_json(path: Path, missing_ok: bool = False) -> dict[str, Any] | None:
    if missing_ok and not path.is_file():
        return None
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ModelNotFoundError(f"{path} is missing; the folder is not a Hugging Face model folder") from None
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise ConfigError(f"{path} is not valid JSON ({e}); the model folder is damaged") from None
    if not isinstance(value, dict):
        raise ConfigError(f"{path} holds a JSON {type(value).__name__}, not an object; the model folder is damaged")
    return value
