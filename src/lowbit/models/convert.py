"""Convert a GGUF file, once, to a plain Hugging Face safetensors folder in the cache.

transformers reads a GGUF with `from_pretrained(dir, gguf_file=NAME)` and dequantizes every tensor
to float32, which is slow (much of it building the tokenizer). The result
carries a GGUF `quantization_config` that makes `save_pretrained` refuse it, so we drop that
config, rebuild the model from the config on the meta device, move the dequantized tensors in
(`assign=True`, no copy), and save model and tokenizer. Later loads read the folder in seconds.

The folder is `<cache>/hf/<gguf stem>-<first 16 hex of the gguf sha256>/`, written to a temporary
folder and renamed into place, so a folder that exists is complete. It holds
`lowbit-source.json` naming the GGUF it came from and the size and sha256 of every other file in
it. Each use checks the folder against that record (stamps, see hashing.py, spare rehashing
unchanged files); a folder that fails is converted again from the GGUF, whose own sha256 the
caller has verified.

Before transformers reads a GGUF, its header is checked (gguf_header.py), and a conversion that
leaves any weight randomly initialized is refused: nothing is cached then.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import struct
import sys
import tempfile
import time
from pathlib import Path

import torch
import transformers
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from lowbit.errors import ConfigError
from lowbit.models.checks import check_loading_info
from lowbit.models.gguf_header import check_gguf
from lowbit.models.hashing import (
    external_stamp,
    sha256_file,
    stamped_sha256,
    write_stamp,
)
from lowbit.paths import cache_dir

log = logging.getLogger(__name__)

SOURCE_RECORD = "lowbit-source.json"


def converted_dir(gguf: Path, sha256: str, cache: Path | None = None) -> Path:
    """The cache folder that holds (or will hold) the conversion of this GGUF file."""
    return cache_dir(cache) / "hf" / f"{Path(gguf).stem}-{sha256[:16]}"


def ensure_converted(
    gguf: Path, sha256: str, cache: Path | None = None, progress: bool = True
) -> Path:
    """The converted folder of `gguf`, converting it first if the cache lacks it or if the folder
    no longer matches its record (then with a warning naming what changed)."""
    dest = converted_dir(gguf, sha256, cache)
    root = cache_dir(cache)
    if (dest / SOURCE_RECORD).is_file():
        problem = verify_converted(dest, sha256, root)
        if problem is None:
            return dest
        log.warning("the converted folder %s does not match its record (%s); converting %s again",
                    dest, problem, gguf.name)
        _remove(dest)
    elif dest.exists():  # not written by us: rename is atomic, and we always write the record
        if progress:
            print(f"lowbit: replacing incomplete folder {dest}", file=sys.stderr, flush=True)
        _remove(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    if progress:
        print(f"lowbit: converting {gguf.name} to safetensors in {dest} (once)", file=sys.stderr)
    start = time.perf_counter()
    tmp = Path(tempfile.mkdtemp(dir=dest.parent, prefix=f".{dest.name}.tmp-"))
    try:
        convert_gguf(gguf, tmp, sha256)
        files = record_files(tmp)
        tmp.chmod(0o755)  # mkdtemp makes it private; the cache is not
        try:
            tmp.rename(dest)
        except OSError:
            if not (dest / SOURCE_RECORD).is_file():  # not a lost race with another process
                raise
        else:  # hashed as written just above: stamp them so the next use need not rehash
            for name, meta in files.items():
                write_stamp(dest / name, external_stamp(dest / name, root), meta["sha256"])
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if progress:
        print(f"lowbit: converted in {time.perf_counter() - start:.0f} s", file=sys.stderr)
    return dest


def record_files(folder: Path) -> dict[str, dict[str, int | str]]:
    """Add {"files": {name: {"bytes", "sha256"}}} for every file but the record itself to the
    folder's SOURCE_RECORD; returns that mapping."""
    record_path = folder / SOURCE_RECORD
    record = json.loads(record_path.read_text())
    files = {
        p.relative_to(folder).as_posix(): {"bytes": p.stat().st_size, "sha256": sha256_file(p)}
        for p in sorted(folder.rglob("*")) if p.is_file() and p != record_path
    }
    record["files"] = files
    record_path.write_text(json.dumps(record, indent=2) + "\n")
    return files


def verify_converted(folder: Path, sha256: str, cache: Path) -> str | None:
    """None if `folder` holds exactly the files its record lists, with their sizes and sha256,
    converted from the GGUF with this sha256; otherwise what is wrong."""
    try:
        record = json.loads((folder / SOURCE_RECORD).read_text())
    except (OSError, UnicodeDecodeError, ValueError):
        return f"{SOURCE_RECORD} is unreadable"
    if not isinstance(record, dict) or record.get("gguf_sha256") != sha256:
        return f"{SOURCE_RECORD} names another GGUF file"
    files = record.get("files")
    if not isinstance(files, dict) or not files:
        return f"{SOURCE_RECORD} lists no file hashes (made by an older lowbit)"
    present = {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()} - {SOURCE_RECORD}
    if present != set(files):
        extra, missing = sorted(present - set(files)), sorted(set(files) - present)
        return ", ".join([*(f"{n} added" for n in extra), *(f"{n} missing" for n in missing)])
    for name, meta in files.items():
        path = folder / name
        if not isinstance(meta, dict) or path.stat().st_size != meta.get("bytes"):
            return f"{name} changed size"
        if stamped_sha256(path, external_stamp(path, cache)) != meta.get("sha256"):
            return f"{name} changed (sha256 differs)"
    return None


def _remove(folder: Path) -> None:
    """Delete a cache folder, first renaming it aside so that its name is free at once."""
    aside = folder.with_name(f".{folder.name}.old-{os.getpid()}")
    folder.rename(aside)
    shutil.rmtree(aside, ignore_errors=True)


# what transformers' GGUF reader and tokenizer builders raise on a file they cannot use
_GGUF_LOAD_ERRORS = (ValueError, KeyError, IndexError, TypeError, NotImplementedError, struct.error, OSError)


def convert_gguf(gguf: Path, out: Path, sha256: str) -> None:
    """Dequantize `gguf` and save it as a float32 safetensors folder (model + tokenizer) in `out`.

    Refuses (ConfigError) a file whose header is damaged or disagrees with its tensors, and a load
    that leaves any weight missing or of the wrong shape (transformers would initialize it randomly).
    """
    check_gguf(gguf)
    try:
        model, info = AutoModelForCausalLM.from_pretrained(
            gguf.parent, gguf_file=gguf.name, dtype=torch.float32, output_loading_info=True,
            trust_remote_code=False,
        )
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name, trust_remote_code=False)
    except _GGUF_LOAD_ERRORS as e:
        raise ConfigError(
            f"transformers {transformers.__version__} cannot load the GGUF file {gguf}: {e}"
        ) from e
    check_loading_info(info, f"the GGUF file {gguf}")
    plain = without_quantization_config(model)
    plain.save_pretrained(out)
    tokenizer.save_pretrained(out)
    record = {
        "gguf_file": gguf.name,
        "gguf_sha256": sha256,
        "model_type": plain.config.model_type,
        "dtype": "float32",
        "transformers": transformers.__version__,
    }
    (out / SOURCE_RECORD).write_text(json.dumps(record, indent=2) + "\n")


def without_quantization_config(model: PreTrainedModel) -> PreTrainedModel:
    """The same weights in a model whose config has no GGUF quantization_config.

    The tensors are shared with `model`, not copied; tied embeddings are tied again. Buffers that
    are not in the state dict (rotary frequencies) stay on the meta device, so the result is only
    fit for `save_pretrained`.
    """
    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    with torch.device("meta"):
        plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(model.state_dict(), assign=True)
    plain.tie_weights()
    plain.generation_config = model.generation_config
    return plain
