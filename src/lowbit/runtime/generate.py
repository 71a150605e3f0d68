"""Token generation with any cache lowbit builds (full, low-bit, evicting): chunked prefill,
then one token per step, greedy or sampled, streaming through a callback.

The prompt is prefilled in chunks of `prefill_chunk` tokens; a cache with an eviction policy
keeps the whole prompt during prefill and is compressed once it is in (kvpress's convention),
then each new token attends to the compressed cache.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from transformers.cache_utils import Cache, DynamicCache, StaticCache

from lowbit.errors import ConfigError
from lowbit.runtime.decode import LeanDecoder, unsupported_reason
from lowbit.runtime.kvcache import compress, observing


@dataclass
class Generation:
    prompt_tokens: int
    tokens: list[int] = field(default_factory=list)   # the new tokens
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0


def _device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


@torch.inference_mode()
def prefill(model: torch.nn.Module, ids: torch.Tensor, cache: Cache, chunk: int = 512) -> torch.Tensor:
    """Run prompt ids [T] through the model in chunks; returns the last position's logits [vocab]."""
    if ids.numel() == 0:
        raise ConfigError("the prompt is empty: give at least one token")
    if chunk < 1:
        raise ConfigError(f"prefill chunk {chunk}: use at least 1 token")
    ids = ids.to(_device(model))
    starts = list(range(0, ids.shape[0], chunk))
    if len(starts) > 1 and ids.shape[0] - starts[-1] < min(chunk, 64):
        starts.pop()  # a short tail joins the previous chunk (SnapKV's window lies in the last one)
    bounds = starts + [ids.shape[0]]
    with observing(model, cache):
        for a, b in itertools.pairwise(bounds):
            out = model(input_ids=ids[a:b].unsqueeze(0), past_key_values=cache, use_cache=True, logits_to_keep=1)
    compress(cache)
    return out.logits[0, -1].float()


def _pick(logits: torch.Tensor, temperature: float, top_p: float, gen: torch.Generator | None) -> int:
    if temperature <= 0:
        return int(logits.argmax())
    probs = (logits / temperature).softmax(-1)
    if top_p < 1:
        sorted_p, order = probs.sort(descending=True)
        keep = sorted_p.cumsum(0) - sorted_p < top_p
        probs = torch.zeros_like(probs).scatter(0, order[keep], sorted_p[keep])
    return int(torch.multinomial(probs.cpu(), 1, generator=gen))


@torch.inference_mode()
def generate(
    model: torch.nn.Module,
    prompt_ids: torch.Tensor,
    max_new_tokens: int,
    cache: Cache | None = None,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int = 0,
    prefill_chunk: int = 512,
    stop_ids: set[int] | None = None,
    on_token: Callable[[int], None] | None = None,
    static: bool = False,
    lean: bool = True,
) -> Generation:
    """Greedy (temperature 0) or sampled continuation of prompt_ids [T]; `cache` None uses a
    full-precision cache: a DynamicCache, or with `static` a StaticCache allocated once for the
    prompt and every new token (no per-step growth). `on_token` sees each new token as it is chosen.
    With a StaticCache, decode steps run runtime/decode.py's LeanDecoder where it covers the model
    (less per-step overhead; logits bit-identical to the transformers forward, or equal to
    bfloat16 rounding where its native loop runs); `lean=False` keeps the transformers forward."""
    import time

    if max_new_tokens < 0:
        raise ConfigError(f"max_new_tokens {max_new_tokens}: use 0 or more")
    if static and cache is not None:
        raise ConfigError("static=True builds its own full-precision cache; pass either a cache or static")
    if cache is None:
        cache = (StaticCache(model.config, max_cache_len=int(prompt_ids.numel()) + max_new_tokens) if static
                 else DynamicCache())
    gen = torch.Generator().manual_seed(seed)
    t0 = time.perf_counter()
    logits = prefill(model, prompt_ids, cache, prefill_chunk)
    result = Generation(prompt_tokens=int(prompt_ids.numel()), prefill_seconds=time.perf_counter() - t0)
    t0 = time.perf_counter()
    device = _device(model)
    decoder = None
    if lean and device.type == "cpu" and unsupported_reason(model, cache) is None:
        decoder = LeanDecoder(model, cache)
    with observing(model, cache):
        for step in range(max_new_tokens):
            tok = _pick(logits, temperature, top_p, gen)
            result.tokens.append(tok)
            if on_token is not None:
                on_token(tok)
            if (stop_ids and tok in stop_ids) or step == max_new_tokens - 1:
                break
            if decoder is not None:
                logits = decoder.step(tok, result.prompt_tokens + step)
                continue
            out = model(input_ids=torch.tensor([[tok]], device=device), past_key_values=cache, use_cache=True)
            logits = out.logits[0, -1].float()
    result.decode_seconds = time.perf_counter() - t0
    return result
