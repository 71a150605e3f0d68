"""What marks a folder as a lowbit checkpoint, complete or damaged: one definition for the
loaders (a checkpoint is never opened as a plain model folder), the checkpoint reader and the
output rules (--force replaces only what lowbit wrote). Imports nothing of lowbit's but errors."""

from __future__ import annotations

import json
import os
from pathlib import Path

from lowbit.errors import CheckpointError

FORMAT = "lowbit-checkpoint"        # manifest.json's "format"
QUANT_METHOD = "lowbit"             # config.json's quantization_config.quant_method
MANIFEST = "manifest.json"
QUANT_FILE = "quantized.safetensors"
CONFIG_FILE = "config.json"
MAX_JSON_BYTES = 64 << 20           # a manifest or config larger than this is not read
PARTIAL_RECORD = "lowbit-partial.json"  # the progress record of a streamed job's unfinished folder
PARTIAL_FORMAT = "lowbit-partial"   # its "format"


def read_json_or_none(path: Path) -> object | None:
    """The JSON value in `path`, or None where it is missing, too large or not JSON."""
    try:
        if not path.is_file() or path.stat().st_size > MAX_JSON_BYTES:
            return None
        return json.loads(path.read_bytes())
    except (OSError, ValueError, RecursionError):
        return None


def names_lowbit(config_file: Path) -> bool:
    """Whether a config.json's quantization_config names lowbit (a file that is not JSON does not)."""
    config = read_json_or_none(config_file)
    q = config.get("quantization_config") if isinstance(config, dict) else None
    return isinstance(q, dict) and q.get("quant_method") == QUANT_METHOD


def is_lowbit_manifest(manifest_file: Path) -> bool:
    """Whether a manifest.json carries lowbit's format mark (any format version); another tool's
    manifest.json, or a file that is not JSON, does not."""
    manifest = read_json_or_none(manifest_file)
    return isinstance(manifest, dict) and manifest.get("format") == FORMAT


def checkpoint_signs(path: str | os.PathLike) -> list[str]:
    """The marks of a lowbit checkpoint that the folder `path` carries: its manifest.json, its
    quantized.safetensors, a config.json whose quantization_config names lowbit. Empty for
    anything else."""
    p = Path(path)
    if not p.is_dir():
        return []
    signs = [name for name in (MANIFEST, QUANT_FILE, PARTIAL_RECORD) if (p / name).exists()]
    if names_lowbit(p / CONFIG_FILE):
        signs.append(f"a {CONFIG_FILE} whose quantization_config names lowbit")
    return signs


def looks_like_checkpoint(path: str | os.PathLike) -> bool:
    """Whether `path` is a folder that is, or claims to be, a lowbit checkpoint. Such a folder is
    only opened by load_checkpoint, which refuses it when damaged: opened as a plain Hugging Face
    folder, its quantized layers would be initialised at random."""
    return bool(checkpoint_signs(path))


def check_not_checkpoint(path: str | os.PathLike) -> None:
    """For loaders of plain model folders: a CheckpointError if `path` is, or looks like, a lowbit
    checkpoint."""
    p = Path(path)
    signs = checkpoint_signs(p)
    if not signs:
        return
    if (p / MANIFEST).is_file():
        raise CheckpointError(f"{p} is a lowbit checkpoint, not a Hugging Face model folder: lowbit eval, generate "
                              "and info take it as it is (in Python: lowbit.load or lowbit.load_checkpoint); quantize "
                              "from its source model")
    raise CheckpointError(missing_manifest(p))


def partial_record(path: Path) -> dict | None:
    """The progress record of the unfinished streamed job in folder `path`, or None where there is
    none (or it is not one of lowbit's)."""
    record = read_json_or_none(path / PARTIAL_RECORD)
    return record if isinstance(record, dict) and record.get("format") == PARTIAL_FORMAT else None


def incomplete_message(path: Path, record: dict) -> str:
    """What to say about the unfinished folder `path` of a streamed job, with how to resume it."""
    blocks, total = record.get("blocks"), record.get("n_blocks")
    done = f"{len(blocks)} of {total} blocks" if isinstance(blocks, list) and isinstance(total, int) else "part"
    command = record.get("command")
    how = (f"`{command} --resume`" if isinstance(command, str) and command.startswith("lowbit ")
           else "the same `lowbit quantize ... --stream` command with --resume added")
    return (f"{path} is an incomplete checkpoint: a streamed `lowbit quantize` wrote {done} of it and stopped. "
            f"Continue it with {how}; it cannot be evaluated or loaded before it is finished")


def missing_manifest(path: Path) -> str:
    """The message for a folder with a checkpoint's marks but no manifest (an unfinished streamed
    job's folder says how to resume it)."""
    record = partial_record(path)
    if record is not None:
        return incomplete_message(path, record)
    sign = next(s for s in checkpoint_signs(path) if s != MANIFEST)
    return (f"{path} looks like a damaged lowbit checkpoint: it has {sign} but no {MANIFEST}, so nothing says "
            "which layers are quantized or which bytes are right; re-run `lowbit quantize` or copy the "
            "checkpoint again")
