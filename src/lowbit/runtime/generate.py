"""Token generation with any cache lowbit builds (full, low-bit, evicting): chunked prefill,
then one token per step, greedy or sampled, streaming through a callback.

Sampling settings (repetition penalty, temperature, top-k, top-p) run as transformers' logits
processors, in that order; with none of them greedy decoding takes the argmax of the raw logits.
chat_prompt_ids() turns a user message into the ids an instruct model expects, through the
tokenizer's chat template.

The prompt is prefilled in chunks of `prefill_chunk` tokens; a cache with an eviction policy
keeps the whole prompt during prefill and is compressed once it is in (kvpress's convention),
then each new token attends to the compressed cache.

A full-precision StaticCache is allocated up front for the prompt and every new token, so its
length is checked first (check_static_length): no more than the model's context, and no more
bytes than this process may still take.
"""

from __future__ import annotations

import functools
import inspect
import itertools
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers.cache_utils import Cache, DynamicCache, StaticCache
from transformers.generation.logits_process import (
    LogitsProcessorList,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from lowbit.errors import ConfigError, ResourceError
from lowbit.runtime.decode import LeanDecoder, unsupported_reason
from lowbit.runtime.kvcache import compress, observing

log = logging.getLogger(__name__)


@dataclass
class Generation:
    prompt_tokens: int
    tokens: list[int] = field(default_factory=list)   # the new tokens
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0


def _device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


@functools.cache
def _cache_keyword(model_class: type) -> str:
    """The forward's name for the KV cache: `cache` since transformers 5.25 (where
    `past_key_values` still works but warns that it is deprecated), `past_key_values` before."""
    params = inspect.signature(model_class.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def cache_argument(model: torch.nn.Module, cache: Cache) -> dict[str, Cache]:
    """{keyword: cache} for model(...): the name this transformers version expects."""
    return {_cache_keyword(type(model)): cache}


def context_length(config: Any) -> int | None:
    """The model's context (max_position_embeddings), from its config or text config; None if
    it does not say."""
    for cfg in (config, getattr(config, "text_config", None)):
        n = getattr(cfg, "max_position_embeddings", None)
        if isinstance(n, int) and n > 0:
            return n
    return None


def static_cache_bytes(config: Any, length: int, dtype: torch.dtype) -> int:
    """Bytes of a full-precision StaticCache holding `length` tokens: keys and values of every
    layer, [kv_heads, length, head_dim] each (an upper bound for sliding-window layers)."""
    cfg = getattr(config, "text_config", None) or config
    heads = cfg.num_attention_heads
    kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    return 2 * cfg.num_hidden_layers * kv_heads * head_dim * length * torch.empty(0, dtype=dtype).element_size()


def _memory_room() -> int | None:
    """Bytes this process may still allocate: the memory available to it (lowbit.memory), and
    what is left under an address-space limit (ulimit -v), whichever is smaller."""
    import resource

    from lowbit.memory import available_bytes

    room = [available_bytes()]
    soft, _ = resource.getrlimit(resource.RLIMIT_AS)
    if soft != resource.RLIM_INFINITY:
        try:
            with open("/proc/self/statm") as f:
                size = int(f.read().split()[0]) * resource.getpagesize()
            room.append(max(0, soft - size))
        except (OSError, ValueError, IndexError):
            pass
    room = [r for r in room if r is not None]
    return min(room) if room else None


def check_static_length(config: Any, prompt_tokens: int, max_new_tokens: int, dtype: torch.dtype) -> None:
    """Refuse a StaticCache that cannot be used or cannot be allocated: the prompt plus the new
    tokens beyond the model's context, or more bytes than this process may still take."""
    ctx = context_length(config)
    if ctx is not None and prompt_tokens + max_new_tokens > ctx:
        if prompt_tokens >= ctx:
            raise ConfigError(f"the prompt is {prompt_tokens} tokens, which fills the model's context of {ctx} "
                              "tokens; shorten the prompt")
        raise ConfigError(f"--max-new-tokens {max_new_tokens}: after a {prompt_tokens}-token prompt the model's "
                          f"context of {ctx} tokens leaves room for {ctx - prompt_tokens} new tokens; "
                          f"ask for at most {ctx - prompt_tokens}")
    need = static_cache_bytes(config, prompt_tokens + max_new_tokens, dtype)
    room = _memory_room()
    if room is not None and need > room:
        raise ResourceError(f"the KV cache for {prompt_tokens} prompt + {max_new_tokens} new tokens needs "
                            f"{need / 1e9:.2f} GB, but only {room / 1e9:.2f} GB is available; lower "
                            "--max-new-tokens, shorten the prompt, or use a compressed cache (--kv int4)")


def warn_past_context(config: Any, prompt_tokens: int, max_new_tokens: int) -> None:
    """Say once when a run (with a cache that grows or evicts) goes past the model's context."""
    ctx = context_length(config)
    if ctx is None:
        return
    if prompt_tokens > ctx:
        log.warning("the prompt is %d tokens, longer than the model's context of %d: positions past %d were "
                    "never trained, so the output may be poor", prompt_tokens, ctx, ctx)
    elif prompt_tokens + max_new_tokens > ctx:
        log.warning("%d prompt + %d new tokens go past the model's context of %d; tokens after position %d "
                    "may be poor", prompt_tokens, max_new_tokens, ctx, ctx)


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
            out = model(input_ids=ids[a:b].unsqueeze(0), **cache_argument(model, cache), use_cache=True,
                        logits_to_keep=1)
    compress(cache)
    return out.logits[0, -1].float()


def has_chat_template(tokenizer: Any) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def chat_prompt_ids(tokenizer: Any, prompt: str, system: str | None = None) -> list[int]:
    """The ids of `prompt` as one user turn, after an optional system turn, rendered by the
    tokenizer's chat template and ending with the opening of the assistant's turn. The template
    writes its own special tokens (BOS included), so none are added when encoding."""
    messages = ([{"role": "system", "content": system}] if system is not None else [])
    messages.append({"role": "user", "content": prompt})
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def logits_processors(temperature: float = 0.0, top_k: int | None = None, top_p: float = 1.0,
                      repetition_penalty: float | None = None) -> LogitsProcessorList:
    """What runs on the logits before a token is picked; empty for plain greedy decoding.
    top_k and top_p shape sampling only (greedy already keeps the top token)."""
    procs = LogitsProcessorList()
    if repetition_penalty is not None and repetition_penalty != 1.0:
        procs.append(RepetitionPenaltyLogitsProcessor(repetition_penalty))
    if temperature > 0:
        if temperature != 1.0:
            procs.append(TemperatureLogitsWarper(temperature))
        if top_k is not None and top_k > 0:
            procs.append(TopKLogitsWarper(top_k))
        if top_p < 1:
            procs.append(TopPLogitsWarper(top_p))
    return procs


def _pick(logits: torch.Tensor, seen: list[int], procs: LogitsProcessorList, sample: bool,
          gen: torch.Generator) -> int:
    """The next token from logits [vocab]; `seen` holds the prompt and the new tokens so far."""
    if procs:
        ids = torch.tensor([seen], device=logits.device)  # [1, T]
        logits = procs(ids, logits.unsqueeze(0))[0]  # [1, vocab] -> [vocab]
    if not sample:
        return int(logits.argmax())
    return int(torch.multinomial(logits.softmax(-1).cpu(), 1, generator=gen))


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
    top_k: int | None = None,
    repetition_penalty: float | None = None,
    stop: Callable[[list[int]], bool] | None = None,
) -> Generation:
    """Greedy (temperature 0) or sampled continuation of prompt_ids [T]; `cache` None uses a
    full-precision cache: a DynamicCache, or with `static` a StaticCache allocated once for the
    prompt and every new token (no per-step growth; refused by check_static_length when it would
    pass the model's context or not fit in memory; other caches past the context are warned about).
    `on_token` sees each new token as it is chosen; `stop` sees the new tokens so far after each
    one and ends generation when it returns True (stop strings: the caller decodes). Sampling
    settings: see logits_processors().
    With a StaticCache, decode steps run runtime/decode.py's LeanDecoder where it covers the model
    (less per-step overhead; logits bit-identical to the transformers forward, or equal to
    bfloat16 rounding where its native loop runs); `lean=False` keeps the transformers forward."""
    import time

    if max_new_tokens < 0:
        raise ConfigError(f"max_new_tokens {max_new_tokens}: use 0 or more")
    if static and cache is not None:
        raise ConfigError("static=True builds its own full-precision cache; pass either a cache or static")
    n_prompt = int(prompt_ids.numel())
    if static:
        check_static_length(model.config, n_prompt, max_new_tokens, next(model.parameters()).dtype)
    else:
        warn_past_context(model.config, n_prompt, max_new_tokens)
    if cache is None:
        cache = StaticCache(model.config, max_cache_len=n_prompt + max_new_tokens) if static else DynamicCache()
    gen = torch.Generator().manual_seed(seed)
    procs = logits_processors(temperature, top_k, top_p, repetition_penalty)
    t0 = time.perf_counter()
    logits = prefill(model, prompt_ids, cache, prefill_chunk)
    result = Generation(prompt_tokens=int(prompt_ids.numel()), prefill_seconds=time.perf_counter() - t0)
    t0 = time.perf_counter()
    device = _device(model)
    seen = prompt_ids.reshape(-1).tolist() if procs else []  # what the repetition penalty looks back on
    decoder = None
    if lean and device.type == "cpu" and unsupported_reason(model, cache) is None:
        decoder = LeanDecoder(model, cache)
    with observing(model, cache):
        for step in range(max_new_tokens):
            tok = _pick(logits, seen, procs, temperature > 0, gen)
            if procs:
                seen.append(tok)
            result.tokens.append(tok)
            if on_token is not None:
                on_token(tok)
            if ((stop_ids and tok in stop_ids) or step == max_new_tokens - 1
                    or (stop is not None and stop(result.tokens))):
                break
            if decoder is not None:
                logits = decoder.step(tok, result.prompt_tokens + step)
                continue
            out = model(input_ids=torch.tensor([[tok]], device=device), **cache_argument(model, cache),
                        use_cache=True)
            logits = out.logits[0, -1].float()
    result.decode_seconds = time.perf_counter() - t0
    return result
