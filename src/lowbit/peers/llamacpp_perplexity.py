"""llama-perplexity as an evaluator of any GGUF file: perplexity on a text, and KL divergence and
top-1 agreement against a reference GGUF's saved logits.

llama-perplexity tokenizes the whole text file (BOS first when the vocabulary adds one), cuts the
ids into chunks of `n_ctx`, puts BOS on each chunk's first token (when the vocabulary adds one)
and scores only the second half of each chunk: n_ctx - 1 - n_ctx // 2 tokens per chunk, each with
at least n_ctx / 2 tokens of context. lowbit's own evaluator (eval.kl) scores every token of its
windows, so the two perplexities differ in definition, not only in arithmetic; compare each with
its own reference.

KL divergence takes two runs (`save_kl_base`, then `llama_kl_divergence` per quantized file): the
first stores the reference's log-probabilities of the scored tokens (and the token ids) in a base
file, about 2 * n_vocab bytes per scored token; the second reads the ids from that file, so every
file is compared on the same tokens.
"""

from __future__ import annotations

import math
import os
import re
import struct
import subprocess
from dataclasses import dataclass
from pathlib import Path

from lowbit.errors import ConfigError
from lowbit.peers.llamacpp_build import (
    PERPLEXITY_BIN,
    LlamaCppError,
    LlamaCppTools,
    say,
)

_BASE_MAGIC = b"_logits_"

_NUMBERS = {  # the lines of llama-perplexity's report this module reads
    "ppl": re.compile(r"Final estimate: PPL = ([0-9.eE+-]+|nan|inf)"),
    "kl_ppl": re.compile(r"Mean PPL\(Q\)\s*:\s*([0-9.eE+-]+|nan|inf)"),
    "ref_ppl": re.compile(r"Mean PPL\(base\)\s*:\s*([0-9.eE+-]+|nan|inf)"),
    "kl_mean": re.compile(r"Mean\s+KLD:\s*([0-9.eE+-]+|nan|inf)"),
    "same_top_percent": re.compile(r"Same top p:\s*([0-9.eE+-]+|nan|inf)"),
    "n_chunks": re.compile(r"(?:calculating perplexity|computing) over (\d+) chunks, n_ctx=(\d+)"),
}
# The running values printed after each chunk, which the summary repeats: "[k]ppl," in a plain
# run; in a KL run a row "k  ppl ± u  ln(ppl/base) ± u  KL ± u  dp ± u %  same-top ± u %". The
# tool writes its log from a thread of its own, and lines still queued at exit are lost (the
# logger is leaked on purpose upstream): lowbit's build adds a flush before the tool returns
# (llamacpp_build._LOG_FLUSH_PATCHES); for a build without it, the last chunk's running values
# stand in for a lost summary, and a run that lost those too is run again (TRIES in all).
_NUM = r"(-?[0-9.]+(?:[eE][+-]?\d+)?|-?nan|-?inf)"
_RUNNING_PPL = re.compile(r"\[(\d+)\]" + _NUM + ",")
_KL_ROW = re.compile(r"^\s*(\d+)" + (r"\s+" + _NUM + r"\s*\S+\s*" + _NUM) * 3
                     + r"\s+\S+\s*\S+\s*\S+\s*%\s+" + _NUM + r"\s*\S+\s*" + _NUM + r"\s*%", re.MULTILINE)
TRIES = 3


@dataclass(frozen=True)
class LlamaPerplexity:
    """What one llama-perplexity run measured on one GGUF file."""

    gguf_path: Path
    ppl: float  # over the scored tokens (the second half of each chunk)
    n_ctx: int
    n_chunks: int
    ref_ppl: float | None = None  # the reference's, on the same tokens (KL runs only)
    kl_mean: float | None = None  # mean KL(reference || this file), nats per scored token
    top1_agreement: float | None = None  # fraction of scored tokens with the reference's top-1

    @property
    def n_tokens_scored(self) -> int:
        return self.n_chunks * (self.n_ctx - 1 - self.n_ctx // 2)


def parse_perplexity_output(text: str) -> dict[str, float]:
    """The numbers of a llama-perplexity report (plain or KL run) found in its output.

    Keys: ppl (and, in a KL run, ref_ppl, kl_mean, top1_agreement as a fraction), n_chunks,
    n_ctx. The summary lines are read when present, else the running values printed after the
    last chunk (ref_ppl then from the printed log ratio, to 5 decimals). A key is absent when
    its lines are.
    """
    found: dict[str, float] = {}
    m = _NUMBERS["n_chunks"].search(text)
    if m is not None:
        found["n_chunks"], found["n_ctx"] = int(m.group(1)), int(m.group(2))
        last = str(found["n_chunks"])
        for chunk, ppl in _RUNNING_PPL.findall(text):
            if chunk == last:
                found["ppl"] = float(ppl)
        for row in _KL_ROW.findall(text):  # chunk, ppl, u, ln ratio, u, KL, u, same top, u
            if row[0] == last:
                found.update(ppl=float(row[1]), ref_ppl=float(row[1]) / math.exp(float(row[3])),
                             kl_mean=float(row[5]), top1_agreement=float(row[7]) / 100)
    for key, pattern in _NUMBERS.items():
        m = pattern.search(text)
        if m is None or key == "n_chunks":
            continue
        if key == "kl_ppl":
            found["ppl"] = float(m.group(1))
        elif key == "same_top_percent":
            found["top1_agreement"] = float(m.group(1)) / 100
        else:
            found[key] = float(m.group(1))
    return found


def _command(tools: LlamaCppTools, gguf: Path, n_ctx: int, threads: int, chunks: int | None) -> list[str]:
    cmd = [str(tools.perplexity_bin), "-m", str(gguf), "-c", str(n_ctx), "-b", str(n_ctx), "-t", str(threads)]
    return cmd + (["--chunks", str(chunks)] if chunks else [])


def _check_inputs(gguf: Path, n_ctx: int) -> None:
    if not Path(gguf).is_file():
        raise ConfigError(f"GGUF file {gguf} does not exist")
    if n_ctx < 4:
        raise ConfigError(f"n_ctx must be >= 4 (llama-perplexity scores the second half of each chunk), got {n_ctx}")


def _run(cmd: list[str], gguf: Path, kl: bool, partial: Path | None = None, final: Path | None = None,
         ) -> LlamaPerplexity:
    """Run llama-perplexity until its output holds every number (TRIES at most); a file it writes
    to `partial` is renamed to `final` once a run is complete (and removed otherwise)."""
    need = ("ppl", "n_chunks", "ref_ppl", "kl_mean", "top1_agreement") if kl else ("ppl", "n_chunks")
    try:
        for _ in range(TRIES):
            proc = subprocess.run(cmd, capture_output=True, text=True, errors="replace", check=False)
            output = proc.stdout + proc.stderr
            if proc.returncode != 0:
                tail = "\n".join(output.splitlines()[-15:])
                raise LlamaCppError(f"{PERPLEXITY_BIN} failed on {gguf} (exit {proc.returncode}); last lines:\n{tail}")
            got = parse_perplexity_output(output)
            missing = [k for k in need if k not in got]
            if not missing:
                if partial is not None and final is not None:
                    os.replace(partial, final)
                return LlamaPerplexity(Path(gguf), got["ppl"], int(got["n_ctx"]), int(got["n_chunks"]),
                                       got.get("ref_ppl"), got.get("kl_mean"), got.get("top1_agreement"))
    finally:
        if partial is not None:
            partial.unlink(missing_ok=True)
    tail = "\n".join(output.splitlines()[-15:])
    hint = " (a KL report needs at least 100 scored tokens)" if kl else ""
    raise LlamaCppError(f"{PERPLEXITY_BIN} on {gguf} printed no {', '.join(missing)} in {TRIES} runs{hint}; "
                        f"last lines:\n{tail}")


def llama_perplexity(
    gguf: Path, text_file: Path, n_ctx: int, tools: LlamaCppTools, *, chunks: int | None = None,
    threads: int = 2, progress: bool = True,
) -> LlamaPerplexity:  # fmt: skip
    """Perplexity of a GGUF file on a text file, chunks of `n_ctx` (the first `chunks`, or all)."""
    _check_inputs(gguf, n_ctx)
    if not Path(text_file).is_file():
        raise ConfigError(f"text file {text_file} does not exist")
    say(progress, f"llama-perplexity: {Path(gguf).name} on {Path(text_file).name}, n_ctx {n_ctx}")
    return _run(_command(tools, gguf, n_ctx, threads, chunks) + ["-f", str(text_file)], gguf, kl=False)


def save_kl_base(
    reference_gguf: Path, text_file: Path, n_ctx: int, base_file: Path, tools: LlamaCppTools, *,
    chunks: int | None = None, threads: int = 2, progress: bool = True,
) -> LlamaPerplexity:  # fmt: skip
    """Run the reference on the text and save its log-probabilities to `base_file` for KL runs;
    returns the reference's perplexity. An existing `base_file` is kept (no run; ppl is nan)."""
    _check_inputs(reference_gguf, n_ctx)
    base_file = Path(base_file)
    if base_file.is_file():
        say(progress, f"ok (cached) {base_file}")
        stored_ctx, _, stored_chunks = kl_base_header(base_file)
        return LlamaPerplexity(Path(reference_gguf), float("nan"), stored_ctx, stored_chunks)
    if not Path(text_file).is_file():
        raise ConfigError(f"text file {text_file} does not exist")
    say(progress, f"llama-perplexity: saving the reference's logits of {Path(text_file).name} to {base_file.name}")
    base_file.parent.mkdir(parents=True, exist_ok=True)
    partial = base_file.with_name(f".{base_file.name}.partial")
    cmd = _command(tools, reference_gguf, n_ctx, threads, chunks)
    cmd += ["-f", str(text_file), "--kl-divergence-base", str(partial)]
    return _run(cmd, reference_gguf, kl=False, partial=partial, final=base_file)


def kl_base_header(base_file: Path) -> tuple[int, int, int]:
    """(n_ctx, n_vocab, n_chunks) of a base file written by `save_kl_base`."""
    with open(base_file, "rb") as f:
        head = f.read(20)
    if len(head) < 20 or head[:8] != _BASE_MAGIC:
        raise ConfigError(f"{base_file} is not a llama-perplexity logits file (no {_BASE_MAGIC!r} header)")
    n_ctx, n_vocab, n_chunks = struct.unpack("<Iii", head[8:20])
    return n_ctx, n_vocab, n_chunks


def llama_kl_divergence(
    gguf: Path, base_file: Path, tools: LlamaCppTools, *, threads: int = 2, progress: bool = True,
) -> LlamaPerplexity:  # fmt: skip
    """Perplexity, KL divergence from the reference and top-1 agreement of a GGUF file, on the
    tokens stored in `base_file` (`save_kl_base`), with the reference's context size."""
    n_ctx, _, _ = kl_base_header(base_file)
    _check_inputs(gguf, n_ctx)
    say(progress, f"llama-perplexity: KL divergence of {Path(gguf).name} against {Path(base_file).name}")
    cmd = _command(tools, gguf, n_ctx, threads, None) + ["--kl-divergence-base", str(base_file), "--kl-divergence"]
    return _run(cmd, gguf, kl=True)
