"""The evicting cache layer: full-precision keys and values of the tokens a policy keeps
(streaming, H2O, SnapKV; the selection itself is algorithms/kv_eviction.py)."""

from __future__ import annotations

import torch
from transformers.cache_utils import DynamicLayer

from lowbit.algorithms import kv_eviction as ev
from lowbit.errors import ConfigError
from lowbit.runtime.kvcache.nbytes import tensor_bytes
from lowbit.runtime.kvcache.spec import EvictSpec


class EvictingLayer(DynamicLayer):
    """Full-precision keys and values of the kept tokens only, [B, H, kept, D], per head.

    mode "stream": evict down to the budget after every forward (perplexity: every token sees
    only what the policy kept). mode "prompt": keep everything until `compress()` (after the
    prompt's prefill, as kvpress does), then evict at every step for streaming / H2O; SnapKV
    compresses the prompt once and lets generated tokens accumulate.
    """

    wants_queries = True

    def __init__(self, spec: EvictSpec, mode: str = "stream"):
        super().__init__()
        if mode not in ("stream", "prompt"):
            raise ConfigError(f"eviction mode {mode!r}: use 'stream' or 'prompt'")
        self.spec, self.mode = spec, mode
        self.seen = 0
        self.acc: torch.Tensor | None = None            # H2O: attention received, [B, H, kept]
        self.window_probs: torch.Tensor | None = None   # SnapKV: last queries' attention, [B, H, w, kept]

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
            self.keys, self.values = key_states[..., :0, :], value_states[..., :0, :]
            self.acc = torch.zeros(*key_states.shape[:2], 0)
        self.keys = torch.cat([self.keys, key_states], dim=-2)
        self.values = torch.cat([self.values, value_states], dim=-2)
        self.acc = torch.cat([self.acc, torch.zeros(*key_states.shape[:2], key_states.shape[-2])], -1)
        self.seen += key_states.shape[-2]
        return self.keys, self.values

    def observe(self, query: torch.Tensor, keys: torch.Tensor, scaling: float) -> None:
        policy, q = self.spec.policy, query.shape[2]
        if policy == "h2o":
            self.acc += ev.attention_probs(query, keys, scaling).sum(2)
        elif policy == "snapkv":
            w = min(self.spec.window, q)
            self.window_probs = ev.attention_probs(query[:, :, q - w:], keys, scaling)
        if self.mode == "stream":
            self.evict(self.spec.tokens(self.seen))

    def compress(self) -> None:
        """Evict down to the budget now (after a prompt in "prompt" mode)."""
        if not self.is_initialized or self.keys.shape[-2] == 0:
            raise ConfigError("nothing to compress: the cache is empty; run the prompt through the model first")
        self.evict(self.spec.tokens(self.seen))
        if self.spec.policy != "snapkv":
            self.mode = "stream"

    def evict(self, budget: int) -> None:
        B, H, n, _ = self.keys.shape
        if n <= budget:
            return
        s = self.spec
        if s.policy == "streaming":
            idx = ev.streaming_keep(B, H, n, budget, s.sinks)
        elif s.policy == "h2o":
            idx = ev.h2o_keep(self.acc, budget, recent=budget // 2)
        else:
            if self.window_probs is None or self.window_probs.shape[-1] != n:
                raise ConfigError("SnapKV needs the attention of the last queries: run the forward inside "
                                  "lowbit.runtime.kvcache.observing(model, cache)")
            idx = ev.snapkv_keep(self.window_probs, budget, s.window, s.kernel)
        self.keys = ev.gather_tokens(self.keys, idx)
        self.values = ev.gather_tokens(self.values, idx)
        self.acc = self.acc.gather(2, idx)
        self.window_probs = None

    def get_seq_length(self) -> int:
        return self.seen

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        kept = self.keys.shape[-2] if self.is_initialized else 0
        return kept + query_length, self.seen - kept

    def reset(self) -> None:
        super().reset()
        self.seen, self.acc, self.window_probs = 0, None, None

    def nbytes(self) -> int:
        return tensor_bytes(self.keys, self.values) if self.is_initialized else 0
