"""Evaluation and calibration text: named datasets, local files, tokens and calibration windows.

Named datasets live as plain files in one of `paths.data_dirs()` (the --data-dir flag, else
$LOWBIT_DATA, then <cache>/data and ./data). Any other argument is a path to a local `.txt` file
(the whole file is one document) or `.jsonl` file (one {"text": ...} document per line).

Tokenization follows GPTQ's evaluation: the whole eval text is tokenized in one call,
`tokenizer(text)["input_ids"]`, with the tokenizer's default special tokens. For a tokenizer that
adds a BOS token (Llama 2, Gemma) that is one BOS at the very start of the stream, nothing else.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any

import numpy as np
import torch

from lowbit import paths
from lowbit.errors import ConfigError, DataNotFoundError

log = logging.getLogger(__name__)

DocRange = tuple[int, int]  # [start, stop) over a .jsonl file's documents


@dataclass(frozen=True)
class DatasetSpec:
    """One named dataset: which file (and which documents of it) to evaluate and calibrate on."""

    name: str
    eval_file: str
    eval_docs: DocRange | None  # None: the whole file is the eval text
    calibration_file: str | None  # None: this dataset has no calibration split here
    calibration_docs: DocRange | None  # None: the whole file is one calibration document
    description: str
    source: str  # where the file comes from, so a user can rebuild it


DATASETS: Mapping[str, DatasetSpec] = MappingProxyType({
    spec.name: spec
    for spec in (
        DatasetSpec(
            name="wikitext2",
            eval_file="wikitext2-test.txt",
            eval_docs=None,
            calibration_file=None,
            calibration_docs=None,
            description="WikiText-2 raw test split (the standard GPTQ perplexity text)",
            source='Hugging Face dataset "wikitext", config "wikitext-2-raw-v1", split "test": '
            'rows joined by "\\n\\n" (as GPTQ evaluates it), LF line ends; CC BY-SA 3.0',
        ),
        DatasetSpec(
            name="ptb",
            eval_file="ptb-test.txt",
            eval_docs=None,
            calibration_file="ptb-valid.txt",
            calibration_docs=None,
            description="Penn Treebank (Mikolov release) test text; calibration on valid",
            source="Mikolov's Penn Treebank release, ptb.test.txt and ptb.valid.txt, "
            "copied unchanged",
        ),
        DatasetSpec(
            name="c4",
            eval_file="c4-validation-2k.jsonl",
            eval_docs=(1000, 2000),
            calibration_file="c4-validation-2k.jsonl",
            calibration_docs=(0, 1000),
            description="2,000 C4 validation documents: calibrate on the first 1000, "
            "evaluate on the last 1000 (joined by \\n\\n), so the two never overlap",
            source='Hugging Face dataset "allenai/c4", config "en", validation split: 2,000 '
            'documents written as one {"text": ...} JSON object per line; ODC-BY',
        ),
    )
})  # read-only: a new dataset is one more DatasetSpec above


LAMBADA = DatasetSpec(
    name="lambada",
    eval_file="tasks/lambada/lambada_test.jsonl",
    eval_docs=None,
    calibration_file=None,
    calibration_docs=None,
    description="LAMBADA (OpenAI's test file, 5,153 passages): predict each passage's last word",
    source='lm-evaluation-harness\'s lambada_test.jsonl (sha256 4aa8d02c...db226), one {"text": ...} per line; '
    "CC BY 4.0",
)


def _spec_for_file(filename: str) -> DatasetSpec | None:
    for spec in (*DATASETS.values(), LAMBADA):
        if filename in (spec.eval_file, spec.calibration_file):
            return spec
    return None


def lambada_passages(data_dir: str | os.PathLike | None = None, limit: int | None = None) -> list[str]:
    """LAMBADA passages (the target is each one's last whitespace-separated word)."""
    docs = _read_documents(resolve_data_file(LAMBADA.eval_file, data_dir))
    return docs if limit is None else docs[:limit]


def resolve_data_file(filename: str, data_dir: str | os.PathLike | None = None) -> Path:
    """Find `filename` in `paths.data_dirs(data_dir)`, first match wins.

    Raises DataNotFoundError naming the file, every directory searched, how to point lowbit at
    another directory, and (for a named dataset's file) what the file is and where to get it.
    """
    searched = paths.data_dirs(data_dir)
    for directory in searched:
        candidate = directory / filename
        if candidate.is_file():
            return candidate
    lines = [f"data file {filename!r} not found. Searched, in order:"]
    lines += [f"  {d}" for d in searched]
    lines.append(
        f"Put it in one of these, or pass --data-dir DIR (or set {paths.DATA_ENV}=DIR) "
        "to the folder that holds it."
    )
    spec = _spec_for_file(filename)
    if spec is not None:
        lines.append(f"It is the {spec.name!r} dataset: {spec.description}.")
        lines.append(f"Source: {spec.source}.")
    raise DataNotFoundError("\n".join(lines))


# ---------------------------------------------------------------------------------------------
# Text


def read_text_file(path: Path, what: str = "data file") -> str:
    """A file's whole text, refused with a ConfigError naming `what` and the file when it is not
    UTF-8 text: a NUL byte in its first 8 KiB (a binary file, looked at before reading the rest)
    or bytes that do not decode (the offset of the first one is named)."""
    with path.open("rb") as f:
        head = f.read(8192)
        if b"\x00" in head:
            raise ConfigError(f"{what} {str(path)!r} holds NUL bytes: it looks binary, not text; "
                              "give a UTF-8 text file")
        raw = head + f.read()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"{what} {str(path)!r} is not UTF-8 text (byte {e.start} is {raw[e.start]:#04x}); "
                          "convert it to UTF-8, e.g. iconv -f latin1 -t utf-8") from None


def _read_jsonl(path: Path) -> list[str]:
    docs: list[str] = []
    # split on newlines only: str.splitlines would also split at a U+2028 inside a JSON string
    for lineno, line in enumerate(read_text_file(path).split("\n"), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
        except RecursionError:
            raise ConfigError(f"{path}:{lineno}: JSON nested too deeply to read") from None
        if not isinstance(record, dict) or not isinstance(record.get("text"), str):
            raise ConfigError(f'{path}:{lineno}: expected an object with a string "text" field')
        docs.append(record["text"])
    return docs


def _read_documents(path: Path, doc_range: DocRange | None = None) -> list[str]:
    """A .txt file is one document; a .jsonl file is one document per line, sliced by range."""
    if path.suffix == ".txt":
        text = read_text_file(path)
        if not text.strip():
            raise ConfigError(f"data file {str(path)!r} holds no text")
        return [text]
    docs = _read_jsonl(path)
    if not any(d.strip() for d in docs):
        raise ConfigError(f"data file {str(path)!r} holds no documents with text (one {{\"text\": ...}} per line)")
    if doc_range is None:
        return docs
    start, stop = doc_range
    if len(docs) < stop:
        raise DataNotFoundError(
            f"{path} holds {len(docs)} documents; documents [{start}, {stop}) are needed. "
            "The file is truncated or not the expected one."
        )
    return docs[start:stop]


def _local_path(name_or_path: str | os.PathLike) -> Path:
    """A path given instead of a dataset name: must exist and be .txt or .jsonl."""
    path = Path(name_or_path).expanduser()
    if path.suffix not in (".txt", ".jsonl"):
        raise ConfigError(
            f"unknown dataset {str(name_or_path)!r}: expected one of {sorted(DATASETS)} "
            "or a path to a .txt or .jsonl file"
        )
    if not path.is_file():
        raise DataNotFoundError(f"data file {str(path)!r} does not exist")
    return path


def eval_text(name_or_path: str | os.PathLike, data_dir: str | os.PathLike | None = None) -> str:
    """The evaluation text: a whole .txt file, or a .jsonl file's documents joined by "\\n\\n"."""
    spec = DATASETS.get(str(name_or_path))
    if spec is None:
        return "\n\n".join(_read_documents(_local_path(name_or_path)))
    path = resolve_data_file(spec.eval_file, data_dir)
    return "\n\n".join(_read_documents(path, spec.eval_docs))


def calibration_documents(
    name_or_path: str | os.PathLike, data_dir: str | os.PathLike | None = None
) -> list[str]:
    """The calibration pool as a list of documents (a .txt file is a single document).

    A local .jsonl file gives all its documents, so it overlaps its own eval text: pass a
    different file for evaluation if that matters.
    """
    spec = DATASETS.get(str(name_or_path))
    if spec is None:
        return _read_documents(_local_path(name_or_path))
    if spec.calibration_file is None:
        raise ConfigError(
            f"dataset {spec.name!r} has no calibration split here (only its test text is "
            "shipped, and calibrating on the eval text would flatter the result); "
            "calibrate on 'c4' instead"
        )
    path = resolve_data_file(spec.calibration_file, data_dir)
    return _read_documents(path, spec.calibration_docs)


# ---------------------------------------------------------------------------------------------
# Tokens


def _encode(tokenizer: Any, text: str) -> list[int]:
    """GPTQ-style: the tokenizer's default call, special tokens as it adds them."""
    return list(tokenizer(text)["input_ids"])


def _tokenizer_fingerprint(tokenizer: Any) -> str:
    """sha256 over the tokenizer's class, name, vocabulary (when it has one) and a probe encoding.

    The probe catches tokenizers that share a vocabulary but differ in what they add (BOS).
    """
    h = hashlib.sha256()
    h.update(type(tokenizer).__qualname__.encode())
    h.update(str(getattr(tokenizer, "name_or_path", "")).encode())
    get_vocab = getattr(tokenizer, "get_vocab", None)
    if callable(get_vocab):
        h.update(json.dumps(sorted(get_vocab().items())).encode())
    h.update(json.dumps(_encode(tokenizer, "lowbit probe: Hello, world!\n\n 123")).encode())
    return h.hexdigest()


def _cached_encode(tokenizer: Any, text: str) -> np.ndarray:
    """Token ids of `text`, cached as <cache>/tokens/<text sha>-<tokenizer sha>.npy."""
    text_sha = hashlib.sha256(text.encode("utf-8")).hexdigest()
    key = f"{text_sha[:24]}-{_tokenizer_fingerprint(tokenizer)[:24]}"
    path = paths.cache_dir() / "tokens" / f"{key}.npy"
    if path.is_file():
        try:
            return np.load(path)
        except (OSError, ValueError) as e:
            log.warning("token cache %s is unreadable (%s); tokenizing again", path, e)
    ids = np.asarray(_encode(tokenizer, text), dtype=np.int64)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.stem}.{os.getpid()}.tmp.npy")
    np.save(tmp, ids)
    os.replace(tmp, path)  # atomic: a concurrent reader never sees half a file
    return ids


def eval_tokens(
    tokenizer: Any,
    name_or_path: str | os.PathLike,
    max_tokens: int | None = None,
    data_dir: str | os.PathLike | None = None,
) -> torch.Tensor:
    """The eval text tokenized once (cached on disk), truncated to `max_tokens`. -> [1, N] int64."""
    if max_tokens is not None and max_tokens < 1:
        raise ConfigError(f"max_tokens must be >= 1 (or None for all), got {max_tokens}")
    ids = _cached_encode(tokenizer, eval_text(name_or_path, data_dir))
    if max_tokens is not None:
        ids = ids[:max_tokens]
    return torch.from_numpy(np.array(ids, dtype=np.int64)).unsqueeze(0)  # [1, N]


def _stream(tokenizer: Any, docs: Sequence[list[int]], texts: Sequence[str]) -> list[int]:
    """All documents as one token stream: joined by EOS, or (no EOS) the texts joined by \\n\\n."""
    eos = getattr(tokenizer, "eos_token_id", None)
    if eos is None:
        return _encode(tokenizer, "\n\n".join(texts))
    stream: list[int] = []
    for i, ids in enumerate(docs):
        if i:
            stream.append(eos)
        stream.extend(ids)
    return stream


def calibration_samples(
    tokenizer: Any,
    name_or_path: str | os.PathLike = "c4",
    n_samples: int = 128,
    seqlen: int = 2048,
    seed: int = 0,
    data_dir: str | os.PathLike | None = None,
) -> torch.Tensor:
    """GPTQ-style calibration windows, deterministic for a seed. -> [n_samples, seqlen] int64.

    Every document of the pool is tokenized on its own. If the documents with at least `seqlen`
    tokens hold at least n_samples * seqlen tokens between them, each sample (as in GPTQ's C4
    loader) picks one of them uniformly and a uniform window of `seqlen` tokens inside it.
    Otherwise a draw would keep reusing a few documents, so the whole pool is concatenated in
    order (documents separated by the tokenizer's EOS, or by "\\n\\n" in the text if it has none)
    and each sample is a uniform window of that stream (as GPTQ's WikiText-2 and PTB loaders do).
    All choices come from one random.Random(seed).
    """
    if n_samples < 1:
        raise ConfigError(f"n_samples must be >= 1, got {n_samples}")
    if seqlen < 2:
        raise ConfigError(f"seqlen must be >= 2, got {seqlen}")
    texts = calibration_documents(name_or_path, data_dir)
    docs = [_encode(tokenizer, t) for t in texts]
    rng = random.Random(seed)

    # pool: the token lists windows are drawn from
    pool = [d for d in docs if len(d) >= seqlen]
    if sum(len(d) for d in pool) < n_samples * seqlen:
        pool = [_stream(tokenizer, docs, texts)]
        if len(pool[0]) < seqlen:
            raise ConfigError(
                f"calibration pool {str(name_or_path)!r} has {len(pool[0])} tokens in all, "
                f"fewer than seqlen={seqlen}. Use a shorter seqlen or more text."
            )

    samples = torch.empty(n_samples, seqlen, dtype=torch.int64)  # [n_samples, seqlen]
    for i in range(n_samples):
        doc = pool[rng.randrange(len(pool))]
        start = rng.randint(0, len(doc) - seqlen)
        samples[i] = torch.tensor(doc[start : start + seqlen], dtype=torch.int64)
    return samples
