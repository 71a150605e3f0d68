"""llama.cpp peer: llama.cpp's own k-quants of the same reference model, loaded back into torch.

Unlike the other peers this one does not touch nn.Linear layers in place. It runs llama.cpp's
own tools on the reference model's Hugging Face folder and reads the result back:

    HF folder (float32 safetensors)  --convert_hf_to_gguf.py--> <name>.f32.gguf
    <name>.f32.gguf                  --llama-quantize QTYPE--->  <name>.QTYPE.gguf
    <name>.QTYPE.gguf                --lowbit.models.load_model--> transformers model (dequantized)

so lowbit evaluates llama.cpp's quantization with its own evaluators on the same token ids.

The tools come from the llama-cpp-python *source* release on PyPI, whose sdist vendors llama.cpp
under vendor/llama.cpp. `ensure_llamacpp` downloads it with pip (no package code is installed),
builds the `llama-quantize` and `llama-bench` targets with cmake, and keeps the binaries, the converter script and
the Python packages it imports (`conversion/`, `gguf-py/`) in

    <lowbit cache>/llamacpp/llama-cpp-python-<version>/

It needs cmake (>= 3.14) and a C++17 compiler; `python -m pip install cmake` puts a cmake into the
virtual environment when the system has none. The build uses GGML_NATIVE=ON, so the binary is
tuned to (and may only run on) the CPU that built it; the cache is per machine.

Why float32 for the intermediate GGUF: the reference folders lowbit writes are float32 (GGUF
weights dequantized once, see lowbit.models.convert). Rounding them to f16 or bf16 before
llama-quantize would perturb the reference a second time and charge that to llama.cpp; f32 keeps
the converter lossless, at 4 bytes per weight of temporary disk (~540 MB for smollm2-135m).
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
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch

from lowbit.errors import ConfigError, LowbitError
from lowbit.paths import cache_dir

LLAMA_CPP_PYTHON_VERSION = "0.3.36"  # pinned sdist; its vendor/llama.cpp is what gets built

# k-quants (and Q8_0) that llama-quantize accepts by these names.
SUPPORTED_QTYPES = ("Q2_K", "Q3_K_M", "Q4_K_S", "Q4_K_M", "Q5_K_M", "Q6_K", "Q8_0")

RECORD = "lowbit-llamacpp.json"  # written last into a finished tools folder
QUANTIZE_BIN = "llama-quantize"
BENCH_BIN = "llama-bench"  # for `lowbit bench speed`
CONVERT_SCRIPT = "convert_hf_to_gguf.py"
# What the converter needs beside itself (the script puts gguf-py/ first on sys.path, so the
# vendored gguf package, which matches the converter, wins over the installed one).
CONVERTER_FILES = (CONVERT_SCRIPT, "conversion", "gguf-py", "models/templates", "LICENSE")

# Linear weights of a decoder block in GGUF names: blk.N.attn_q.weight, blk.N.ffn_down.weight ...
_BLOCK_LINEAR = re.compile(
    r"^blk\.\d+\.(attn_q|attn_k|attn_v|attn_qkv|attn_output|ffn_gate|ffn_up|ffn_down|ffn_gate_up)"
    r"\.weight$"
)


class LlamaCppError(LowbitError, RuntimeError):
    """Fetching, building or running llama.cpp's tools failed."""


@dataclass(frozen=True)
class LlamaCppTools:
    """A finished llama.cpp tools folder: the converter script and the quantize binary."""

    root: Path
    version: str  # llama-cpp-python version whose vendored llama.cpp was built
    convert_script: Path  # convert_hf_to_gguf.py (with conversion/ and gguf-py/ beside it)
    quantize_bin: Path  # llama-quantize

    @property
    def bench_bin(self) -> Path:
        """llama-bench (prompt processing and generation speed), built beside llama-quantize."""
        return self.root / BENCH_BIN


@dataclass
class LlamaCppQuant:
    """A llama.cpp-quantized model loaded back as a torch model, and what it costs in bits."""

    model: torch.nn.Module  # transformers causal LM, eval mode, dequantized weights
    tokenizer: object  # transformers tokenizer read from the GGUF
    gguf_path: Path
    bits_per_weight: float  # over the decoder-block linear weights, as stored in the GGUF
    file_bytes: int  # size of the whole .gguf file
    tensor_types: dict[str, int] = field(default_factory=dict)  # e.g. {"Q4_K": 150, "Q6_K": 30}


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
    parts = (root / RECORD, tools.convert_script, tools.quantize_bin, tools.bench_bin)
    return tools if all(p.is_file() for p in parts) else None


def ensure_llamacpp(
    cache: Path | None = None,
    version: str = LLAMA_CPP_PYTHON_VERSION,
    progress: bool = True,
    jobs: int = 2,
) -> LlamaCppTools:
    """The llama.cpp tools of llama-cpp-python `version`, building them first if not cached.

    Building means: pip-download the sdist, extract it, configure vendor/llama.cpp with cmake and
    build the `llama-quantize` target with `jobs` parallel jobs (several minutes on 2 cores). All
    of it happens in a temporary folder beside the destination, which is renamed into place only
    when complete, so an existing tools folder is always whole. Raises LlamaCppError naming what
    is missing (cmake, a C++ compiler) or which step failed, with the end of its output.
    """
    found = built_tools(cache, version)
    if found is not None:
        _say(progress, f"ok (cached) llama.cpp tools: {found.root}")
        return found
    cmake = _find_cmake()
    _check_compiler()
    dest = tools_dir(cache) / f"llama-cpp-python-{version}"
    dest.parent.mkdir(parents=True, exist_ok=True)
    if dest.exists():  # no record: an interrupted copy, never a finished folder
        _say(progress, f"replacing incomplete folder {dest}")
        shutil.rmtree(dest)
    start = time.perf_counter()
    work = Path(tempfile.mkdtemp(dir=dest.parent, prefix=f".{dest.name}.tmp-"))
    try:
        _say(progress, f"downloading the llama-cpp-python=={version} sdist with pip")
        sdist = _download_sdist(version, work / "sdist")
        _say(progress, f"extracting {sdist.name}")
        source = _extract_llamacpp(sdist, work / "src")
        log = work / "build.log"
        _build_quantize(cmake, source, work / "build", jobs, log, progress)
        stage = work / "tools"
        _stage_tools(source, work / "build", stage)
        shutil.copy2(log, stage / "build.log")
        seconds = time.perf_counter() - start
        record = {"llama_cpp_python": version, "sdist": sdist.name, "build_seconds": round(seconds)}
        (stage / RECORD).write_text(json.dumps(record, indent=2) + "\n")
        try:
            stage.rename(dest)
        except OSError:
            if built_tools(cache, version) is None:  # not a lost race with another build
                raise
    finally:
        shutil.rmtree(work, ignore_errors=True)
    _say(progress, f"ok (built in {time.perf_counter() - start:.0f} s) llama.cpp tools: {dest}")
    tools = built_tools(cache, version)
    assert tools is not None
    return tools


def _find_cmake() -> str:
    """Path of a cmake: on PATH, or in this Python's environment (`pip install cmake`)."""
    found = shutil.which("cmake") or shutil.which("cmake", path=str(Path(sys.executable).parent))
    if found is None:
        raise LlamaCppError(
            "building llama.cpp's llama-quantize needs cmake, and none was found on PATH or in "
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
            f"building llama.cpp's llama-quantize needs a C++17 compiler; none of "
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


def _build_quantize(
    cmake: str, source: Path, build: Path, jobs: int, log: Path, progress: bool
) -> None:
    """Configure llama.cpp (CPU only, static, no network features); build llama-quantize and llama-bench."""
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
    build_cmd = [cmake, "--build", str(build), "--target", QUANTIZE_BIN, BENCH_BIN, "-j", str(jobs)]
    with open(log, "w") as out:
        _say(progress, "configuring llama.cpp with cmake")
        _run_logged(configure, out, "cmake configure", log, progress=False)
        _say(progress, f"building {QUANTIZE_BIN} and {BENCH_BIN} with {jobs} job(s); this takes several minutes")
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
            _say(True, f"  build {last_said}%")
    if proc.wait() != 0:
        detail = "\n".join(tail)
        raise LlamaCppError(
            f"{what} failed (exit {proc.returncode}) while building llama.cpp; last lines:\n"
            f"{detail}\n(full log in {log}, removed with the build folder; rerun to reproduce)"
        )


def _stage_tools(source: Path, build: Path, stage: Path) -> None:
    """Copy the quantize binary and the converter with what it imports into `stage`."""
    binary = next((p for p in (build / "bin" / QUANTIZE_BIN, build / QUANTIZE_BIN) if p.is_file()),
                  None)  # fmt: skip
    if binary is None:
        raise LlamaCppError(f"the build finished but produced no {QUANTIZE_BIN} under {build}")
    bench = next((p for p in (build / "bin" / BENCH_BIN, build / BENCH_BIN) if p.is_file()), None)
    if bench is None:
        raise LlamaCppError(f"the build finished but produced no {BENCH_BIN} under {build}")
    stage.mkdir()
    shutil.copy2(binary, stage / QUANTIZE_BIN)
    shutil.copy2(bench, stage / BENCH_BIN)
    for rel in CONVERTER_FILES:
        src = source / rel
        if src.is_dir():
            shutil.copytree(src, stage / rel, ignore=shutil.ignore_patterns("__pycache__"))
        elif src.is_file():
            (stage / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, stage / rel)
        elif rel == CONVERT_SCRIPT:
            raise LlamaCppError(f"the llama.cpp sources have no {CONVERT_SCRIPT}")


# ---------------------------------------------------------------------------------------------
# convert and quantize


def check_qtype(qtype: str) -> str:
    """`qtype` in llama-quantize's spelling (upper case); ConfigError if not supported here."""
    name = qtype.strip().upper() if isinstance(qtype, str) else qtype
    if name not in SUPPORTED_QTYPES:
        raise ConfigError(
            f"unsupported llama.cpp quantization type {qtype!r}; choose one of "
            f"{', '.join(SUPPORTED_QTYPES)}"
        )
    return name


def quantize_with_llamacpp(
    hf_folder: Path, qtype: str, out_dir: Path, tools: LlamaCppTools, progress: bool = True
) -> Path:
    """Quantize a Hugging Face folder with llama.cpp; return the path of `<name>.<QTYPE>.gguf`.

    `<name>` is the folder's name. The folder is first converted to `<name>.f32.gguf` (kept in
    `out_dir` for the next qtype), then `llama-quantize` writes the quantized file. Both steps
    write to a temporary name and rename, so a file that exists is complete, and a repeated call
    returns at once. The cache is keyed by folder name and qtype only: delete the files when the
    folder's weights change.

    k-quants pack rows in super-blocks of 256 weights. llama-quantize stores a tensor whose rows
    (input features) are not a multiple of 256 in a legacy type instead (Q4_K -> Q5_0, Q6_K ->
    Q8_0, Q2_K/Q3_K -> Q4_0 ...) and says so; that line is passed on, and
    `gguf_bits_per_weight` reports the types actually stored.
    """
    name = check_qtype(qtype)
    hf_folder = Path(hf_folder)
    if not (hf_folder / "config.json").is_file():
        raise ConfigError(f"{hf_folder} is not a Hugging Face model folder (no config.json)")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    target = out_dir / f"{hf_folder.name}.{name}.gguf"
    if target.is_file():
        _say(progress, f"ok (cached) {target}")
        return target
    f32 = out_dir / f"{hf_folder.name}.f32.gguf"
    if not f32.is_file():
        _say(progress, f"converting {hf_folder} to {f32.name} with llama.cpp's converter")
        partial = f32.with_name(f".{f32.name}.partial")
        convert = [
            sys.executable, str(tools.convert_script), str(hf_folder),
            "--outfile", str(partial), "--outtype", "f32",
        ]  # fmt: skip
        env = {k: v for k, v in os.environ.items() if k != "NO_LOCAL_GGUF"}
        _run_step(convert, partial, f32, "convert_hf_to_gguf.py", env=env)
    _say(progress, f"quantizing {f32.name} to {name} with llama-quantize")
    partial = target.with_name(f".{target.name}.partial")
    quantize = [str(tools.quantize_bin), str(f32), str(partial), name, "2"]  # 2 threads
    output = _run_step(quantize, partial, target, QUANTIZE_BIN)
    for line in output.splitlines():  # rows not a multiple of 256 cannot hold k-quants
        if "fallback quantization" in line:
            _say(progress, f"llama-quantize: {line.split(':', 1)[-1].strip()}")
    _say(progress, f"ok {target} ({target.stat().st_size / 1e6:.1f} MB)")
    return target


def _run_step(cmd: list[str], partial: Path, final: Path, what: str, env=None) -> str:
    """Run one tool that writes `partial`, rename it to `final`, return the tool's output.

    The partial file is removed on failure.
    """
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False, env=env)
        if proc.returncode != 0 or not partial.is_file():
            tail = "\n".join((proc.stdout + proc.stderr).splitlines()[-20:])
            raise LlamaCppError(f"{what} failed (exit {proc.returncode}); last lines:\n{tail}")
        os.replace(partial, final)
        return proc.stdout + proc.stderr
    finally:
        partial.unlink(missing_ok=True)


# ---------------------------------------------------------------------------------------------
# read back


def gguf_bits_per_weight(gguf_path: Path) -> tuple[float, dict[str, int]]:
    """Stored bits per weight of the decoder-block linear weights of a GGUF, and their types.

    bits = 8 * sum(bytes) / sum(elements) over the 2-D tensors named blk.N.{attn_q, attn_k,
    attn_v, attn_qkv, attn_output, ffn_gate, ffn_up, ffn_down, ffn_gate_up}.weight, with the
    bytes as stored (k-quant super-block scales and minimums included). Embeddings, the output
    head and norms are left out, like the layers lowbit itself quantizes.
    """
    from gguf import GGUFReader

    reader = GGUFReader(gguf_path)
    n_bytes = n_elements = 0
    types: Counter[str] = Counter()
    for tensor in reader.tensors:
        if not _BLOCK_LINEAR.match(tensor.name) or len(tensor.shape) != 2:
            continue
        n_bytes += int(tensor.n_bytes)
        n_elements += int(tensor.n_elements)
        types[tensor.tensor_type.name] += 1
    if n_elements == 0:
        raise ConfigError(f"{gguf_path} has no decoder-block linear weights (blk.N.attn_q ...)")
    return 8 * n_bytes / n_elements, dict(types)


def load_llamacpp_quant(
    gguf_path: Path, dtype: torch.dtype = torch.float32, cache: Path | None = None,
    progress: bool = True,
) -> LlamaCppQuant:  # fmt: skip
    """Load a llama.cpp GGUF as a transformers model (dequantized) with its bits per weight.

    Loading goes through lowbit.models.load_model, which converts the GGUF once to a safetensors
    folder in the cache; the tokenizer is the one stored in the GGUF.
    """
    from lowbit.models import load_model

    gguf_path = Path(gguf_path)
    bpw, types = gguf_bits_per_weight(gguf_path)
    loaded = load_model(str(gguf_path), dtype=dtype, cache=cache, progress=progress)
    return LlamaCppQuant(
        model=loaded.model,
        tokenizer=loaded.tokenizer,
        gguf_path=gguf_path,
        bits_per_weight=bpw,
        file_bytes=gguf_path.stat().st_size,
        tensor_types=types,
    )


def _say(progress: bool, message: str) -> None:
    """One progress line on stderr, when progress is on."""
    if progress:
        print(f"lowbit: {message}", file=sys.stderr, flush=True)
