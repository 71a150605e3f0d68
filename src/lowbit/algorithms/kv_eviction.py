"""Which cached tokens to keep under a budget: StreamingLLM, H2O, SnapKV; and the attention
statistics they (and ZipCache's saliency) are computed from.

Pure functions on score tensors, so each policy can be checked on a hand-built attention pattern.
Every selector returns sorted token indices [B, H, budget] (the same count for every head, so
the cache stays one dense tensor per layer).

- StreamingLLM (Xiao et al. 2023): the first `sinks` tokens plus the most recent ones.
- H2O (Zhang et al. 2023): the most recent `recent` tokens plus the heavy hitters, the tokens
  with the largest attention accumulated over every query so far.
- SnapKV (Li et al. 2024): the last `window` tokens (the observation window) plus the tokens the
  window's queries vote for, after a 1-D pooling of the votes that keeps neighbours together.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lowbit.errors import ConfigError


def attention_probs(query: torch.Tensor, keys: torch.Tensor, scaling: float,
                    positions: torch.Tensor | None = None) -> torch.Tensor:
    """Softmax attention of queries [B, Hq, q, D] over keys [B, Hkv, N, D] -> [B, Hkv, q, N] float32.

    `positions` (long [q]) are the queries' places among the N keys; by default the last q (the
    chunk just appended to the cache). A query sees every key up to its own place. Query heads
    that share a KV head (GQA) are averaged, so the result is per KV head.
    """
    B, Hq, q, D = query.shape
    Hkv, N = keys.shape[1], keys.shape[2]
    if Hq % Hkv:
        raise ConfigError(f"{Hq} query heads do not group onto {Hkv} KV heads")
    qg = query.float().reshape(B, Hkv, Hq // Hkv, q, D)
    logits = torch.einsum("bhgqd,bhnd->bhgqn", qg, keys.float()) * scaling
    pos = (torch.arange(N - q, N) if positions is None else positions).unsqueeze(1)
    logits = logits.masked_fill(torch.arange(N).unsqueeze(0) > pos, float("-inf"))
    return logits.softmax(-1).mean(2)


def _check_budget(n: int, budget: int) -> None:
    if budget < 1:
        raise ConfigError(f"KV budget of {budget} tokens: keep at least one token")
    if n < budget:
        raise ConfigError(f"cannot keep {budget} tokens of a cache that holds {n}")


def streaming_keep(batch: int, heads: int, n: int, budget: int, sinks: int = 4) -> torch.Tensor:
    """The first `sinks` tokens and the last budget - sinks ones."""
    _check_budget(n, budget)
    sinks = min(sinks, budget)
    idx = torch.cat([torch.arange(sinks), torch.arange(n - (budget - sinks), n)])
    return idx.expand(batch, heads, budget).clone()


def _top_with_recent(scores: torch.Tensor, budget: int, recent: int) -> torch.Tensor:
    """The last `recent` positions plus the top (budget - recent) of the others by score."""
    B, H, n = scores.shape
    _check_budget(n, budget)
    recent = min(recent, budget)
    old = n - recent
    top = scores[..., :old].topk(budget - recent, dim=-1).indices
    tail = torch.arange(old, n).expand(B, H, recent)
    return torch.cat([top, tail], -1).sort(-1).values


def h2o_keep(accumulated: torch.Tensor, budget: int, recent: int) -> torch.Tensor:
    """accumulated [B, H, n]: attention each token has received so far."""
    return _top_with_recent(accumulated, budget, recent)


def snapkv_keep(window_probs: torch.Tensor, budget: int, window: int, kernel: int = 7) -> torch.Tensor:
    """window_probs [B, H, w, n]: attention of the last w queries (the observation window) over
    the n cached tokens. Votes are summed over the window, average-pooled with `kernel`, and the
    top (budget - window) tokens before the window are kept with the window itself."""
    B, H, _, n = window_probs.shape
    votes = window_probs.sum(2)
    if kernel > 1:
        votes = F.avg_pool1d(votes.reshape(B * H, 1, n), kernel, stride=1, padding=kernel // 2,
                             count_include_pad=False).reshape(B, H, n)
    return _top_with_recent(votes, budget, min(window, n))


def gather_tokens(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """x [B, H, n, ...] -> x at token indices idx [B, H, k] -> [B, H, k, ...]."""
    shape = idx.shape + x.shape[3:]
    return x.gather(2, idx.reshape(idx.shape + (1,) * (x.dim() - 3)).expand(shape))
