"""llama.cpp peer: llama.cpp's own quantization of the same reference model, loaded back into torch.

Unlike the other peers this one does not touch nn.Linear layers in place. It runs llama.cpp's
own tools (built once, see llamacpp_build) on the reference model's Hugging Face folder and reads
the result back:

    HF folder (float32 safetensors)  --convert_hf_to_gguf.py--> <name>.f32.gguf
    <name>.f32.gguf + calibration    --llama-imatrix---------->  <name>.<imatrix tag>.gguf (optional)
    <name>.f32.gguf                  --llama-quantize QTYPE--->  <name>.QTYPE[.<imatrix tag>].gguf
    <name>.QTYPE.gguf                --lowbit.models.load_model--> transformers model (dequantized)

so lowbit evaluates llama.cpp's quantization with its own evaluators on the same token ids (and,
optionally, with llama-perplexity, see llamacpp_perplexity).

Why float32 for the intermediate GGUF: the reference folders lowbit writes are float32 (GGUF
weights dequantized once, see lowbit.models.convert). Rounding them to f16 or bf16 before
llama-quantize would perturb the reference a second time and charge that to llama.cpp; f32 keeps
the converter lossless, at 4 bytes per weight of temporary disk (~540 MB for smollm2-135m).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from lowbit.errors import ConfigError
from lowbit.peers.llamacpp_build import (
    BENCH_BIN,
    IMATRIX_BIN,
    LLAMA_CPP_PYTHON_VERSION,
    PERPLEXITY_BIN,
    QUANTIZE_BIN,
    LlamaCppError,
    LlamaCppTools,
    built_tools,
    ensure_llamacpp,
    say,
    tools_dir,
)

if TYPE_CHECKING:  # torch is imported where a model is loaded, not by the type lists
    import torch

# llama-quantize's names of the mixes benchmarked here (formats.ggml.mixes states their rules)
SUPPORTED_QTYPES = (
    "Q2_K", "Q2_K_S", "Q3_K_S", "Q3_K_M", "Q3_K_L", "Q4_K_S", "Q4_K_M", "Q5_K_S", "Q5_K_M",
    "Q6_K", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1",
    "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ2_M", "IQ3_XXS", "IQ3_XS", "IQ3_S", "IQ3_M", "IQ4_NL", "IQ4_XS",
)  # fmt: skip
# The mixes below 4 bits whose grids are only usable with an importance matrix: llama-quantize
# refuses IQ2_*/IQ3_XXS/IQ3_XS (and Q2_K_S) without one, and IQ3_S/IQ3_M are meant to have one.
NEEDS_IMATRIX = ("Q2_K_S", "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ2_M", "IQ3_XXS", "IQ3_XS", "IQ3_S", "IQ3_M")

CONVERT_SCRIPT_ENV_DROP = "NO_LOCAL_GGUF"  # would make the converter import the installed gguf

# Linear weights of a decoder block in GGUF names: blk.N.attn_q.weight, blk.N.ffn_down.weight ...
_BLOCK_LINEAR = re.compile(
    r"^blk\.\d+\.(attn_q|attn_k|attn_v|attn_qkv|attn_output|ffn_gate|ffn_up|ffn_down|ffn_gate_up)"
    r"\.weight$"
)

__all__ = [
    "BENCH_BIN",
    "IMATRIX_BIN",
    "LLAMA_CPP_PYTHON_VERSION",
    "NEEDS_IMATRIX",
    "PERPLEXITY_BIN",
    "QUANTIZE_BIN",
    "SUPPORTED_QTYPES",
    "LlamaCppError",
    "LlamaCppQuant",
    "LlamaCppTools",
    "built_tools",
    "check_qtype",
    "convert_to_gguf",
    "ensure_llamacpp",
    "gguf_bits_per_weight",
    "load_llamacpp_quant",
    "quantize_with_llamacpp",
    "tools_dir",
    "vocab_gguf",
]  # fmt: skip


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
# convert and quantize


def check_qtype(qtype: str, imatrix: bool = False) -> str:
    """`qtype` in llama-quantize's spelling (upper case).

    ConfigError if it is not one of SUPPORTED_QTYPES, or if it is one of NEEDS_IMATRIX and
    `imatrix` is False (in `lowbit bench accuracy`: use the job llamacpp-imatrix:TYPE).
    """
    name = qtype.strip().upper() if isinstance(qtype, str) else qtype
    if name not in SUPPORTED_QTYPES:
        raise ConfigError(
            f"unsupported llama.cpp quantization type {qtype!r}; choose one of "
            f"{', '.join(SUPPORTED_QTYPES)}"
        )
    if name in NEEDS_IMATRIX and not imatrix:
        raise ConfigError(
            f"llama.cpp type {name} needs an importance matrix: pass imatrix= (a file from "
            f"llama-imatrix), or in `lowbit bench accuracy` use the job llamacpp-imatrix:{name}"
        )
    return name


def convert_to_gguf(hf_folder: Path, out_dir: Path, tools: LlamaCppTools, progress: bool = True) -> Path:
    """The Hugging Face folder as `<out_dir>/<name>.f32.gguf` (llama.cpp's converter, float32).

    Kept for the next call (cached by folder name: delete it when the folder's weights change).
    This is the reference GGUF: what llama-quantize, llama-imatrix and the KL base start from.
    """
    hf_folder = Path(hf_folder)
    if not (hf_folder / "config.json").is_file():
        raise ConfigError(f"{hf_folder} is not a Hugging Face model folder (no config.json)")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    f32 = out_dir / f"{hf_folder.name}.f32.gguf"
    if not f32.is_file():
        say(progress, f"converting {hf_folder} to {f32.name} with llama.cpp's converter")
        partial = f32.with_name(f".{f32.name}.partial")
        convert = [
            sys.executable, str(tools.convert_script), str(hf_folder),
            "--outfile", str(partial), "--outtype", "f32",
        ]  # fmt: skip
        env = {k: v for k, v in os.environ.items() if k != CONVERT_SCRIPT_ENV_DROP}
        run_step(convert, partial, f32, "convert_hf_to_gguf.py", env=env)
    return f32


def vocab_gguf(hf_folder: Path, out_dir: Path, tools: LlamaCppTools, progress: bool = True) -> Path:
    """`<out_dir>/<name>.vocab.gguf`: the Hugging Face folder's hyper-parameters, tokenizer and chat
    template as llama.cpp's converter writes them (--vocab-only, no tensors): the metadata of a
    GGUF lowbit writes for a model that did not come from one."""
    hf_folder = Path(hf_folder)
    if not (hf_folder / "config.json").is_file():
        raise ConfigError(f"{hf_folder} is not a Hugging Face model folder (no config.json)")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    vocab = out_dir / f"{hf_folder.name}.vocab.gguf"
    if not vocab.is_file():
        say(progress, f"reading {hf_folder}'s tokenizer and hyper-parameters with llama.cpp's converter")
        partial = vocab.with_name(f".{vocab.name}.partial")
        convert = [sys.executable, str(tools.convert_script), str(hf_folder), "--outfile", str(partial),
                   "--vocab-only"]
        env = {k: v for k, v in os.environ.items() if k != CONVERT_SCRIPT_ENV_DROP}
        run_step(convert, partial, vocab, "convert_hf_to_gguf.py --vocab-only", env=env)
    return vocab


def quantize_with_llamacpp(
    hf_folder: Path, qtype: str, out_dir: Path, tools: LlamaCppTools, progress: bool = True,
    imatrix: Path | None = None,
) -> Path:  # fmt: skip
    """Quantize a Hugging Face folder with llama.cpp; return the path of the quantized GGUF.

    The file is `<name>.<QTYPE>.gguf`, or `<name>.<QTYPE>.<imatrix tag>.gguf` with an
    importance matrix (`imatrix`, a file written by llama-imatrix, see llamacpp_imatrix), where
    `<name>` is the folder's name. The folder is first converted to `<name>.f32.gguf`
    (`convert_to_gguf`), then `llama-quantize` writes the quantized file. Both steps write to a
    temporary name and rename, so a file that exists is complete, and a repeated call returns
    at once. The cache is keyed by folder name, qtype and imatrix file name only.

    k-quants pack rows in super-blocks of 256 weights. llama-quantize stores a tensor whose rows
    (input features) are not a multiple of 256 in a 32-block type instead (Q4_K -> Q5_0, Q6_K ->
    Q8_0, Q2_K/Q3_K -> Q4_0 ..., see formats.ggml.mixes.fallback_type) and says so; that line is
    passed on, and `gguf_bits_per_weight` reports the types actually stored.
    """
    name = check_qtype(qtype, imatrix=imatrix is not None)
    hf_folder, out_dir = Path(hf_folder), Path(out_dir)
    if not (hf_folder / "config.json").is_file():
        raise ConfigError(f"{hf_folder} is not a Hugging Face model folder (no config.json)")
    if imatrix is not None and not Path(imatrix).is_file():
        raise ConfigError(f"importance matrix {imatrix} does not exist; write it with compute_imatrix")
    # the imatrix file's name (less the folder's name, if it starts with it) tells the files apart
    tag = "" if imatrix is None else "." + Path(imatrix).name.removesuffix(".gguf").removeprefix(f"{hf_folder.name}.")
    out_dir.mkdir(parents=True, exist_ok=True)
    target = out_dir / f"{hf_folder.name}.{name}{tag}.gguf"
    if target.is_file():
        say(progress, f"ok (cached) {target}")
        return target
    f32 = convert_to_gguf(hf_folder, out_dir, tools, progress)
    say(progress, f"quantizing {f32.name} to {name}{' with an imatrix' if imatrix else ''} with llama-quantize")
    partial = target.with_name(f".{target.name}.partial")
    quantize = [str(tools.quantize_bin)]
    if imatrix is not None:
        quantize += ["--imatrix", str(imatrix)]
    quantize += [str(f32), str(partial), name, "2"]  # 2 threads
    output = run_step(quantize, partial, target, QUANTIZE_BIN)
    for line in output.splitlines():  # rows not a multiple of 256 cannot hold k-quants
        if "fallback quantization" in line:
            say(progress, f"llama-quantize: {line.split(':', 1)[-1].strip()}")
    say(progress, f"ok {target} ({target.stat().st_size / 1e6:.1f} MB)")
    return target


def run_step(cmd: list[str], partial: Path, final: Path, what: str, env=None) -> str:
    """Run one tool that writes `partial`, rename it to `final`, return the tool's output.

    The partial file is removed on failure.
    """
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, errors="replace", check=False, env=env)
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


def tensors_on_reference(gguf_path: Path, reference: Path) -> tuple[int, int]:
    """(how many, of how many) decoder-block linear weights of a quantized GGUF dequantize to exactly
    the reference GGUF's values (the float32 file convert_to_gguf writes, same tensor names and
    layout). Such a tensor landed back on the grid the reference itself came from: re-quantizing
    a dequantized Q4_K model to Q4_K can reproduce it bit for bit, which flatters that row."""
    import numpy as np
    from gguf import GGUFReader
    from gguf.quants import dequantize

    ref = {t.name: t for t in GGUFReader(reference).tensors}
    same = total = 0
    for tensor in GGUFReader(gguf_path).tensors:
        if not _BLOCK_LINEAR.match(tensor.name) or len(tensor.shape) != 2:
            continue
        total += 1
        theirs = ref.get(tensor.name)
        if theirs is None:
            raise ConfigError(f"{reference} has no tensor {tensor.name}: it is not the reference of {gguf_path}")
        ours = dequantize(tensor.data, tensor.tensor_type).reshape(-1)
        want = dequantize(theirs.data, theirs.tensor_type).reshape(-1)
        same += bool(ours.shape == want.shape and np.array_equal(ours.astype(np.float32), want.astype(np.float32)))
    return same, total


def load_llamacpp_quant(
    gguf_path: Path, dtype: torch.dtype | None = None, cache: Path | None = None,
    progress: bool = True,
) -> LlamaCppQuant:  # fmt: skip
    """Load a llama.cpp GGUF as a transformers model (dequantized) with its bits per weight.

    Loading goes through lowbit.models.load_model, which converts the GGUF once to a safetensors
    folder in the cache; the tokenizer is the one stored in the GGUF. dtype: float32 if None.
    """
    import torch

    from lowbit.models import load_model

    gguf_path = Path(gguf_path)
    bpw, types = gguf_bits_per_weight(gguf_path)
    loaded = load_model(str(gguf_path), dtype=dtype or torch.float32, cache=cache, progress=progress)
    return LlamaCppQuant(
        model=loaded.model,
        tokenizer=loaded.tokenizer,
        gguf_path=gguf_path,
        bits_per_weight=bpw,
        file_bytes=gguf_path.stat().st_size,
        tensor_types=types,
    )
