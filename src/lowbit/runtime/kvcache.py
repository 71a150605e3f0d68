"""Compressed KV caches that plug into transformers' Cache (so HF generation and lowbit's own
loops use them unchanged).

KIVI-style low-bit cache (formats/kv.py): keys per channel in blocks of `block` tokens, values
per token in groups of `value_group` channels; the most recent `window` tokens (plus any
incomplete block) stay in full precision. Tokens being processed attend to themselves in full precision and to every
earlier token through the cache, so a chunked forward measures exactly what decoding with this
cache would see.

    cache = kv_cache_for(model.config, "kivi2")
    model(ids, past_key_values=cache, use_cache=True)
    cache_nbytes(cache)       # bytes actually held, scales and zeros included
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from transformers.cache_utils import Cache, DynamicLayer

from lowbit.errors import ConfigError
from lowbit.formats import kv


@dataclass(frozen=True)
class KVSpec:
    """What a --kv name means."""

    bits: int
    block: int = 32          # tokens per key block
    value_group: int = 32    # channels per value group
    window: int = 128        # most recent tokens kept in full precision (KIVI's residual)

    @classmethod
    def parse(cls, name: str) -> "KVSpec":
        m = re.fullmatch(r"(?:int|kivi)([248])(?:-b(\d+))?(?:-w(\d+))?", name)
        if not m:
            raise ConfigError(f"--kv {name!r}: use int8, int4, int2 or kivi<bits> (e.g. kivi2), optionally "
                              "with -b<block> (tokens per key block) and -w<window> (recent tokens kept in full "
                              "precision), e.g. kivi2-b32-w128")
        block = int(m.group(2) or 32)
        window = int(m.group(3) or 128)
        if block < 1:
            raise ConfigError(f"--kv {name!r}: the block must be >= 1 token")
        return cls(int(m.group(1)), block, window=window)


class KIVILayer(DynamicLayer):
    """One attention layer's cache: quantized blocks plus a full-precision residual (self.keys/values)."""

    def __init__(self, spec: KVSpec):
        super().__init__()
        self.spec = spec
        self.qkeys: kv.KVBlocks | None = None
        self.qvalues: kv.KVBlocks | None = None
        self.n_quantized = 0

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        super().lazy_initialization(key_states, value_states)
        self.batch, self.heads = key_states.shape[0], key_states.shape[1]
        self.keys = key_states[..., :0, :]
        self.values = value_states[..., :0, :]

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        old_k, old_v = self.dequantized()
        keys = torch.cat([old_k, self.keys, key_states], dim=-2)
        values = torch.cat([old_v, self.values, value_states], dim=-2)
        # store: complete blocks of the residual are quantized, the rest stays as it is
        res_k = torch.cat([self.keys, key_states], dim=-2)
        res_v = torch.cat([self.values, value_states], dim=-2)
        full = max(0, res_k.shape[-2] - self.spec.window) // self.spec.block * self.spec.block
        if full:
            qk = kv.quantize_keys(res_k[..., :full, :], self.spec.bits, self.spec.block)
            qv = kv.quantize_values(res_v[..., :full, :], self.spec.bits, self.spec.value_group)
            self.qkeys = qk if self.qkeys is None else self.qkeys.append(qk)
            self.qvalues = qv if self.qvalues is None else self.qvalues.append(qv)
            self.n_quantized += full
        self.keys = res_k[..., full:, :].clone()
        self.values = res_v[..., full:, :].clone()
        return keys, values

    def dequantized(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The quantized part of the cache as [B, H, n_quantized, D] tensors."""
        if self.qkeys is None:
            return self.keys[..., :0, :], self.values[..., :0, :]
        return (kv.dequantize_keys(self.qkeys, self.batch, self.heads, self.dtype),
                kv.dequantize_values(self.qvalues, self.batch, self.heads, self.dtype))

    def get_seq_length(self) -> int:
        if not self.is_initialized:
            return 0
        return self.n_quantized + self.keys.shape[-2]

    def reset(self) -> None:
        super().reset()
        self.qkeys = self.qvalues = None
        self.n_quantized = 0

    def nbytes(self) -> int:
        held = 0 if self.qkeys is None else self.qkeys.nbytes() + self.qvalues.nbytes()
        if self.is_initialized:
            held += self.keys.numel() * self.keys.element_size() + self.values.numel() * self.values.element_size()
        return held


def kv_cache_for(config, name: str | None) -> Cache | None:
    """A Cache for `config`'s decoder (None or 'none'/'full': None, i.e. the model's default)."""
    if name in (None, "none", "full"):
        return None
    spec = KVSpec.parse(name)
    cfg = config.get_text_config() if hasattr(config, "get_text_config") else config
    return Cache(layers=[KIVILayer(spec) for _ in range(cfg.num_hidden_layers)])


def cache_nbytes(cache: Cache) -> int:
    """Bytes held by a cache's tensors (codes, scales, zeros and full-precision parts)."""
    total = 0
    for layer in cache.layers:
        if isinstance(layer, KIVILayer):
            total += layer.nbytes()
        elif getattr(layer, "is_initialized", False):
            total += sum(t.numel() * t.element_size() for t in (layer.keys, layer.values))
    return total


def full_cache_nbytes(config, tokens: int, itemsize: int = 2) -> int:
    """Bytes of an uncompressed cache (bfloat16 by default) holding `tokens` tokens per layer."""
    cfg = config.get_text_config() if hasattr(config, "get_text_config") else config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    kv_heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
    return 2 * cfg.num_hidden_layers * kv_heads * head_dim * tokens * itemsize
