"""What `lowbit bench accuracy` runs and how its results are keyed: jobs METHOD:SETTING (see
lowbit.bench.accuracy), the predefined suites, a model's part of file names."""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lowbit.errors import ConfigError
from lowbit.methods import METHODS as WEIGHT_METHODS

# lowbit's weight methods (lowbit.methods), then a size budget, the peers, and a GGUF file as it is
# lowbit's own GGUF files: gguf-<method>:<llama.cpp mix>, rounded by that lowbit method (to_gguf.py)
LOWBIT_GGUF = ("gguf-rtn", "gguf-gptq", "gguf-awq-gptq", "gguf-budget")
METHODS = (*WEIGHT_METHODS, "budget", "hqq", "llamacpp", "llamacpp-imatrix", "gguf", *LOWBIT_GGUF)
# the rows that are GGUF files (llama.cpp's quantizer, or any GGUF given): llama-perplexity can
# evaluate them too (AccuracyBenchOptions.llama_perplexity)
GGUF_METHODS = ("llamacpp", "llamacpp-imatrix", "gguf", *LOWBIT_GGUF)
DEFAULT_METHODS = ("rtn", "gptq", "hqq")
DEFAULT_SETTINGS = ("w4g128", "w4g64", "w3g128", "w3g64", "w2g64")


def _suite_methods() -> list[str]:
    jobs = []
    for uniform, avg in (("w4g128", "w4g128"), ("w3g128", "w3g128"), ("w2g32", "w2.5g128"), ("w2g128", "w2g128")):
        jobs += [f"{m}:{uniform}" for m in ("rtn", "gptq", "awq-gptq", "hqq")]
        jobs += [f"slim:{avg}", f"budget:{uniform}"]
    jobs += ["gptq:w4g128-is8", "gptq:w3g128-is8"]  # Integer Scale's cost against float16 scales
    return jobs + [f"llamacpp:{t}" for t in ("Q4_K_M", "Q3_K_M", "Q2_K")]


SUITES = {"methods": _suite_methods}


@dataclass(frozen=True)
class Setting:
    bits: int | float
    group_size: int

    @classmethod
    def parse(cls, text: str) -> Setting:
        try:
            b, g = text.lower().removeprefix("w").split("g")
            bits = float(b)
            return cls(int(bits) if bits.is_integer() else bits, int(g))
        except ValueError:
            raise ConfigError(f"setting {text!r} is not of the form w<bits>g<group>, e.g. w4g128") from None

    def __str__(self) -> str:
        return f"w{self.bits}g{self.group_size}"


@dataclass(frozen=True)
class Job:
    method: str
    setting: str   # w<bits>g<group>, a llama.cpp type, or a GGUF file's path

    @classmethod
    def parse(cls, text: str) -> Job:
        method, _, setting = text.partition(":")
        if method not in METHODS or not setting:
            raise ConfigError(f"job {text!r}: use METHOD:SETTING with METHOD one of {', '.join(METHODS)} "
                              "(e.g. gptq:w3g128, slim:w2.5g128, llamacpp:Q4_K_M, llamacpp-imatrix:IQ3_XXS, "
                              "gguf:path/to/model.gguf, gguf-gptq:Q3_K_M)")
        if method in GGUF_METHODS:
            return cls(method, _gguf_setting(text, method, setting))
        base, _, iscale = setting.partition("-is")
        if iscale and (method in ("hqq", "budget") or not iscale.isdigit()):
            raise ConfigError(f"job {text!r}: -is<bits> (integer scales) applies to rtn, gptq, awq, awq-gptq, slim")
        if method == "budget" and setting.endswith("bpw"):
            if target_bpw(setting) is None:
                raise ConfigError(f"job {text!r}: a budget's size is w<bits>g<group> or <bits per weight>bpw with "
                                  "bits per weight in (1, 16], e.g. budget:w3g128 or budget:2.92bpw")
        else:
            s = Setting.parse(base)
            if (method not in WEIGHT_METHODS or not WEIGHT_METHODS[method].fractional_bits) \
                    and not isinstance(s.bits, int):
                raise ConfigError(f"job {text!r}: fractional bits need method slim or awq-slim")
        return cls(method, setting)

    def __str__(self) -> str:
        return f"{self.method}:{self.setting}"


def _gguf_setting(text: str, method: str, setting: str) -> str:
    """A GGUF job's setting: llama.cpp's type name (upper case), or the path of a .gguf file."""
    if method == "gguf":
        if not setting.endswith(".gguf"):
            raise ConfigError(f"job {text!r}: a gguf job names a .gguf file, e.g. gguf:out/model.Q4_K_M.gguf")
        return setting
    if method == "gguf-budget":
        if target_bpw(setting) is None:
            raise ConfigError(f"job {text!r}: a GGUF budget's size is <bits per weight>bpw with bits per weight in "
                              "(1, 16], e.g. gguf-budget:3.0bpw")
        return setting
    if method in LOWBIT_GGUF:
        from lowbit.formats.ggml.mixes import check_mix

        try:
            return check_mix(setting)
        except ConfigError as e:
            raise ConfigError(f"job {text!r}: {e}") from None
    # imported here, not at the top: lowbit.peers imports torch, and the CLI imports this module
    from lowbit.peers.llamacpp import check_qtype

    try:
        return check_qtype(setting, imatrix=method == "llamacpp-imatrix")
    except ConfigError as e:
        raise ConfigError(f"job {text!r}: {e}") from None


def target_bpw(setting: str) -> float | None:
    """The bits per weight of a budget setting written <x>bpw (None for any other setting)."""
    m = re.fullmatch(r"(\d+(?:\.\d+)?)bpw", setting)
    return float(m.group(1)) if m and 1.0 < float(m.group(1)) <= 16.0 else None


def select_jobs(suite: str | None, jobs: str | None, methods: str, settings: str) -> list[Job]:
    """The jobs a run asks for: a suite's, else the --jobs list, else every method at every setting."""
    if suite:
        return [Job.parse(j) for j in SUITES[suite]()]
    if jobs:
        return [Job.parse(j) for j in jobs.split(",") if j]
    chosen = [m for m in methods.split(",") if m]
    bad = [m for m in chosen if m not in METHODS or m in GGUF_METHODS]
    if bad:
        raise ConfigError(f"--methods: unknown {bad}; choose from "
                          f"{', '.join(m for m in METHODS if m not in GGUF_METHODS)} (llama.cpp types and GGUF "
                          "files go in --jobs, e.g. llamacpp:Q4_K_M, llamacpp-imatrix:IQ4_XS, gguf:model.gguf)")
    return [Job.parse(f"{m}:{s}") for s in settings.split(",") if s for m in chosen]


def file_label(model: str) -> str:
    """The model's part of a file name: a known name as it is; a path (a folder, a GGUF file, a hub
    id) as its last component and a short hash of the whole, so that two folders named alike differ."""
    if "/" not in model and "\\" not in model:
        return model
    tail = re.sub(r"[^\w.-]+", "_", Path(model).name).strip("_.") or "model"
    return f"{tail}-{hashlib.sha256(model.encode()).hexdigest()[:8]}"


def result_key(r: dict[str, Any]) -> tuple[str, str, str, str]:
    """Result identity; records written before jobs had labels carry bits and group_size only,
    and those written before calibration had a dtype calibrated in float32. Methods without
    calibration (RTN, HQQ, llama.cpp) have one result whatever --calib-dtype said, and so does
    llamacpp-imatrix (llama-imatrix runs in llama.cpp's own float32)."""
    return (r["model"], r["method"], r.get("setting") or f"w{r['bits']}g{r['group_size']}",
            r.get("calib_dtype", "float32") if r["method"] in CALIBRATED else "float32")


CALIBRATED = (*(m for m, spec in WEIGHT_METHODS.items() if spec.needs_data), "budget", "gguf-gptq", "gguf-awq-gptq",
              "gguf-budget")
