"""How far a candidate model's next-token distributions are from a reference model's.

Both are scored on the same windows as perplexity (lowbit.eval.windows): per window the
seqlen - 1 predictions, one window in memory at a time. The reference is either a live model or
a ReferenceLogits cache built once from it and reused for many candidates.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from lowbit.errors import ConfigError, DataNotFoundError
from lowbit.eval.streamed import StreamedModel, logits_of, module_of
from lowbit.eval.windows import (
    count_windows,
    evaluating,
    next_token_logprobs,
    targets,
    window_logits,
)
from lowbit.runtime.kvcache import CacheSpec

CACHE_VERSION = 1


@dataclass(frozen=True)
class ComparisonResult:
    ppl: float  # candidate perplexity on the windows
    ref_ppl: float  # reference perplexity on the same windows
    kl_mean: float  # mean over scored tokens of KL(reference || candidate), nats
    kl_p99: float  # 99th percentile of the per-token KL, nats
    top1_agreement: float  # fraction of scored positions where both argmaxes agree
    n_tokens_scored: int  # n_windows * (seqlen - 1)
    seqlen: int


@dataclass(frozen=True)
class _Scored:
    """One window of one model: what a comparison needs from it."""

    logp: torch.Tensor  # [seqlen - 1, vocab] float32 log-probabilities
    top1: torch.Tensor  # [seqlen - 1] argmax token ids
    nll: float  # summed negative log-likelihood of the targets, nats


def _score(ids: torch.Tensor, logits: torch.Tensor) -> _Scored:
    """logits [seqlen, vocab] -> scored predictions for the seqlen - 1 targets ids[1:]."""
    logp = next_token_logprobs(logits)  # [seqlen - 1, vocab]
    target = targets(ids, logp.device)  # [seqlen - 1]
    nll = -logp.gather(1, target.unsqueeze(1)).double().sum().item()
    return _Scored(logp=logp, top1=logp.argmax(dim=-1), nll=nll)


def _tokens_sha256(tokens: torch.Tensor) -> str:
    return hashlib.sha256(tokens.to(torch.int64).cpu().numpy().tobytes()).hexdigest()


@dataclass(frozen=True)
class ReferenceLogits:
    """A reference model's per-window log-probabilities, on disk, for comparing many candidates.

    Layout of the directory `path`:
        logprobs.f16  raw float16 memmap [n_windows, seqlen - 1, vocab]
        top1.npy      int64 [n_windows, seqlen - 1], argmax of the float32 log-probabilities
        meta.json     seqlen, shapes, sha256 of the tokens, per-window NLL (float64); written last

    Disk cost: n_windows * (seqlen - 1) * vocab * 2 bytes, about tokens x vocab x 2 bytes:
    4 x 1024 tokens with a 49,152 vocab (SmolLM2) is 0.4 GB; all 305k WikiText-2 tokens would be
    30 GB, and 92 GB with Qwen2.5's 151,936 vocab. See `disk_bytes`.

    Stored log-probabilities are renormalized in float32 when read, so the fp16 rounding moves
    KL by about 1e-3 relative; the reference perplexity and argmax are stored exactly.
    """

    path: Path
    seqlen: int
    n_windows: int
    vocab: int
    tokens_sha256: str
    window_nll: tuple[float, ...]  # [n_windows]

    @staticmethod
    def disk_bytes(n_tokens: int, seqlen: int, vocab: int) -> int:
        """Bytes the log-prob file takes for `n_tokens` tokens cut into `seqlen` windows."""
        return (n_tokens // seqlen) * (seqlen - 1) * vocab * 2

    @classmethod
    def build(
        cls,
        reference: torch.nn.Module,
        tokens: torch.Tensor,
        seqlen: int,
        path: str | os.PathLike,
        progress: bool = True,
    ) -> ReferenceLogits:
        """Run `reference` over the windows of `tokens` [1, N] once and store what it predicts."""
        n_windows = count_windows(tokens, seqlen)
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        (path / "meta.json").unlink(missing_ok=True)  # incomplete until rewritten below
        logprobs = None
        top1 = np.empty((n_windows, seqlen - 1), dtype=np.int64)
        nlls = []
        windows = window_logits(reference, tokens, seqlen, progress, desc="reference logits")
        with torch.inference_mode(), evaluating(reference):
            for w, (ids, logits) in enumerate(windows):
                scored = _score(ids, logits)
                if logprobs is None:  # the vocabulary size is known from the first window
                    logprobs = cls._create_memmap(path, n_windows, seqlen, logits.shape[-1])
                logprobs[w] = scored.logp.to(torch.float16).cpu().numpy()
                top1[w] = scored.top1.cpu().numpy()
                nlls.append(scored.nll)
        logprobs.flush()
        np.save(path / "top1.npy", top1)
        vocab = logprobs.shape[-1]
        cache = cls(path, seqlen, n_windows, vocab, _tokens_sha256(tokens), tuple(nlls))
        cache._write_meta()
        return cache

    @classmethod
    def _create_memmap(cls, path: Path, n_windows: int, seqlen: int, vocab: int) -> np.memmap:
        need = n_windows * (seqlen - 1) * vocab * 2
        free = shutil.disk_usage(path).free
        if need > free:
            raise ConfigError(
                f"reference logits need {need / 1e9:.1f} GB in {path} but only {free / 1e9:.1f} GB "
                "are free: evaluate fewer tokens (max_tokens) or put the cache elsewhere"
            )
        shape = (n_windows, seqlen - 1, vocab)
        return np.memmap(path / "logprobs.f16", dtype=np.float16, mode="w+", shape=shape)

    def _write_meta(self) -> None:
        meta = {
            "version": CACHE_VERSION,
            "seqlen": self.seqlen,
            "n_windows": self.n_windows,
            "vocab": self.vocab,
            "tokens_sha256": self.tokens_sha256,
            "window_nll": list(self.window_nll),
        }
        tmp = self.path / "meta.json.tmp"
        tmp.write_text(json.dumps(meta, indent=1))
        os.replace(tmp, self.path / "meta.json")

    @classmethod
    def open(cls, path: str | os.PathLike) -> ReferenceLogits:
        """Open a cache written by `build`; DataNotFoundError if it is missing or incomplete."""
        path = Path(path)
        meta_file = path / "meta.json"
        if not meta_file.is_file():
            raise DataNotFoundError(
                f"no complete reference-logits cache in {path} (meta.json is written last; "
                "an interrupted build leaves none): build it with ReferenceLogits.build"
            )
        meta = json.loads(meta_file.read_text())
        if meta.get("version") != CACHE_VERSION:
            raise ConfigError(
                f"{meta_file}: cache version {meta.get('version')!r}, this lowbit reads "
                f"{CACHE_VERSION}: rebuild it"
            )
        return cls(
            path=path,
            seqlen=meta["seqlen"],
            n_windows=meta["n_windows"],
            vocab=meta["vocab"],
            tokens_sha256=meta["tokens_sha256"],
            window_nll=tuple(meta["window_nll"]),
        )

    @property
    def ppl(self) -> float:
        return math.exp(sum(self.window_nll) / (self.n_windows * (self.seqlen - 1)))

    def check_matches(self, tokens: torch.Tensor, seqlen: int) -> None:
        """ConfigError unless this cache was built from exactly these tokens and seqlen."""
        if seqlen != self.seqlen or _tokens_sha256(tokens) != self.tokens_sha256:
            raise ConfigError(
                f"reference-logits cache {self.path} was built for other tokens or seqlen "
                f"(cache seqlen={self.seqlen}, asked {seqlen}): rebuild it for these tokens"
            )

    def windows(self) -> Iterator[_Scored]:
        """The stored windows in order, log-probabilities renormalized in float32."""
        shape = (self.n_windows, self.seqlen - 1, self.vocab)
        logprobs = np.memmap(self.path / "logprobs.f16", dtype=np.float16, mode="r", shape=shape)
        top1 = np.load(self.path / "top1.npy")
        for w in range(self.n_windows):
            logp = torch.from_numpy(np.array(logprobs[w])).float().log_softmax(dim=-1)
            yield _Scored(logp=logp, top1=torch.from_numpy(top1[w]), nll=self.window_nll[w])


Reference = torch.nn.Module | ReferenceLogits | StreamedModel


def _reference_windows(
    reference: Reference, tokens: torch.Tensor, seqlen: int
) -> Iterator[_Scored]:
    """The reference's windows, lazily; a cache is checked against tokens and seqlen right away."""
    if isinstance(reference, ReferenceLogits):
        reference.check_matches(tokens, seqlen)  # before any forward pass is spent
        return reference.windows()
    if isinstance(reference, StreamedModel):
        return (_score(ids, logits) for ids, logits in reference.window_logits(tokens, seqlen))
    windows = window_logits(reference, tokens, seqlen, progress=False)
    return (_score(ids, logits) for ids, logits in windows)


def compare_to_reference(
    model: torch.nn.Module | StreamedModel,
    reference: Reference,
    tokens: torch.Tensor,
    seqlen: int,
    progress: bool = True,
    desc: str = "compare",
    kv: CacheSpec | None = None,
    kv_chunk: int = 128,
    kv_stats: dict | None = None,
) -> ComparisonResult:
    """KL(reference || model), top-1 agreement and both perplexities on `tokens` [1, N].

    `reference` is a live model (run window by window alongside `model`), a ReferenceLogits
    built from the same tokens and seqlen, or a StreamedModel (every window through one block at
    a time, then one window at a time). Only one window of each is in memory at a time.
    `model` is a model in memory or a StreamedModel too: a streamed candidate and a streamed
    reference each run all windows through their blocks (one block of one model in memory at a
    time, each keeping its windows' hidden states), then hand over their logits window by window.
    With `kv`, the candidate runs through that compressed KV cache (see windows.window_logits;
    not with a streamed candidate); the reference always runs with its full cache.
    """
    n_windows = count_windows(tokens, seqlen)
    kl_per_token = []  # n_windows x [seqlen - 1] float64, on the CPU
    nll = ref_nll = 0.0
    agree = 0
    live = (reference,) if isinstance(reference, torch.nn.Module) else ()
    with torch.inference_mode(), evaluating(module_of(model), *live):
        references = _reference_windows(reference, tokens, seqlen)
        candidates = logits_of(model, tokens, seqlen, progress, desc, kv, kv_chunk, kv_stats)
        for (ids, logits), ref in zip(candidates, references):
            cand = _score(ids, logits)
            ref_logp = ref.logp.to(cand.logp.device)  # [seqlen - 1, vocab]
            p = ref_logp.exp()
            # KL(ref || cand) per position; p == 0 terms contribute 0 (never 0 * -inf = nan)
            terms = torch.where(p > 0, p * (ref_logp - cand.logp), 0.0)
            kl_per_token.append(terms.sum(dim=-1).double().cpu())
            agree += (cand.top1 == ref.top1.to(cand.top1.device)).sum().item()
            nll += cand.nll
            ref_nll += ref.nll
    kl = torch.cat(kl_per_token).numpy()  # [n_windows * (seqlen - 1)]
    n_scored = n_windows * (seqlen - 1)
    return ComparisonResult(
        ppl=math.exp(nll / n_scored),
        ref_ppl=math.exp(ref_nll / n_scored),
        kl_mean=float(kl.mean()),
        kl_p99=float(np.percentile(kl, 99)),
        top1_agreement=agree / n_scored,
        n_tokens_scored=n_scored,
        seqlen=seqlen,
    )
