"""Convert a GGUF file, once, to a plain Hugging Face safetensors folder in the cache.

transformers reads a GGUF with `from_pretrained(dir, gguf_file=NAME)`, which dequantizes every
tensor to float32 in memory at once (about 9 GB for a 1.5B model, 30 GB for a 7B one) and is slow
(much of it building the tokenizer). The conversion here reads the tensors one at a time with the
same pieces of transformers (gguf_tensors.py) and writes them into safetensors shards as they come
(shards.py), so it holds about one shard (SHARD_BYTES) of weights at a time; config, generation
config (without the GGUF `quantization_config`) and tokenizer are saved as `save_pretrained` saves
them. Later loads read the folder in seconds.

The folder is `<cache>/hf/<gguf stem>-<first 16 hex of the gguf sha256>/`, written to a temporary
folder and renamed into place, so a folder that exists is complete. It holds
`lowbit-source.json` naming the GGUF it came from and the size and sha256 of every other file in
it. Each use checks the folder against that record (stamps, see hashing.py, spare rehashing
unchanged files); a folder that fails is converted again from the GGUF, whose own sha256 the
caller has verified.

Before a GGUF is read, its header is checked (gguf_header.py), and a conversion that would leave
any weight missing or of the wrong shape is refused: nothing is cached then.
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
from transformers import AutoTokenizer

from lowbit.errors import ConfigError, LowbitError
from lowbit.models.checks import check_loading_info
from lowbit.models.gguf_header import check_gguf
from lowbit.models.gguf_tensors import DTYPE, GGUFSource
from lowbit.models.hashing import (
    external_stamp,
    sha256_file,
    stamped_sha256,
    write_stamp,
)
from lowbit.models.shards import ShardWriter
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

SHARD_BYTES = 1 << 30  # the most float32 bytes held (and written by one save_file) at a time


def convert_gguf(gguf: Path, out: Path, sha256: str, *, shard_bytes: int = SHARD_BYTES) -> None:
    """Dequantize `gguf` a tensor at a time into a float32 safetensors folder (model + tokenizer)
    in `out`, holding at most one shard (`shard_bytes`, or a bigger single tensor) in memory.

    Refuses (ConfigError) a file whose header is damaged or disagrees with its tensors, and one
    that leaves any weight missing or of the wrong shape (transformers would initialize it randomly).
    """
    check_gguf(gguf)
    try:
        source = GGUFSource.open(gguf)
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name, trust_remote_code=False)
    except LowbitError:
        raise
    except _GGUF_LOAD_ERRORS as e:
        raise ConfigError(
            f"transformers {transformers.__version__} cannot load the GGUF file {gguf}: {e}"
        ) from e
    out.mkdir(parents=True, exist_ok=True)
    shards = ShardWriter(out, shard_bytes)
    shapes = {}
    for tensor in source.reader.tensors:  # no reference to one is kept here once it is written
        shards.make_room(int(tensor.n_elements) * 4)  # before it is dequantized to float32
        _keep(source.read(tensor), source, shards, shapes)
    for named in source.put_together().items():
        _keep(named, source, shards, shapes)
    check_loading_info(source.loading_info(shapes), f"the GGUF file {gguf}")
    shards.finish()
    model = source.model  # as save_pretrained describes a model in its config
    model.config.architectures = [type(model).__name__]
    model.config.dtype = DTYPE
    model.config.save_pretrained(out)
    model.generation_config.save_pretrained(out)
    tokenizer.save_pretrained(out)
    record = {
        "gguf_file": gguf.name,
        "gguf_sha256": sha256,
        "model_type": model.config.model_type,
        "dtype": "float32",
        "transformers": transformers.__version__,
    }
    (out / SOURCE_RECORD).write_text(json.dumps(record, indent=2) + "\n")


def _keep(named: tuple[str, torch.Tensor] | None, source: GGUFSource, shards: ShardWriter,
          shapes: dict[str, torch.Size]) -> None:
    """Note the shape of a tensor read from the GGUF file (None: one the model does not use), and
    write it if the model stores it with that shape (a wrong one is refused by check_loading_info
    once all are read)."""
    if named is None:
        return
    name, value = named
    if name in shapes:
        raise ConfigError(f"the GGUF file {source.path} holds two tensors for the model's {name}; it is "
                          "damaged or not a model transformers can read")
    shapes[name] = value.shape
    if source.weights.get(name) == value.shape:
        shards.add(name, value)
