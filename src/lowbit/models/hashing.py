"""sha256 of model files, with a stamp so a large file is hashed once, not on every call.

A stamp is a small JSON file {"sha256", "size", "mtime_ns"}. It is trusted only while the file
still has the recorded size and modification time; otherwise the file is hashed again. A file
modified in the last STAMP_MIN_AGE seconds is hashed but not stamped: file times advance in clock
ticks, so a write in the same tick as the hash could leave size and time unchanged (git's "racily
clean" entries; it re-checks them the same way).
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path

CHUNK = 1 << 20  # read files 1 MiB at a time
WEIGHT_SUFFIXES = (".safetensors", ".bin")  # files that make up a folder's weights
STAMP_MIN_AGE = 2.0  # seconds since a file's last modification before its hash is stamped


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(CHUNK):
            digest.update(block)
    return digest.hexdigest()


def _read_stamp(path: Path, stamp: Path) -> str | None:
    """The sha256 recorded in `stamp` if it still describes `path`, else None."""
    try:
        record = json.loads(stamp.read_text())
        st = path.stat()
    except (OSError, ValueError):
        return None
    if not isinstance(record, dict):
        return None
    if record.get("size") != st.st_size or record.get("mtime_ns") != st.st_mtime_ns:
        return None
    sha = record.get("sha256")
    return sha if isinstance(sha, str) else None


def write_stamp(path: Path, stamp: Path, sha256: str) -> None:
    """Record that `path`, at its current size and mtime, has this sha256 (atomic write). For a
    file the caller has just written itself and whose bytes it hashed as it wrote them."""
    st = path.stat()
    record = {"sha256": sha256, "size": st.st_size, "mtime_ns": st.st_mtime_ns}
    stamp.parent.mkdir(parents=True, exist_ok=True)
    tmp = stamp.with_name(f"{stamp.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(record) + "\n")
    os.replace(tmp, stamp)


def stamped_sha256(path: Path, stamp: Path) -> str:
    """sha256 of `path`, read from `stamp` when still valid, else computed and stamped."""
    sha = _read_stamp(path, stamp)
    if sha is None:
        before = path.stat()
        sha = sha256_file(path)
        # stamped only if the file was not modified while it was read, nor within the last
        # STAMP_MIN_AGE seconds (a later write in the same clock tick would go unnoticed)
        if path.stat().st_mtime_ns == before.st_mtime_ns and time.time_ns() - before.st_mtime_ns > STAMP_MIN_AGE * 1e9:
            write_stamp(path, stamp, sha)
    return sha


def external_stamp(path: Path, cache: Path) -> Path:
    """Where the stamp of a file outside the cache lives: <cache>/stamps/<hash of its path>.json.

    Stamps of user files go in the cache, so lowbit never writes next to the user's model.
    """
    key = hashlib.sha256(str(Path(path).resolve()).encode()).hexdigest()[:32]
    return cache / "stamps" / f"{key}.json"


def folder_sha256(folder: Path, cache: Path) -> str | None:
    """One sha256 for the weights of a Hugging Face folder, or None if it holds none.

    Definition: list the folder's top-level weight files (*.safetensors, *.bin) in sorted name
    order as `sha256sum` prints them ("<hex>  <name>\\n" per file) and hash that text. In a shell:
    `cd FOLDER && LC_ALL=C sha256sum *.safetensors | sha256sum` (for a folder without .bin files).
    Config and tokenizer files are not included.
    """
    weights = (p for p in folder.iterdir() if p.is_file() and p.suffix in WEIGHT_SUFFIXES)
    files = sorted(weights, key=lambda p: p.name)
    if not files:
        return None
    listing = "".join(f"{stamped_sha256(p, external_stamp(p, cache))}  {p.name}\n" for p in files)
    return hashlib.sha256(listing.encode()).hexdigest()
