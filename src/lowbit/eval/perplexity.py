"""Perplexity over non-overlapping windows (GPTQ's convention; see lowbit.eval.windows)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from lowbit.eval.streamed import StreamedModel, logits_of, module_of
from lowbit.eval.windows import count_windows, evaluating, targets
from lowbit.runtime.kvcache import CacheSpec

DEFAULT_MAX_SEQLEN = 2048


@dataclass(frozen=True)
class PerplexityResult:
    ppl: float  # exp(nll_mean)
    nll_mean: float  # mean negative log-likelihood per scored token, in nats
    n_tokens_scored: int  # n_windows * (seqlen - 1)
    n_windows: int  # n_tokens_input // seqlen
    seqlen: int
    n_tokens_input: int  # N, including the dropped tail
    kv: str | None = None            # the label of the compressed KV cache in the loop (runtime/kvcache/), if any
    kv_chunk: int | None = None      # tokens per forward with that cache
    kv_bytes: int | None = None      # bytes the cache held at the end of a window
    kv_bf16_bytes: int | None = None  # a bfloat16 cache of the same tokens


def default_seqlen(model: torch.nn.Module) -> int:
    """min(2048, config.max_position_embeddings), or 2048 when the model does not say."""
    limit = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if isinstance(limit, int) and limit > 0:
        return min(DEFAULT_MAX_SEQLEN, limit)
    return DEFAULT_MAX_SEQLEN


def perplexity(
    model: torch.nn.Module | StreamedModel,
    tokens: torch.Tensor,
    seqlen: int,
    progress: bool = True,
    desc: str = "perplexity",
    kv: CacheSpec | None = None,
    kv_chunk: int = 128,
) -> PerplexityResult:
    """Perplexity of `model` on `tokens` [1, N] over N // seqlen full windows of `seqlen`.

    Each window scores its seqlen - 1 next-token predictions; the cross-entropy is computed from
    float32 logits and summed in float64. ConfigError if N < seqlen. With `kv`, each window runs
    in chunks of `kv_chunk` tokens through that compressed cache (see windows.window_logits).
    A StreamedModel runs every window through one block at a time (eval/streamed.py), with no `kv`.
    """
    n_windows = count_windows(tokens, seqlen)
    nll_sum = 0.0
    stats: dict = {}
    with torch.inference_mode(), evaluating(module_of(model)):
        for ids, logits in logits_of(model, tokens, seqlen, progress, desc, kv, kv_chunk, stats):
            # logits: [seqlen, vocab] -> predictions [seqlen - 1, vocab] vs targets [seqlen - 1]
            target = targets(ids, logits.device)
            nll_sum += F.cross_entropy(logits[:-1], target, reduction="sum").double().item()
    n_scored = n_windows * (seqlen - 1)
    nll_mean = nll_sum / n_scored
    return PerplexityResult(
        ppl=math.exp(nll_mean),
        nll_mean=nll_mean,
        n_tokens_scored=n_scored,
        n_windows=n_windows,
        seqlen=seqlen,
        n_tokens_input=tokens.shape[1],
        kv=kv.label if kv else None,
        kv_chunk=kv_chunk if kv else None,
        kv_bytes=stats.get("kv_bytes"),
        kv_bf16_bytes=stats.get("kv_bf16_bytes"),
    )
