"""llama.cpp's importance matrix computed on lowbit's own calibration windows.

lowbit calibrates on token windows ([n_samples, seqlen] ids, lowbit.data.calibration_samples);
llama-imatrix reads a text file, tokenizes it whole, cuts the ids into chunks of its context size
and runs the model on each chunk. To give it the same data, `write_calibration_text` decodes each
window back to text (special tokens kept as text, parsed back with --parse-special) and writes
the windows one after the other, joined so that the tokenizer does not see the joins (or, where
it cannot help seeing one, so that the chunks stay aligned);
`compute_imatrix` runs llama-imatrix with context = seqlen and
chunks = n_samples.

The ids llama-imatrix sees are close to, not equal to, lowbit's: decoding then encoding a window
is not always the identity (a window that starts inside a word, a UTF-8 character cut at a
window's edge), and a shift early in the file moves every
later chunk boundary. With a tokenizer that adds BOS, llama-imatrix also overwrites each chunk's
first token with BOS (the text leaves out the first window's first token, so the chunks stay
aligned). `CalibrationText.agreement` measures how close: the fraction of positions where the
chunks, re-tokenized with the same (Hugging Face) tokenizer as llama.cpp would cut them, equal
lowbit's windows.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from pathlib import Path

import torch

from lowbit.errors import ConfigError
from lowbit.peers.llamacpp import run_step
from lowbit.peers.llamacpp_build import IMATRIX_BIN, LlamaCppTools, say


@dataclass(frozen=True)
class CalibrationText:
    """A text file for llama-imatrix made from lowbit's calibration windows, and how faithful."""

    path: Path
    n_ctx: int  # llama-imatrix's context: lowbit's calibration seqlen
    n_chunks: int  # llama-imatrix's --chunks: lowbit's number of samples
    agreement: float  # fraction of token positions equal to lowbit's windows (see module doc)
    chunks_equal: int  # chunks whose every token equals lowbit's window


def _adds_bos(tokenizer) -> bool:
    """Whether the tokenizer's default call starts with BOS (llama.cpp's add_bos follows it)."""
    bos = getattr(tokenizer, "bos_token_id", None)
    ids = list(tokenizer("a")["input_ids"])
    return bos is not None and bool(ids) and ids[0] == bos


_JOINS = ("", " ", "\n")  # what may separate two windows' text, first choice first
_EDGE = 8  # tokens on each side of a join checked for merges across it


def _decode(tokenizer, ids: list[int]) -> str:
    return tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)


def _join(tokenizer, left: list[int], right: list[int]) -> tuple[str, int]:
    """How to join two windows' text: (separator, tokens of `right` to leave out).

    First choice: a separator of _JOINS with which the text around the join tokenizes as its two
    sides do apart ("" for byte-level BPE and SentencePiece, whose text carries its own spaces;
    " " for a tokenizer that splits on whitespace). When every one merges across the join (a
    window ending in "," before one starting with "."), a separator that is one token of its own
    takes the place of right's first token, so that the chunks stay aligned at the cost of that
    one token. Else "" (the chunks after it shift; the agreement measure shows it)."""
    a, b = _decode(tokenizer, left[-_EDGE:]), _decode(tokenizer, right[:_EDGE])

    def encode(text: str) -> list[int]:
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])

    apart = encode(a) + encode(b)
    for sep in _JOINS:
        if encode(a + sep + b) == apart:
            return sep, 0
    rest = _decode(tokenizer, right[1:_EDGE])
    for sep in _JOINS[1:]:
        one = encode(sep)
        if len(one) == 1 and encode(a + sep + rest) == encode(a) + one + encode(rest):
            return sep, 1
    return "", 0


def calibration_text(tokenizer, samples: torch.Tensor) -> str:
    """The windows ([n, seqlen] ids) decoded and joined so that the joins add no tokens (_join).

    With a BOS-adding tokenizer the first window's first token is left out: llama.cpp puts a BOS
    there (and on every chunk's first token) itself. The first window is appended once more at
    the end, so that a text which re-tokenizes a little shorter still fills n chunks.
    """
    if samples.ndim != 2 or samples.shape[0] < 1:
        raise ConfigError(f"calibration samples must be [n_samples, seqlen] ids, got {tuple(samples.shape)}")
    rows = [list(map(int, row)) for row in samples]
    rows.append(rows[0])
    parts = [_decode(tokenizer, rows[0][1:] if _adds_bos(tokenizer) else rows[0])]
    for left, right in itertools.pairwise(rows):
        sep, skip = _join(tokenizer, left, right)
        parts += [sep, _decode(tokenizer, right[skip:])]
    return "".join(parts)


def imatrix_chunks(tokenizer, text: str, n_ctx: int, n_chunks: int) -> torch.Tensor:
    """The chunks llama-imatrix cuts `text` into, tokenized with `tokenizer`. -> [n, n_ctx] ids.

    As llama-imatrix does: the whole text tokenized once with the tokenizer's special tokens,
    consecutive chunks of n_ctx ids, each chunk's first id replaced by BOS when the tokenizer adds
    one; at most n_chunks of them.
    """
    ids = torch.tensor(list(tokenizer(text)["input_ids"]), dtype=torch.int64)
    n = min(n_chunks, ids.numel() // n_ctx)
    chunks = ids[: n * n_ctx].reshape(n, n_ctx).clone()  # [n, n_ctx]
    if _adds_bos(tokenizer):
        chunks[:, 0] = tokenizer.bos_token_id
    return chunks


def write_calibration_text(tokenizer, samples: torch.Tensor, path: Path) -> CalibrationText:
    """Write `calibration_text` of the windows to `path` and measure how faithful it is."""
    n, seqlen = samples.shape
    text = calibration_text(tokenizer, samples)
    chunks = imatrix_chunks(tokenizer, text, seqlen, n)
    if chunks.shape[0] < n:
        raise ConfigError(f"the calibration text re-tokenizes to {chunks.shape[0]} chunks of {seqlen}, "
                          f"fewer than the {n} samples")
    same = chunks == samples  # [n, seqlen]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return CalibrationText(path, int(seqlen), int(n), float(same.float().mean()),
                           int(same.all(dim=1).sum()))


def compute_imatrix(
    reference_gguf: Path, calib: CalibrationText, out: Path, tools: LlamaCppTools,
    threads: int = 2, progress: bool = True,
) -> Path:  # fmt: skip
    """llama-imatrix of `reference_gguf` on the calibration text, written to `out` (a .gguf).

    Context calib.n_ctx, calib.n_chunks chunks, one chunk per batch, special tokens parsed,
    no perplexity. Cached: an existing `out` is returned as it is (its name should say what
    calibration made it). Raises LlamaCppError with the tool's last lines if it fails.
    """
    out = Path(out)
    if out.is_file():
        say(progress, f"ok (cached) {out}")
        return out
    if not Path(reference_gguf).is_file():
        raise ConfigError(f"reference GGUF {reference_gguf} does not exist")
    say(progress, f"llama-imatrix on {calib.n_chunks} chunks of {calib.n_ctx} tokens -> {out.name}")
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(f".{out.stem}.partial.gguf")
    cmd = [
        str(tools.imatrix_bin), "-m", str(reference_gguf), "-f", str(calib.path), "-o", str(partial),
        "-c", str(calib.n_ctx), "-b", str(calib.n_ctx), "--chunks", str(calib.n_chunks),
        "-t", str(threads), "--no-ppl", "--parse-special", "--output-frequency", "1000000",
    ]  # fmt: skip
    run_step(cmd, partial, out, IMATRIX_BIN)
    return out
