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

    cache = kv_cache_for(model.config, "kivi2")
    with observing(model, cache):
        model(ids, past_key_values=cache, use_cache=True)
    cache_nbytes(cache)       # bytes actually held, scales, minimums and indices included

Eviction keeps each token's original position (no re-rotation) and Gemma 3's sliding-window
layers get the global mask offsets: exact for Llama / Qwen2, approximate for sliding layers.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from transformers.cache_utils import Cache, DynamicLayer

from lowbit.algorithms import kv_eviction as ev
from lowbit.errors import ConfigError
from lowbit.formats import kv

# --- what the names mean ------------------------------------------------------------------------


@dataclass(frozen=True)
class KVSpec:
    """KIVI: ``kivi<bits>[-b<block>][-g<value_group>][-w<window>]`` (``int<bits>`` is the same)."""

    bits: int
    block: int = 32          # tokens per key block
    value_group: int = 32    # channels per value group
    window: int = 128        # most recent tokens kept in full precision (KIVI's residual)
    sinks: int = 0           # first tokens kept in full precision (attention sinks; not in KIVI)
    clip: int = 0            # 1: search each group's range for the least squared error (not in KIVI)

    @classmethod
    def parse(cls, name: str) -> KVSpec:
        spec = parse_kv(name)
        if not isinstance(spec, KVSpec):
            raise ConfigError(f"--kv {name!r} is not a KIVI cache name")
        return spec


@dataclass(frozen=True)
class ZipSpec:
    """ZipCache: ``zipcache[-h<hi>][-l<lo>][-r<salient>][-p<probes>][-b<block>][-w<window>]``."""

    hi: int = 4              # bits of salient rows
    lo: int = 2              # bits of the others
    salient: float = 0.3     # fraction of each head's tokens kept at `hi` bits
    probes: float = 0.1      # fraction of each chunk's queries used as probes (half recent, half random)
    block: int = 64          # tokens per flushed block (keys: one scale per channel per set per block)
    value_group: int = 32    # channels per group of a row
    window: int = 128
    sinks: int = 0
    clip: int = 0


@dataclass(frozen=True)
class GearSpec:
    """GEAR: ``gear<bits>[-r<rank>][-s<outlier fraction>][-b<block>][-w<window>]``."""

    bits: int
    rank: int = 2            # rank of the residual's approximation, per head and block
    outliers: float = 0.01   # fraction of entries kept exactly (sparse, float16)
    block: int = 128         # tokens per flushed block (the low-rank span); keys in sub-blocks of 32
    value_group: int = 32
    window: int = 128
    sinks: int = 0
    clip: int = 0


@dataclass(frozen=True)
class EvictSpec:
    """Eviction: policy streaming | h2o | snapkv; budget a fraction (< 1) or a token count (>= 1)."""

    policy: str
    budget: float
    sinks: int = 4           # StreamingLLM's attention sinks
    window: int = 32         # SnapKV's observation window
    kernel: int = 7          # SnapKV's pooling kernel

    def tokens(self, seen: int) -> int:
        """How many tokens to keep after `seen` tokens."""
        if self.budget < 1:
            return max(1, math.ceil(self.budget * seen))
        return int(self.budget)


@dataclass(frozen=True)
class HFQuantizedSpec:
    """transformers' own QuantizedCache (the peer): ``hf-hqq<bits>``, HQQ backend, groups of 64,
    residual 128 tokens, as its documentation sets it up (axis 1 for keys and values)."""

    bits: int
    group_size: int = 64
    residual: int = 128


POLICIES = ("streaming", "h2o", "snapkv")

_OPTIONS = {  # option letter -> field, per kind
    "kivi": {"b": "block", "g": "value_group", "w": "window", "a": "sinks", "c": "clip"},
    "zipcache": {"h": "hi", "l": "lo", "r": "salient", "p": "probes", "b": "block", "w": "window", "a": "sinks",
                 "c": "clip"},
    "gear": {"r": "rank", "s": "outliers", "b": "block", "w": "window", "a": "sinks", "c": "clip"},
}
KV_HELP = ("int8|int4|int3|int2 or kivi<bits> (KIVI; options -b<block> -g<value group> -w<window> "
           "-a<attention sinks kept in full precision> -c1 (clipping search)), "
           "zipcache (-h<hi bits> -l<lo bits> -r<salient fraction> -p<probe fraction> -b -w -a -c), "
           "gear<bits> (-r<rank> -s<outlier fraction> -b -w -a -c), or hf-hqq<bits> (transformers' QuantizedCache, "
           "the peer); e.g. kivi2-w128, kivi2-a4-c1, zipcache-h4-l2-r0.3, gear2-r4")


def parse_kv(name: str) -> KVSpec | ZipSpec | GearSpec | HFQuantizedSpec:
    """A --kv name -> its spec; ConfigError naming the problem otherwise."""
    if name.startswith("hf-"):
        m = re.fullmatch(r"hf-hqq([1-48])", name)
        if not m or m.group(1) not in ("1", "2", "3", "4", "8"):
            raise ConfigError(f"--kv {name!r}: transformers' quantized cache is hf-hqq<bits> with bits 1, 2, 3, 4 or 8")
        return HFQuantizedSpec(int(m.group(1)))
    head, *opts = name.split("-")
    m = re.fullmatch(r"(int|kivi|gear)(\d)|(zipcache)", head)
    if not m:
        raise ConfigError(f"--kv {name!r}: unknown cache; use {KV_HELP}")
    kind = "zipcache" if m.group(3) else ("gear" if m.group(1) == "gear" else "kivi")
    values: dict = {}
    if kind != "zipcache":
        values["bits"] = int(m.group(2))
    for opt in opts:
        key, val = opt[:1], opt[1:]
        field_name = _OPTIONS[kind].get(key)
        if field_name is None or not re.fullmatch(r"\d+(\.\d+)?", val):
            raise ConfigError(f"--kv {name!r}: bad option {opt!r}; {kind} takes "
                              + ", ".join(f"-{k}<{f}>" for k, f in _OPTIONS[kind].items()))
        values[field_name] = float(val) if field_name in ("salient", "probes", "outliers") else int(float(val))
    cls = {"kivi": KVSpec, "zipcache": ZipSpec, "gear": GearSpec}[kind]
    spec = cls(**values)
    _validate(name, spec)
    return spec


def _validate(name: str, spec) -> None:
    for bits_field in ("bits", "hi", "lo"):
        b = getattr(spec, bits_field, None)
        if b is not None and b not in (2, 3, 4, 8):
            raise ConfigError(f"--kv {name!r}: {b}-bit caches are not supported; use 2, 3, 4 or 8 bits")
    if spec.block < 1 or spec.window < 0 or spec.value_group < 1 or spec.sinks < 0:
        raise ConfigError(f"--kv {name!r}: the block and group must be >= 1, the window and sinks >= 0")
    if spec.clip not in (0, 1):
        raise ConfigError(f"--kv {name!r}: -c is 0 (min/max ranges) or 1 (clipping search)")
    if isinstance(spec, ZipSpec):
        if spec.hi < spec.lo:
            raise ConfigError(f"--kv {name!r}: salient rows need at least as many bits as the others")
        if not (0 <= spec.salient <= 1 and 0 < spec.probes <= 1):
            raise ConfigError(f"--kv {name!r}: the salient fraction must be in [0, 1] and probes in (0, 1]")
    if isinstance(spec, GearSpec):
        if spec.block % 32:
            raise ConfigError(f"--kv {name!r}: GEAR's block must be a multiple of 32 tokens (its key sub-blocks)")
        if not 0 <= spec.outliers < 0.5 or spec.rank < 0:
            raise ConfigError(f"--kv {name!r}: the outlier fraction must be in [0, 0.5) and the rank >= 0")


def parse_policy(policy: str, budget: float | str | None, **options) -> EvictSpec:
    """--kv-policy and --kv-budget -> EvictSpec (a budget < 1 is a fraction, >= 1 a token count)."""
    if policy not in POLICIES:
        raise ConfigError(f"--kv-policy {policy!r}: use one of {', '.join(POLICIES)}")
    if budget is None:
        raise ConfigError(f"--kv-policy {policy} needs --kv-budget: a fraction of the tokens (0.2) or a count (512)")
    try:
        b = float(budget)
    except ValueError:
        raise ConfigError(f"--kv-budget {budget!r}: give a fraction in (0, 1) or a whole number of tokens") from None
    if b <= 0 or (b >= 1 and b != int(b)):
        raise ConfigError(f"--kv-budget {budget!r}: give a fraction in (0, 1) or a whole number of tokens >= 1")
    return EvictSpec(policy, b, **options)


# --- low-bit layers ------------------------------------------------------------------------------


class _LowBitLayer(DynamicLayer):
    """A full-precision residual (self.keys / values) in front of compressed blocks.

    Subclasses say how a block of `unit` tokens is stored (`_flush`), read back (`_restored`) and
    counted (`_stored_nbytes`).
    """

    wants_queries = False
    reads_codes = False      # can decode attention read the packed blocks directly (attend())

    def __init__(self, spec):
        super().__init__()
        self.spec = spec
        self.n_quantized = 0
        self.fused = False   # set inside observing(): one-token updates return only the residual

    @property
    def unit(self) -> int:
        return self.spec.block

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        super().lazy_initialization(key_states, value_states)
        self.dtype = key_states.dtype  # set here: transformers 5.24's DynamicLayer no longer keeps it
        self.batch, self.heads = key_states.shape[0], key_states.shape[1]
        self.keys = key_states[..., :0, :]
        self.values = value_states[..., :0, :]
        self.sink_keys, self.sink_values = self.keys, self.values   # the first `sinks` tokens, exact

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        if self.fused and key_states.shape[-2] == 1:
            # decode inside observing(): the attention function calls attend(), which reads the
            # compressed blocks itself (and flushes after, as below), so only the full-precision
            # residual is handed back
            self.keys = torch.cat([self.keys, key_states], dim=-2)
            self.values = torch.cat([self.values, value_states], dim=-2)
            self._appended(1)
            return self.keys, self.values
        old_k, old_v = self.dequantized()
        keys = torch.cat([self.sink_keys, old_k, self.keys, key_states], dim=-2)
        values = torch.cat([self.sink_values, old_v, self.values, value_states], dim=-2)
        self.keys = torch.cat([self.keys, key_states], dim=-2)
        self.values = torch.cat([self.values, value_states], dim=-2)
        self._appended(key_states.shape[-2])
        if not self.wants_queries:
            self._flush_residual()
        return keys, values

    def _flush_residual(self) -> None:
        """Compress the complete blocks of the residual beyond the window; keep the rest as it is.
        Before the first flush the residual starts at token 0: its first `sinks` tokens move to the
        exact sink store instead."""
        need = self.spec.sinks - self.sink_keys.shape[-2]
        if need > 0 and self.n_quantized == 0 and self.keys.shape[-2] > self.spec.window:
            take = min(need, self.keys.shape[-2] - self.spec.window)
            self.sink_keys = torch.cat([self.sink_keys, self.keys[..., :take, :]], -2)
            self.sink_values = torch.cat([self.sink_values, self.values[..., :take, :]], -2)
            self.keys, self.values = self.keys[..., take:, :].clone(), self.values[..., take:, :].clone()
            self._dropped_front(take)
        full = max(0, self.keys.shape[-2] - self.spec.window) // self.unit * self.unit
        if full:
            self._flush(self.keys[..., :full, :], self.values[..., :full, :])
            self.n_quantized += full
            self.keys = self.keys[..., full:, :].clone()
            self.values = self.values[..., full:, :].clone()

    def _appended(self, n: int) -> None:
        """n new tokens joined the residual."""

    def _dropped_front(self, n: int) -> None:
        """The first n tokens of the residual moved to the sink store."""

    def dequantized(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The compressed part of the cache as [B, H, n_quantized, D] tensors."""
        if self.n_quantized == 0:
            return self.keys[..., :0, :], self.values[..., :0, :]
        return self._restored()

    def get_seq_length(self) -> int:
        if not self.is_initialized:
            return 0
        return self.sink_keys.shape[-2] + self.n_quantized + self.keys.shape[-2]

    def reset(self) -> None:
        super().reset()
        self.n_quantized = 0

    def nbytes(self) -> int:
        held = self._stored_nbytes() if self.n_quantized else 0
        if self.is_initialized:
            held += _tensor_bytes(self.keys, self.values, self.sink_keys, self.sink_values)
        return held


class KIVILayer(_LowBitLayer):
    """KIVI: per-channel key blocks and per-token value groups, appended as the cache grows.

    Decode steps inside observing() read the packed blocks in a native kernel (attend) instead of
    dequantizing the whole cache every step."""

    reads_codes = True

    def __init__(self, spec: KVSpec):
        super().__init__(spec)
        self.qkeys: kv.KVBlocks | None = None
        self.qvalues: kv.KVBlocks | None = None

    def attend(self, query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, scaling: float,
               mask: torch.Tensor | None) -> torch.Tensor:
        """One decode query against the packed blocks plus `keys`/`values` (the residual that
        update returned). [B, 1, Hq, D]."""
        from lowbit.runtime.kv_attention import kivi_decode_attention

        s = self.sink_keys.shape[-2]
        if s:  # exact sinks join the residual; the mask's columns follow (time order is sinks first)
            keys, values = torch.cat([self.sink_keys, keys], -2), torch.cat([self.sink_values, values], -2)
            if mask is not None:
                mask = torch.cat([mask[..., s:s + self.n_quantized], mask[..., :s], mask[..., s + self.n_quantized:]], -1)
        out = kivi_decode_attention(query, self.qkeys, self.qvalues, keys, values, scaling, mask)
        self._flush_residual()
        return out

    def _flush(self, k: torch.Tensor, v: torch.Tensor) -> None:
        clip = bool(self.spec.clip)
        qk = kv.quantize_keys(k, self.spec.bits, self.spec.block, clip)
        qv = kv.quantize_values(v, self.spec.bits, self.spec.value_group, clip)
        self.qkeys = qk if self.qkeys is None else self.qkeys.append(qk)
        self.qvalues = qv if self.qvalues is None else self.qvalues.append(qv)

    def _restored(self):
        return (kv.dequantize_keys(self.qkeys, self.batch, self.heads, self.dtype),
                kv.dequantize_values(self.qvalues, self.batch, self.heads, self.dtype))

    def _stored_nbytes(self) -> int:
        return self.qkeys.nbytes() + self.qvalues.nbytes()

    def reset(self) -> None:
        super().reset()
        self.qkeys = self.qvalues = None


class GearLayer(_LowBitLayer):
    """GEAR on top of KIVI: outliers out, quantize, low-rank of the residual, per flushed block."""

    KEY_BLOCK = 32

    def __init__(self, spec: GearSpec):
        super().__init__(spec)
        self.blocks: list[tuple] = []

    def _compress(self, x: torch.Tensor, quantize, dequantize):
        B, H, T, D = x.shape
        mats = x.float().reshape(B * H, T, D)
        rest, idx, val = kv.split_outliers(mats, self.spec.outliers)
        q = quantize(rest.reshape(B, H, T, D))
        deq = dequantize(q, B, H, torch.float32).reshape(B * H, T, D)
        if self.spec.rank:
            left, right = kv.lowrank(rest - deq, self.spec.rank)
        else:
            left, right = (torch.zeros(B * H, T, 0, dtype=kv.affine.SCALE_DTYPE),
                           torch.zeros(B * H, D, 0, dtype=kv.affine.SCALE_DTYPE))
        return q, kv.Residual(idx, val, left, right)

    def _flush(self, k, v):
        bits = self.spec.bits
        clip = bool(self.spec.clip)
        qk = self._compress(k, lambda x: kv.quantize_keys(x, bits, self.KEY_BLOCK, clip), kv.dequantize_keys)
        qv = self._compress(v, lambda x: kv.quantize_values(x, bits, self.spec.value_group, clip), kv.dequantize_values)
        self.blocks.append((qk, qv))

    def _restore_one(self, q, res, dequantize):
        B, H = self.batch, self.heads
        deq = dequantize(q, B, H, torch.float32)
        T, D = deq.shape[-2:]
        return kv.apply_residual(deq.reshape(B * H, T, D), res).reshape(B, H, T, D).to(self.dtype)

    def _restored(self):
        ks = [self._restore_one(*qk, kv.dequantize_keys) for qk, _ in self.blocks]
        vs = [self._restore_one(*qv, kv.dequantize_values) for _, qv in self.blocks]
        return torch.cat(ks, -2), torch.cat(vs, -2)

    def _stored_nbytes(self) -> int:
        return sum(q.nbytes() + r.nbytes() for pair in self.blocks for q, r in pair)

    def reset(self) -> None:
        super().reset()
        self.blocks = []


class ZipLayer(_LowBitLayer):
    """ZipCache: per head, salient tokens (normalized attention from probe queries) at hi bits,
    the others at lo bits."""

    wants_queries = True

    def __init__(self, spec: ZipSpec, seed: int = 0):
        super().__init__(spec)
        self.blocks: list[tuple[kv.MixedKeys, kv.MixedRows]] = []
        self.acc: torch.Tensor | None = None   # [B, H, residual] attention received from probes
        self.cnt: torch.Tensor | None = None   # [residual] probes that could see each token
        self.gen = torch.Generator().manual_seed(seed)
        self.pending = False                   # an update not yet followed by observe

    def _appended(self, n: int) -> None:
        if self.pending:
            raise ConfigError("ZipCache needs each forward's queries: run the model inside "
                              "lowbit.runtime.kvcache.observing(model, cache)")
        self.pending = True
        B, H = self.batch, self.heads
        if self.acc is None:
            self.acc, self.cnt = torch.zeros(B, H, 0), torch.zeros(0)
        self.acc = torch.cat([self.acc, torch.zeros(B, H, n)], -1)
        self.cnt = torch.cat([self.cnt, torch.zeros(n)])

    def _dropped_front(self, n: int) -> None:
        self.acc, self.cnt = self.acc[..., n:], self.cnt[n:]

    def observe(self, query: torch.Tensor, keys: torch.Tensor, scaling: float) -> None:
        q = query.shape[2]
        n_probe = max(1, math.ceil(self.spec.probes * q))
        recent = torch.arange(q - (n_probe + 1) // 2, q)
        rnd = torch.randperm(q - recent.numel(), generator=self.gen)[: n_probe // 2]
        local = torch.cat([rnd.sort().values, recent])
        N = keys.shape[2]
        positions = N - q + local
        probs = ev.attention_probs(query[:, :, local], keys, scaling, positions)  # [B, H, p, N]
        r = self.keys.shape[-2]                     # residual tokens sit at the end of the keys
        self.acc += probs[..., N - r:].sum(2)
        self.cnt += (positions.unsqueeze(1) >= torch.arange(N - r, N).unsqueeze(0)).sum(0)
        self.pending = False
        self._flush_residual()  # after attention: the chunk's own tokens have been scored too

    def _flush(self, k, v):
        B, H, T, D = k.shape
        score = self.acc[..., :T] / self.cnt[:T].clamp_min(1)             # [B, H, T]
        salient = torch.zeros(B, H, T, dtype=torch.bool)
        n_hi = round(self.spec.salient * T)
        if n_hi:
            salient.scatter_(2, score.topk(n_hi, dim=-1).indices, True)
        s = self.spec
        rows = v.float().permute(2, 0, 1, 3).reshape(T * B * H, D)
        self.blocks.append((kv.quantize_keys_mixed(k.float(), salient, s.hi, s.lo, bool(s.clip)),
                            kv.quantize_rows_mixed(rows, salient.permute(2, 0, 1).reshape(-1), s.hi, s.lo,
                                                   s.value_group, bool(s.clip))))
        self.acc, self.cnt = self.acc[..., T:], self.cnt[T:]

    def _restored(self):
        B, H = self.batch, self.heads
        ks, vs = [], []
        for qk, qv in self.blocks:
            T = qk.shape[2]
            ks.append(kv.dequantize_keys_mixed(qk).to(self.dtype))
            vs.append(kv.dequantize_rows_mixed(qv).reshape(T, B, H, -1).permute(1, 2, 0, 3).to(self.dtype))
        return torch.cat(ks, -2), torch.cat(vs, -2)

    def _stored_nbytes(self) -> int:
        return sum(qk.nbytes() + qv.nbytes() for qk, qv in self.blocks)

    def reset(self) -> None:
        super().reset()
        self.blocks, self.acc, self.cnt, self.pending = [], None, None, False


# --- eviction ------------------------------------------------------------------------------------


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
        return _tensor_bytes(self.keys, self.values) if self.is_initialized else 0


# --- building, observing, measuring --------------------------------------------------------------


def kv_label(kv: str | None, policy: str | None = None, budget: float | str | None = None) -> str | None:
    """The one string that names a cache choice in results and reports: the --kv name, or
    "<policy>@<budget>" for eviction (e.g. "snapkv@0.2"); None for the full cache. Validates."""
    if policy is None:
        if budget is not None:
            raise ConfigError("--kv-budget needs --kv-policy streaming|h2o|snapkv")
        if kv not in (None, "none", "full"):
            parse_kv(kv)
            return kv
        return None
    if kv not in (None, "none", "full"):
        raise ConfigError("--kv and --kv-policy together are not supported yet: pick a low-bit cache or an eviction policy")
    spec = parse_policy(policy, budget)
    return f"{policy}@{spec.budget:g}"


def kv_cache_for(config, name: str | None = None, policy: EvictSpec | None = None, mode: str = "stream") -> Cache | None:
    """A Cache for `config`'s decoder: a --kv name (or a "<policy>@<budget>" label, see kv_label),
    an eviction policy, or neither (None: the model's default cache). Combining a low-bit cache
    with eviction is refused for now."""
    if name in (None, "none", "full"):
        name = None
    if name is not None and "@" in name:
        if policy is not None:
            raise ConfigError(f"{name!r} already names an eviction policy")
        pol, _, budget = name.partition("@")
        name, policy = None, parse_policy(pol, budget)
    if name is None and policy is None:
        return None
    if name is not None and policy is not None:
        raise ConfigError("--kv and --kv-policy together are not supported yet: pick a low-bit cache or an eviction policy")
    cfg = config.get_text_config() if hasattr(config, "get_text_config") else config
    n = cfg.num_hidden_layers
    if policy is not None:
        return Cache(layers=[EvictingLayer(policy, mode) for _ in range(n)])
    spec = parse_kv(name)
    if isinstance(spec, HFQuantizedSpec):
        from transformers.cache_utils import QuantizedCache

        try:
            return QuantizedCache("hqq", config, nbits=spec.bits, axis_key=1, axis_value=1,
                                  q_group_size=spec.group_size, residual_length=spec.residual)
        except ImportError as e:
            raise ConfigError(f"--kv {name}: {e}") from None
    if isinstance(spec, ZipSpec):
        return Cache(layers=[ZipLayer(spec, seed=i) for i in range(n)])
    if isinstance(spec, GearSpec):
        return Cache(layers=[GearLayer(spec) for _ in range(n)])
    return Cache(layers=[KIVILayer(spec) for _ in range(n)])


def compress(cache: Cache | None) -> None:
    """After a prompt's prefill: evict every prompt-mode layer down to its budget."""
    if cache is None:
        return
    for layer in cache.layers:
        if isinstance(layer, EvictingLayer):
            layer.compress()


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


def _tensor_bytes(*ts: torch.Tensor) -> int:
    return sum(t.numel() * t.element_size() for t in ts)


def cache_nbytes(cache: Cache) -> int:
    """Bytes held by a cache's tensors (codes, scales, minimums or zeros, indices, full-precision parts)."""
    total = 0
    for layer in cache.layers:
        if hasattr(layer, "nbytes"):
            total += layer.nbytes()
            continue
        if getattr(layer, "is_initialized", False):
            total += _tensor_bytes(layer.keys, layer.values)
        for packed in (getattr(layer, "_quantized_keys", None), getattr(layer, "_quantized_values", None)):
            total += _nested_bytes(packed)  # transformers' QuantizedLayer: (codes, meta dict)
    return total


def _nested_bytes(obj) -> int:
    if isinstance(obj, torch.Tensor):
        return _tensor_bytes(obj)
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
