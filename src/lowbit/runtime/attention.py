"""Attention for the CPU runtime: one query token per step against the cache, and prefill in blocks.

torch's CPU flash-attention kernel (what transformers' "sdpa" runs) takes about 0.5 ms per layer
for a single query over a few hundred cached tokens of a 1.5B model, longer than that layer's
packed matrix products. A single query needs no tiling: with the query heads grouped by the
key/value head they share, scores are one small matmul per kv head (no repeat of the cache
across query heads), then a float32 softmax and a second matmul.

Prefill (several query tokens) under a boolean mask, or none (causal from the top left, as sdpa),
runs the same arithmetic on blocks of 128 query rows, each against only the keys its rows may
see: the causal upper triangle (and a static cache's empty tail) is skipped, not masked. On a
512-token prompt of a 1.5B model that takes 0.15 s off a whole prefill against torch's CPU flash
kernel (`benchmarks/prefill_interleaved.py --sdpa-too`, BENCHMARKS.md). Everything else (float
masks, rows that see no key, per-head masks, logit soft-capping, dropout) goes to "sdpa" unchanged.

    use_fast_attention(model)   # model.config._attn_implementation = "lowbit_sdpa"
"""

from __future__ import annotations

import math

import torch

NAME = "lowbit_sdpa"
_registered = False


PREFILL_BLOCK = 128  # query rows per block of the prefill path


def _prefill_blocks(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, keep: torch.Tensor,
                    scale: float) -> torch.Tensor | None:
    """Several queries [B, H, q, D] against key / value [B, KV, T, D] under `keep` [B or 1, 1, q, T]
    (True: may attend) -> [B, q, H, D], or None where a row sees no key or the mask has another
    shape (per-head masks; left to sdpa)."""
    b, h, q, d = query.shape
    kv, t = key.shape[1], key.shape[2]
    if keep.dim() != 4 or keep.shape[1] != 1 or keep.shape[-2:] != (q, t) or not bool(keep.any(-1).all()):
        return None
    g = h // kv
    qg = query.reshape(b, kv, g, q, d)
    out = torch.empty(b, kv, g, q, d, dtype=value.dtype, device=value.device)
    for r0 in range(0, q, PREFILL_BLOCK):
        r1 = min(q, r0 + PREFILL_BLOCK)
        m = keep[..., r0:r1, :]                                   # [B or 1, 1, rows, T]
        end = int(m.reshape(-1, t).any(0).nonzero().max()) + 1    # keys past `end`: no row sees them
        rows = qg[:, :, :, r0:r1].reshape(b, kv, g * (r1 - r0), d)
        scores = torch.matmul(rows, key[:, :, :end].transpose(2, 3)).float().mul_(scale)
        scores = scores.view(b, kv, g, r1 - r0, end).masked_fill_(~m[..., :end].unsqueeze(2), float("-inf"))
        probs = scores.softmax(-1).to(value.dtype).view(b, kv, g * (r1 - r0), end)
        out[:, :, :, r0:r1] = torch.matmul(probs, value[:, :, :end]).view(b, kv, g, r1 - r0, d)
    return out.view(b, h, q, d).transpose(1, 2)


def decode_attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling: float | None = None,
                     softcap: float | None = None, **kwargs):
    """transformers attention interface: query [B, H, q, D], key / value [B, KV, T, D] -> ([B, q, H, D], None)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    def sdpa():
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)

    if softcap is not None or (dropout and module.training) or kwargs.get("s_aux") is not None:
        return sdpa()
    if query.shape[2] != 1:
        q, t = query.shape[2], key.shape[2]
        if attention_mask is None:
            # no mask: sdpa's is_causal, whose triangle starts at the top left (query i sees keys
            # 0 .. i: a static cache's first chunk, its empty tail unseen); a non-causal module to sdpa
            if not getattr(module, "is_causal", True):
                return sdpa()
            keep = torch.ones(q, t, dtype=torch.bool, device=query.device).tril()[None, None]
        elif attention_mask.dtype == torch.bool:
            keep = attention_mask[..., :t]
        else:
            return sdpa()
        scale = scaling if scaling is not None else 1 / math.sqrt(query.shape[-1])
        out = _prefill_blocks(query, key, value, keep, scale)
        return (out, None) if out is not None else sdpa()
    b, h, _, d = query.shape
    kv = key.shape[1]
    scale = scaling if scaling is not None else 1 / math.sqrt(d)
    q = query.reshape(b, kv, h // kv, d)                 # head i uses kv head i // (h / kv), as repeat_kv
    scores = torch.matmul(q, key.transpose(2, 3)).float() * scale   # [B, KV, G, T]
    if attention_mask is not None:
        mask = attention_mask[..., -1:, : key.shape[2]]   # [B or 1, 1, 1, T]
        if mask.dtype == torch.bool:
            scores = scores.masked_fill(~mask, float("-inf"))
        else:
            scores = scores + mask.float()
    probs = scores.softmax(-1).to(value.dtype)
    out = torch.matmul(probs, value)                     # [B, KV, G, D]
    return out.reshape(b, h, 1, d).transpose(1, 2), None


def register() -> None:
    global _registered
    if _registered:
        return
    from transformers import AttentionInterface
    from transformers.masking_utils import (
        ALL_MASK_ATTENTION_FUNCTIONS,
        AttentionMaskInterface,
    )

    AttentionInterface.register(NAME, decode_attention)
    AttentionMaskInterface.register(NAME, ALL_MASK_ATTENTION_FUNCTIONS["sdpa"])
    _registered = True


def use_fast_attention(model: torch.nn.Module) -> bool:
    """Switch a model that runs "sdpa" attention to this decode path (in place); False if it runs
    another implementation, which is left alone."""
    configs = {id(m.config): m.config for m in model.modules() if hasattr(m, "config")}
    configs[id(model.config)] = model.config
    if any(c._attn_implementation not in (None, "sdpa", NAME) for c in configs.values()):
        return False
    register()
    for c in configs.values():
        c._attn_implementation = NAME
    return True
