"""Bytes a cache holds, counted from its tensors (codes, scales, minimums or zeros, indices,
full-precision parts), and what the uncompressed cache would take."""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache


def tensor_bytes(*ts: torch.Tensor) -> int:
    return sum(t.numel() * t.element_size() for t in ts)


def cache_nbytes(cache: Cache) -> int:
    """Bytes held by a cache's tensors (codes, scales, minimums or zeros, indices, full-precision parts)."""
    total = 0
    for layer in cache.layers:
        if hasattr(layer, "nbytes"):
            total += layer.nbytes()
            continue
        if getattr(layer, "is_initialized", False):
            total += tensor_bytes(layer.keys, layer.values)
        for packed in (getattr(layer, "_quantized_keys", None), getattr(layer, "_quantized_values", None)):
            total += _nested_bytes(packed)  # transformers' QuantizedLayer: (codes, meta dict)
    return total


def _nested_bytes(obj) -> int:
    if isinstance(obj, torch.Tensor):
        return tensor_bytes(obj)
    if isinstance(obj, dict):
        return sum(_nested_bytes(v) for v in obj.values())
    if isinstance(obj, (tuple, list)):
        return sum(_nested_bytes(v) for v in obj)
    return 0


def full_cache_nbytes(config, tokens: int, itemsize: int = 2) -> int:
    """Bytes of an uncompressed cache (bfloat16 by default) holding `tokens` tokens per layer."""
    cfg = config.get_text_config() if hasattr(config, "get_text_config") else config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    kv_heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
    return 2 * cfg.num_hidden_layers * kv_heads * head_dim * tokens * itemsize
