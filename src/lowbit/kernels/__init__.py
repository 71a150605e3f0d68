"""Native CPU kernels, compiled from kernels/csrc on first use and cached.

Each extension is built once per (its sources, torch version, CPU) with torch's C++ extension builder
(`-O3 -march=native -fopenmp -ffp-contract=off`: no fused multiply-adds the source does not
write, so scalar float code computes what torch computes) into <cache>/kernels, so a fresh machine pays the build once (tens of
seconds) and later processes load the shared object directly. `lowbit kernels` builds them
ahead of time. Every kernel has a torch reference beside its caller; when a build is impossible
(no C++ compiler), `load` raises KernelUnavailable and callers fall back to that reference with
one warning, so nothing depends on a compiler being present.

    ext = kernels.load("kv_attention")
    scores = ext.key_scores(q, codes, scales, zeros, bits, block)
"""

from __future__ import annotations

import hashlib
import logging
import os
import platform
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import ModuleType

import torch

from lowbit.errors import LowbitError
from lowbit.paths import cache_dir

log = logging.getLogger(__name__)

SOURCES = Path(__file__).parent / "csrc"
# the C++ files each extension is compiled from, its Python binding first (csrc/*.h: shared headers)
FILES = {
    "kv_attention": ("kv_attention.cpp",),
    "qgemv": ("qgemv.cpp", "layout.cpp", "gemv.cpp", "bf16_kernel.cpp", "bf16_product.cpp", "decoder.cpp",
              "w4a8.cpp", "act_quant.cpp"),
}
NAMES = tuple(FILES)
DISABLE_ENV = "LOWBIT_NO_KERNELS"   # set to 1 to use the torch references everywhere

_loaded: dict[str, ModuleType] = {}
_failed: dict[str, str] = {}
_lock = threading.Lock()


class KernelUnavailable(LowbitError, RuntimeError):
    """A native kernel could not be built or loaded; the torch reference is used instead."""


def _build_dir(name: str, sources: list[Path], cache: str | os.PathLike | None = None) -> Path:
    """<cache>/kernels/<name>-<key>: the key covers every source file (name and bytes) and header, so
    a change to any of them builds anew."""
    code = b"".join(s.name.encode() + b"\0" + s.read_bytes() for s in sources)
    headers = b"".join(h.read_bytes() for h in sorted(SOURCES.glob("*.h")))
    key = hashlib.sha256(code + headers + torch.__version__.encode() + platform.machine().encode()
                         + _cpu_flags().encode() + b"fp-contract=off").hexdigest()[:16]
    return cache_dir(cache) / "kernels" / f"{name}-{key}"


STALE_LOCK_SECONDS = 600  # a build takes well under a minute; a lock this old was left by a killed one


def _clear_stale_lock(build: Path, max_age: float = STALE_LOCK_SECONDS) -> bool:
    """Remove the lock file torch's extension builder leaves in `build` when a build is killed
    (the next build would otherwise wait on it forever); only one older than `max_age` seconds.
    Whether one was removed."""
    lock = build / "lock"
    try:
        age = time.time() - lock.stat().st_mtime
    except OSError:
        return False
    if age < max_age:
        return False
    log.warning("removing %s, left %.0f s ago by a kernel build that did not finish", lock, age)
    lock.unlink(missing_ok=True)
    return True


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return line
    except OSError:
        pass
    return platform.processor()


def load(name: str, cache: str | os.PathLike | None = None) -> ModuleType:
    """The compiled extension `name` (building it under <cache>/kernels if needed);
    KernelUnavailable if it cannot be."""
    if name not in NAMES:
        raise KeyError(f"unknown kernel {name!r}; known: {', '.join(NAMES)}")
    if os.environ.get(DISABLE_ENV) == "1":
        raise KernelUnavailable(f"native kernels disabled by ${DISABLE_ENV}=1")
    with _lock:
        if name in _loaded:
            return _loaded[name]
        if name in _failed:
            raise KernelUnavailable(_failed[name])
        sources = [SOURCES / f for f in FILES[name]]
        build = _build_dir(name, sources, cache)
        build.mkdir(parents=True, exist_ok=True)
        _clear_stale_lock(build)
        try:
            from torch.utils.cpp_extension import load as build_extension

            if not (build / f"lowbit_{name}.so").exists():  # a cached build loads in a moment: say nothing
                print(f"lowbit: compiling the native kernel {name} (once per machine and torch version, "
                      f"up to a minute) into {build} ...", file=sys.stderr, flush=True)
            mod = build_extension(name=f"lowbit_{name}", sources=[str(s) for s in sources], build_directory=str(build),
                                  extra_cflags=["-O3", "-march=native", "-fopenmp", "-ffp-contract=off"],
                                  extra_ldflags=["-fopenmp"], verbose=False)
        except (RuntimeError, OSError, ImportError, subprocess.CalledProcessError) as e:
            # compiler, ninja or headers missing, a failed build or link: all mean "use the reference"
            _failed[name] = (f"native kernel {name!r} could not be built ({type(e).__name__}: {str(e)[:300]}); "
                             "install a C++ compiler (g++) and ninja (pip install ninja), or set "
                             f"{DISABLE_ENV}=1 to silence this")
            raise KernelUnavailable(_failed[name]) from None
        _loaded[name] = mod
        return mod


_warned: set[str] = set()


def load_or_warn(name: str, instead: str) -> ModuleType | None:
    """The extension `name`, or None when it cannot be built: the caller then runs its torch
    reference (`instead` says what happens, e.g. "packed linears run through torch"), and the
    first failure for each extension is logged once."""
    try:
        return load(name)
    except KernelUnavailable as e:
        if name not in _warned:
            _warned.add(name)
            log.warning("%s; %s", e, instead)
        return None


def available(name: str) -> bool:
    """Whether `name` loads (building it if needed), without raising."""
    try:
        load(name)
        return True
    except KernelUnavailable:
        return False
