"""The compute dtypes every command's --dtype accepts, spelled the same everywhere: auto,
float32, bfloat16, float16, with fp32, bf16 and fp16 as short aliases of the last three.
'auto' is bf16 where the CPU computes it natively, fp32 otherwise."""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
ALIASES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
CHOICES = ("auto", *DTYPES)


def cpu_has_fast_bf16() -> bool:
    """True when the CPU has native bf16 matmul (AVX512_BF16 or AMX); else bf16 is emulated and
    several times slower than fp32."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def dtype_name(text: str) -> str:
    """An argparse type: 'auto' or a dtype's full name, from a full name or a short alias."""
    name = ALIASES.get(text, text)
    if name not in CHOICES:
        raise argparse.ArgumentTypeError(f"unknown dtype {text!r}; use one of {dtype_help()}")
    return name


def dtype_help() -> str:
    return "auto, " + ", ".join(f"{name} ({alias})" for alias, name in ALIASES.items())


def resolve_dtype(name: str) -> torch.dtype:
    """The torch dtype for a name or alias; 'auto' is bf16 where the CPU has it natively, else fp32."""
    name = ALIASES.get(name, name)
    if name == "auto":
        return torch.bfloat16 if cpu_has_fast_bf16() else torch.float32
    return DTYPES[name]


def add_dtype_argument(p: argparse.ArgumentParser, default: str, what: str) -> None:
    """--dtype with the shared spelling; `what` says what it sets and why the default is what it is."""
    p.add_argument("--dtype", type=dtype_name, default=default, metavar="DTYPE",
                   help=f"{what}: {dtype_help()} (default {default}; auto = bfloat16 where the CPU computes it "
                        "natively, else float32)")


def all_finite(t: torch.Tensor, chunk: int = 1 << 22) -> bool:
    """Whether every value of `t` is finite, checked `chunk` values at a time: torch.isfinite(t).all()
    holds temporaries of t's size (0.55 GB for an 8960 x 8960 float32 matrix)."""
    flat = t.reshape(-1)
    return all(bool(torch.isfinite(part).all()) for part in flat.split(chunk))
