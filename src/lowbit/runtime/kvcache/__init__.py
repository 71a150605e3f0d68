"""Compressed KV caches that plug into transformers' Cache, so HF generation and lowbit's own
loops use them unchanged, with any weight recipe.

Low-bit caches (a name for --kv):
- ``kivi<b>`` / ``int<b>`` (KIVI): keys per channel in blocks of `block` tokens, values per token
  in groups of `value_group` channels (formats/kv.py).
- ``zipcache`` (ZipCache's saliency): in each head, the `salient` fraction of a flushed block's
  tokens with the highest normalized attention (measured with a few probe queries) get `hi` bits,
  the rest `lo` bits; keys per channel within each of the two sets (the paper quantizes keys
  token-wise after a channel normalizer, which lost to per-channel KIVI at equal bytes here, see
  BENCHMARKS.md), values per token.
- ``gear<b>`` (GEAR): KIVI at b bits after removing the largest `outliers` fraction of entries
  (kept sparse in float16), plus a rank-`rank` SVD of what quantization left behind.
In all three the most recent `window` tokens (and any incomplete block) stay in full precision;
ZipCache compresses after the chunk's attention, so that its rows have been scored.

Eviction under a budget (--kv-policy, --kv-budget): ``streaming`` (sinks + recent), ``h2o``
(heavy hitters + recent), ``snapkv`` (observation-window votes); algorithms/kv_eviction.py.

How a forward sees the cache: the tokens being processed attend to themselves in full precision
and to every earlier token only through the compressed cache, so a chunked forward measures what
decoding with this cache would see. Policies and ZipCache need attention scores that fused
attention does not return: inside `observing(model, cache)` the attention function is wrapped,
and after each layer's attention the cache layer recomputes the probabilities it needs from the
queries (all of them for H2O, the last `window` for SnapKV, a few probes for ZipCache). Eviction
happens after that attention, so a chunk's own tokens were attended before any are dropped.

    cache = kv_cache_for(model.config, parse_cache("kivi2"))   # a name works too: kv_cache_for(config, "kivi2")
    with observing(model, cache):
        model(ids, past_key_values=cache, use_cache=True)
    cache_nbytes(cache)       # bytes actually held, scales, minimums and indices included

Eviction keeps each token's original position (no re-rotation) and Gemma 3's sliding-window
layers get the global mask offsets: exact for Llama / Qwen2, approximate for sliding layers.

Files: spec.py (the --kv grammar, parsed once into CacheSpec and its typed parts), layers.py (the
low-bit layers), eviction.py (the evicting layer), observe.py (observing), build.py (kv_cache_for,
compress), nbytes.py (byte counting). The names below are the package's API.
"""

from lowbit.runtime.kvcache.build import compress, kv_cache_for
from lowbit.runtime.kvcache.nbytes import cache_nbytes, full_cache_nbytes
from lowbit.runtime.kvcache.observe import observing
from lowbit.runtime.kvcache.spec import (
    KV_HELP,
    POLICIES,
    CacheSpec,
    cache_choice,
    parse_cache,
    parse_kv,
    parse_policy,
)

__all__ = [
    "KV_HELP", "POLICIES", "CacheSpec", "cache_choice", "cache_nbytes", "compress", "full_cache_nbytes",
    "kv_cache_for", "observing", "parse_cache", "parse_kv", "parse_policy",
]
