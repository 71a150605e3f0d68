"""llama.cpp's tools, fetched and built once: the converter, llama-quantize, llama-imatrix,
llama-perplexity and llama-bench.

The tools come from the llama-cpp-python *source* release on PyPI, whose sdist vendors llama.cpp
under vendor/llama.cpp. `ensure_llamacpp` downloads it with pip (no package code is installed),
builds the tool targets (`BUILD_TARGETS`) with cmake, and keeps the binaries, the converter script
and the Python packages it imports (`conversion/`, `gguf-py/`) in

    <lowbit cache>/llamacpp/llama-cpp-python-<version>/

It needs cmake (>= 3.14) and a C++17 compiler; `python -m pip install cmake` puts a cmake into the
virtual environment when the system has none. The build uses GGML_NATIVE=ON, so the binaries are
tuned to (and may only run on) the CPU that built them; the cache is per machine.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from lowbit.errors import LowbitError
from lowbit.paths import cache_dir

LLAMA_CPP_PYTHON_VERSION = "0.3.36"  # pinned sdist; its vendor/llama.cpp is what gets built

RECORD = "lowbit-llamacpp.json"  # written last into a finished tools folder
QUANTIZE_BIN = "llama-quantize"
IMATRIX_BIN = "llama-imatrix"  # importance matrix from calibration text, for llama-quantize --imatrix
PERPLEXITY_BIN = "llama-perplexity"  # perplexity and KL divergence of a GGUF on a text file
BENCH_BIN = "llama-bench"  # for `lowbit bench speed`
BUILD_TARGETS = (QUANTIZE_BIN, IMATRIX_BIN, PERPLEXITY_BIN, BENCH_BIN)
CONVERT_SCRIPT = "convert_hf_to_gguf.py"
# What the converter needs beside itself (the script puts gguf-py/ first on sys.path, so the
# vendored gguf package, which matches the converter, wins over the installed one).
CONVERTER_FILES = (CONVERT_SCRIPT, "conversion", "gguf-py", "models/templates", "LICENSE")


class LlamaCppError(LowbitError, RuntimeError):
    """Fetching, building or running llama.cpp's tools failed."""


@dataclass(frozen=True)
class LlamaCppTools:
    """A finished llama.cpp tools folder: the converter script and the binaries beside it."""

    root: Path
    version: str  # llama-cpp-python version whose vendored llama.cpp was built
    convert_script: Path  # convert_hf_to_gguf.py (with conversion/ and gguf-py/ beside it)
    quantize_bin: Path  # llama-quantize

    @property
    def imatrix_bin(self) -> Path:
        """llama-imatrix: the importance matrix llama-quantize --imatrix uses."""
        return self.root / IMATRIX_BIN

    @property
    def perplexity_bin(self) -> Path:
        """llama-perplexity: perplexity, and KL divergence against saved reference logits."""
        return self.root / PERPLEXITY_BIN

    @property
    def bench_bin(self) -> Path:
        """llama-bench (prompt processing and generation speed)."""
        return self.root / BENCH_BIN


# ---------------------------------------------------------------------------------------------
# tools: fetch and build once


def tools_dir(cache: Path | None = None) -> Path:
    """The folder that holds built llama.cpp tools: `<lowbit cache>/llamacpp`.

    Each build is a subfolder `llama-cpp-python-<version>/` (see `built_tools`), so builds of
    different versions can coexist; `quantize_with_llamacpp` callers may keep their GGUF files
    in another subfolder, e.g. `quants/`.
    """
    return cache_dir(cache) / "llamacpp"


def built_tools(
    cache: Path | None = None, version: str = LLAMA_CPP_PYTHON_VERSION
) -> LlamaCppTools | None:
    """The tools of `version` if they are already built in the cache, else None."""
    root = tools_dir(cache) / f"llama-cpp-python-{version}"
    tools = LlamaCppTools(root, version, root / CONVERT_SCRIPT, root / QUANTIZE_BIN)
    parts = (root / RECORD, tools.convert_script, *(root / name for name in BUILD_TARGETS))
    return tools if all(p.is_file() for p in parts) else None


def ensure_llamacpp(
    cache: Path | None = None,
    version: str = LLAMA_CPP_PYTHON_VERSION,
    progress: bool = True,
    jobs: int = 2,
) -> LlamaCppTools:
    """The llama.cpp tools of llama-cpp-python `version`, building them first if not cached.

    Building means: pip-download the sdist, extract it, configure vendor/llama.cpp with cmake and
    build the tool targets with `jobs` parallel jobs (ten minutes and more on 2 cores). All
    of it happens in a temporary folder beside the destination, which is renamed into place only
    when complete, so an existing tools folder is always whole. Raises LlamaCppError naming what
    is missing (cmake, a C++ compiler) or which step failed, with the end of its output.
    """
    found = built_tools(cache, version)
    if found is not None:
        say(progress, f"ok (cached) llama.cpp tools: {found.root}")
        return found
    cmake = _find_cmake()
    _check_compiler()
    dest = tools_dir(cache) / f"llama-cpp-python-{version}"
    dest.parent.mkdir(parents=True, exist_ok=True)
    if dest.exists():  # no record: an interrupted copy, never a finished folder
        say(progress, f"replacing incomplete folder {dest}")
        shutil.rmtree(dest)
    start = time.perf_counter()
    work = Path(tempfile.mkdtemp(dir=dest.parent, prefix=f".{dest.name}.tmp-"))
    try:
        say(progress, f"downloading the llama-cpp-python=={version} sdist with pip")
        sdist = _download_sdist(version, work / "sdist")
        say(progress, f"extracting {sdist.name}")
        source = _extract_llamacpp(sdist, work / "src")
        patched = _patch_sources(source, progress)
        log = work / "build.log"
        _build_tools(cmake, source, work / "build", jobs, log, progress)
        stage = work / "tools"
        _stage_tools(source, work / "build", stage)
        shutil.copy2(log, stage / "build.log")
        seconds = time.perf_counter() - start
        record = {"llama_cpp_python": version, "sdist": sdist.name, "build_seconds": round(seconds),
                  "patches": patched}
        (stage / RECORD).write_text(json.dumps(record, indent=2) + "\n")
        try:
            stage.rename(dest)
        except OSError:
            if built_tools(cache, version) is None:  # not a lost race with another build
                raise
    finally:
        shutil.rmtree(work, ignore_errors=True)
    say(progress, f"ok (built in {time.perf_counter() - start:.0f} s) llama.cpp tools: {dest}")
    tools = built_tools(cache, version)
    assert tools is not None
    return tools


def _find_cmake() -> str:
    """Path of a cmake: on PATH, or in this Python's environment (`pip install cmake`)."""
    found = shutil.which("cmake") or shutil.which("cmake", path=str(Path(sys.executable).parent))
    if found is None:
        raise LlamaCppError(
            "building llama.cpp's tools needs cmake, and none was found on PATH or in "
            f"{Path(sys.executable).parent}. Install it with `{sys.executable} -m pip install "
            "cmake` (PyPI ships cmake binaries) or with the system package manager "
            "(e.g. `apt-get install cmake`)."
        )
    return found


def _check_compiler() -> None:
    """Raise LlamaCppError if no C++ compiler is available ($CXX, c++, g++ or clang++)."""
    cxx = os.environ.get("CXX")
    candidates = [cxx] if cxx else ["c++", "g++", "clang++"]
    if not any(shutil.which(c) for c in candidates):
        raise LlamaCppError(
            f"building llama.cpp's tools needs a C++17 compiler; none of "
            f"{', '.join(candidates)} was found. Install one (e.g. `apt-get install g++` or "
            "`apt-get install build-essential`), or point $CXX at it."
        )


def _download_sdist(version: str, dest: Path) -> Path:
    """pip-download the llama-cpp-python source release (no dependencies) into `dest`."""
    dest.mkdir(parents=True)
    cmd = [
        sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
        "--disable-pip-version-check", "--progress-bar", "off", "-q", "-d", str(dest),
        f"llama-cpp-python=={version}",
    ]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    sdists = sorted(dest.glob("llama_cpp_python-*.tar.gz"))
    if proc.returncode != 0 or not sdists:
        errors = [line for line in proc.stderr.splitlines() if "ERROR" in line]
        detail = "\n".join((errors or proc.stderr.splitlines())[-5:])
        raise LlamaCppError(
            f"pip could not download the llama-cpp-python=={version} source release "
            f"(exit {proc.returncode}):\n{detail}\nCheck PyPI access (pip config, proxy)."
        )
    return sdists[0]


# llama.cpp's tools log through a queue that a thread of their own prints, and the logger is
# leaked on purpose (upstream issue 22142), so the lines still queued when a tool returns are lost.
# llama-perplexity prints its results last; one line added before it returns flushes the queue.
# (file, the lines the flush goes after, the line added)
_LOG_FLUSH_PATCHES = (
    ("tools/perplexity/perplexity.cpp", "    common_memory_breakdown_print(ctx);\n",
     "    common_log_flush(common_log_main()); // added by lowbit: print the queued results before returning\n"),
)


def _patch_sources(source: Path, progress: bool) -> list[str]:
    """Apply _LOG_FLUSH_PATCHES to the extracted sources; the files patched. A file whose text
    has changed is left as it is (lowbit.peers.llamacpp_perplexity then reruns a tool whose
    results went missing)."""
    done = []
    for rel, anchor, line in _LOG_FLUSH_PATCHES:
        path = source / rel
        text = path.read_text() if path.is_file() else ""
        if text.count(anchor) != 1:
            say(progress, f"note: {rel} has changed; not adding the log flush there")
            continue
        path.write_text(text.replace(anchor, anchor + line))
        done.append(rel)
    return done


def _extract_llamacpp(sdist: Path, dest: Path) -> Path:
    """Extract the sdist into `dest`; return its vendor/llama.cpp folder."""
    dest.mkdir(parents=True)
    with tarfile.open(sdist) as tar:
        if hasattr(tarfile, "data_filter"):  # refuses links and paths that leave `dest`
            tar.extractall(dest, filter="data")
        else:  # pragma: no cover - Python < 3.10.12
            tar.extractall(dest)
    found = sorted(dest.glob("*/vendor/llama.cpp/CMakeLists.txt"))
    if not found:
        raise LlamaCppError(f"{sdist.name} has no vendor/llama.cpp/CMakeLists.txt")
    return found[0].parent


def _build_tools(
    cmake: str, source: Path, build: Path, jobs: int, log: Path, progress: bool
) -> None:
    """Configure llama.cpp (CPU only, static, no network features); build BUILD_TARGETS."""
    configure = [
        cmake, "-S", str(source), "-B", str(build),
        "-DCMAKE_BUILD_TYPE=Release",
        "-DGGML_NATIVE=ON",
        "-DBUILD_SHARED_LIBS=OFF",
        "-DLLAMA_CURL=OFF",  # older llama.cpp: no libcurl (newer ones ignore it)
        "-DLLAMA_OPENSSL=OFF",  # newer llama.cpp: no HTTPS in llama-common
        "-DLLAMA_BUILD_TESTS=OFF",
        "-DLLAMA_BUILD_EXAMPLES=OFF",
        "-DLLAMA_BUILD_SERVER=OFF",  # also skips the web UI, which could download assets
        "-DLLAMA_BUILD_APP=OFF",
        "-DLLAMA_BUILD_TOOLS=ON",
        "-DLLAMA_BUILD_COMMON=ON",
    ]  # fmt: skip
    build_cmd = [cmake, "--build", str(build), "--target", *BUILD_TARGETS, "-j", str(jobs)]
    with open(log, "w") as out:
        say(progress, "configuring llama.cpp with cmake")
        _run_logged(configure, out, "cmake configure", log, progress=False)
        say(progress, f"building {', '.join(BUILD_TARGETS)} with {jobs} job(s); this takes a while")
        _run_logged(build_cmd, out, "cmake --build", log, progress=progress)


def _run_logged(cmd: list[str], out, what: str, log: Path, progress: bool) -> None:
    """Run `cmd`, appending its output to `out`; print build percentages now and then."""
    out.write(f"$ {' '.join(cmd)}\n")
    out.flush()
    tail: list[str] = []
    last_said = -10
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert proc.stdout is not None
    for line in proc.stdout:
        out.write(line)
        tail = (tail + [line.rstrip()])[-25:]
        percent = re.match(r"^\[\s*(\d+)%\]", line)
        if progress and percent and int(percent.group(1)) >= last_said + 10:
            last_said = int(percent.group(1))
            say(True, f"  build {last_said}%")
    if proc.wait() != 0:
        detail = "\n".join(tail)
        raise LlamaCppError(
            f"{what} failed (exit {proc.returncode}) while building llama.cpp; last lines:\n"
            f"{detail}\n(full log in {log}, removed with the build folder; rerun to reproduce)"
        )


def _stage_tools(source: Path, build: Path, stage: Path) -> None:
    """Copy the built binaries and the converter with what it imports into `stage`."""
    stage.mkdir()
    for name in BUILD_TARGETS:
        binary = next((p for p in (build / "bin" / name, build / name) if p.is_file()), None)
        if binary is None:
            raise LlamaCppError(f"the build finished but produced no {name} under {build}")
        shutil.copy2(binary, stage / name)
    for rel in CONVERTER_FILES:
        src = source / rel
        if src.is_dir():
            shutil.copytree(src, stage / rel, ignore=shutil.ignore_patterns("__pycache__"))
        elif src.is_file():
            (stage / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, stage / rel)
        elif rel == CONVERT_SCRIPT:
            raise LlamaCppError(f"the llama.cpp sources have no {CONVERT_SCRIPT}")


def say(progress: bool, message: str) -> None:
    """One progress line on stderr, when progress is on."""
    if progress:
        print(f"lowbit: {message}", file=sys.stderr, flush=True)
