"""observing(model, cache): transformers' attention wrapped so that cache layers that need
attention scores see each layer's queries, and layers that read their packed blocks do decode
attention themselves (see lowbit.runtime.kvcache)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from transformers.cache_utils import Cache

from lowbit.errors import ConfigError


def _observing_attention(module, query, key, value, attention_mask, **kwargs):
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
    from transformers.models.llama.modeling_llama import (
        eager_attention_forward,  # the plain softmax(QK^T)V
    )

    layer = getattr(module, "_lowbit_kv", None)
    if getattr(layer, "fused", False) and query.shape[2] == 1:
        scaling = kwargs.get("scaling") or module.scaling
        return layer.attend(query, key, value, scaling, attention_mask), None
    inner = module._lowbit_attn
    fn = ALL_ATTENTION_FUNCTIONS[inner] if inner != "eager" else eager_attention_forward
    out = fn(module, query, key, value, attention_mask, **kwargs)
    if layer is not None and getattr(layer, "wants_queries", False):
        scaling = kwargs.get("scaling") or module.scaling
        layer.observe(query, key, scaling)
    return out


_REGISTERED = False


def _register() -> None:
    global _REGISTERED
    if _REGISTERED:
        return
    from transformers import AttentionInterface
    from transformers.masking_utils import (
        ALL_MASK_ATTENTION_FUNCTIONS,
        AttentionMaskInterface,
    )

    AttentionInterface.register("lowbit_observe", _observing_attention)
    AttentionMaskInterface.register("lowbit_observe", ALL_MASK_ATTENTION_FUNCTIONS["sdpa"])
    _REGISTERED = True


def _attention_modules(model: torch.nn.Module) -> Iterator[torch.nn.Module]:
    for m in model.modules():
        if hasattr(m, "layer_idx") and hasattr(m, "q_proj") and hasattr(m, "k_proj"):
            yield m


@contextmanager
def observing(model: torch.nn.Module, cache: Cache | None) -> Iterator[None]:
    """Let cache layers that need attention scores see each layer's queries, and let layers that
    can read their packed blocks do decode attention themselves (see module docstring). A no-op
    for caches that need neither."""
    if cache is None or not any(getattr(layer, "wants_queries", False) or getattr(layer, "reads_codes", False)
                                for layer in cache.layers):
        yield
        return
    _register()
    modules = list(_attention_modules(model))
    configs = {id(m.config): m.config for m in modules}
    configs[id(model.config)] = model.config
    saved = {k: c._attn_implementation for k, c in configs.items()}
    for m in modules:
        impl = saved[id(m.config)] or "sdpa"
        if impl not in ("sdpa", "eager", "lowbit_sdpa"):
            raise ConfigError(f"attention {impl!r}: compressed caches with scores need 'sdpa' or 'eager' attention")
        m._lowbit_attn, m._lowbit_kv = impl, cache.layers[m.layer_idx]
    fused = [layer for layer in cache.layers if getattr(layer, "reads_codes", False)]
    for layer in fused:
        layer.fused = True
    try:
        for c in configs.values():
            c._attn_implementation = "lowbit_observe"
        yield
    finally:
        for k, c in configs.items():
            c._attn_implementation = saved[k]
        for m in modules:
            del m._lowbit_attn, m._lowbit_kv
        for layer in fused:
            layer.fused = False
