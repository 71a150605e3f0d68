"""The low-bit cache layers: a full-precision residual in front of compressed blocks, stored as
KIVI (KIVILayer), GEAR (GearLayer) or ZipCache (ZipLayer) blocks (formats/kv.py)."""

from __future__ import annotations

import math

import torch
from transformers.cache_utils import DynamicLayer

from lowbit.algorithms import kv_eviction as ev
from lowbit.errors import ConfigError
from lowbit.formats import kv
from lowbit.runtime.kvcache.nbytes import tensor_bytes
from lowbit.runtime.kvcache.spec import GearSpec, KVSpec, ZipSpec


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
            held += tensor_bytes(self.keys, self.values, self.sink_keys, self.sink_values)
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
