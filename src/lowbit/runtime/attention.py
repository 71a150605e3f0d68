"""Decode attention for the CPU runtime: one query token per step against the cache.

torch's CPU flash-attention kernel (what transformers' "sdpa" runs) takes about 0.5 ms per layer
for a single query over a few hundred cached tokens of a 1.5B model, longer than that layer's
packed matrix products. A single query needs no tiling: with the query heads grouped by the
key/value head they share, scores are one small matmul per kv head (no repeat of the cache
across query heads), then a float32 softmax and a second matmul. Prefill (several query tokens)
and everything this path does not handle (logit soft-capping, dropout) go to "sdpa" unchanged.

    use_fast_attention(model)   # model.config._attn_implementation = "lowbit_sdpa"
"""

from __future__ import annotations

import math

import torch

NAME = "lowbit_sdpa"
_registered = False


def decode_attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling: float | None = None,
                     softcap: float | None = None, **kwargs):
    """transformers attention interface: query [B, H, q, D], key / value [B, KV, T, D] -> ([B, q, H, D], None)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if query.shape[2] != 1 or softcap is not None or (dropout and module.training):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
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
