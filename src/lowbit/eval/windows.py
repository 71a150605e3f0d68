"""The one window loop shared by perplexity, KL comparison and the reference-logits cache.

Windowing follows GPTQ: a [1, N] token stream is cut into N // seqlen non-overlapping windows of
exactly `seqlen` tokens; a trailing partial window is dropped. Each window is run on its own (no
context carried over), and scores its seqlen - 1 next-token predictions: position t predicts
token t + 1, so the first token of each window is context only.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from lowbit.errors import ConfigError
from lowbit.runtime.generate import cache_argument
from lowbit.runtime.kvcache import (
    CacheSpec,
    cache_nbytes,
    full_cache_nbytes,
    kv_cache_for,
    observing,
)
from lowbit.runtime.qlinear import dense_weights


def count_windows(tokens: torch.Tensor, seqlen: int) -> int:
    """Number of full windows in `tokens` [1, N]; ConfigError if there is not even one."""
    if tokens.dim() != 2 or tokens.shape[0] != 1:
        raise ConfigError(f"tokens must have shape [1, N], got {list(tokens.shape)}")
    if seqlen < 2:
        raise ConfigError(f"seqlen must be >= 2 (a context token and a target), got {seqlen}")
    n = tokens.shape[1]
    if n < seqlen:
        raise ConfigError(
            f"only {n} tokens to evaluate, but one window needs seqlen={seqlen}: "
            "pass more text or a smaller seqlen"
        )
    return n // seqlen


def _model_device(model: torch.nn.Module) -> torch.device:
    param = next(model.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


def window_logits(
    model: torch.nn.Module,
    tokens: torch.Tensor,
    seqlen: int,
    progress: bool = True,
    desc: str = "eval",
    kv: CacheSpec | None = None,
    chunk: int = 128,
    kv_stats: dict | None = None,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield (ids [seqlen], logits [seqlen, vocab] float32) for each window, one at a time.

    The forward runs under torch.inference_mode() with use_cache=False in the model's own dtype;
    only the logits are cast to float32. `ids` stays on the CPU, `logits` is on the model's
    device. Callers put the model in eval mode for the whole loop (see `evaluating`).

    With `kv` (a compressed cache or eviction policy, runtime/kvcache/) each window runs in chunks of
    `chunk` tokens through a fresh cache of that kind: every token attends to the earlier chunks only
    through the compressed cache. `kv_stats` (a dict) then receives the bytes the cache held at
    the end of the last window ("kv_bytes") and what a bfloat16 cache of the same tokens takes
    ("kv_bf16_bytes").
    """
    n_windows = count_windows(tokens, seqlen)
    device = _model_device(model)
    with dense_weights(model):  # quantized layers dequantize once, not once per window
        for w in tqdm(range(n_windows), desc=desc, unit="window", disable=not progress):
            ids = tokens[0, w * seqlen : (w + 1) * seqlen]  # [seqlen]
            with torch.inference_mode():
                if kv is None:
                    out = model(input_ids=ids.unsqueeze(0).to(device), use_cache=False)
                    logits = out.logits[0].float()  # [seqlen, vocab]
                else:
                    logits = _chunked_logits(model, ids.to(device), kv, chunk, kv_stats)
            yield ids, logits


def _chunked_logits(model: torch.nn.Module, ids: torch.Tensor, spec: CacheSpec, chunk: int,
                    kv_stats: dict | None):
    cache = kv_cache_for(model.config, spec)
    parts = []
    with observing(model, cache):
        for i in range(0, ids.shape[0], chunk):
            out = model(input_ids=ids[i : i + chunk].unsqueeze(0), **cache_argument(model, cache), use_cache=True)
            parts.append(out.logits[0].float())
    if kv_stats is not None and cache is not None:
        kv_stats["kv_bytes"] = cache_nbytes(cache)
        kv_stats["kv_bf16_bytes"] = full_cache_nbytes(model.config, ids.shape[0])
    return torch.cat(parts, 0)


@contextmanager
def evaluating(*models: torch.nn.Module) -> Iterator[None]:
    """Put `models` in eval mode (no dropout) and restore each one's training flag on exit."""
    flags = [(m, m.training) for m in models]
    for m, _ in flags:
        m.eval()
    try:
        yield
    finally:
        for m, was_training in reversed(flags):  # reversed: a model passed twice ends as it began
            m.train(was_training)


def next_token_logprobs(logits: torch.Tensor) -> torch.Tensor:
    """Log-probabilities of the scored predictions: [seqlen, vocab] -> [seqlen - 1, vocab] f32."""
    return F.log_softmax(logits[:-1].float(), dim=-1)


def targets(ids: torch.Tensor, device: torch.device) -> torch.Tensor:
    """The tokens the scored predictions aim at: [seqlen] -> [seqlen - 1]."""
    return ids[1:].to(device)
