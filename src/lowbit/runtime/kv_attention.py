"""Decode attention read from a KIVI cache's packed codes, without dequantizing the cache.

At decode time a KIVI layer holds packed key blocks (per channel), packed value rows (per token)
and a full-precision residual of the most recent tokens. `kivi_decode_attention` computes

    softmax([q.K_quantized, q.K_residual] * scaling + mask) @ [V_quantized; V_residual]

with the quantized parts taken straight from the codes by the native kernel
(kernels/csrc/kv_attention.cpp), so a step reads ~bits/16 of what a bfloat16 cache would and
allocates nothing the size of the cache. `reference_decode_attention` is the slow, obvious
version (dequantize, then the same formula) that the kernel is tested against and falls back to.

Shapes: query [B, Hq, 1, D] (Hq = H * R query heads, kv head h serving heads h*R .. h*R+R-1, as
transformers' repeat_kv has it); residual keys / values [B, H, Tr, D]; mask None or
[B, 1, 1, Tq + Tr] (bool: True attends; float: added). Returns [B, 1, Hq, D] like transformers'
attention functions.
"""

from __future__ import annotations

import torch

from lowbit import kernels
from lowbit.formats import kv


def _masked(scores: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    if mask is None:
        return scores
    if mask.shape[-1] != scores.shape[-1]:
        raise ValueError(f"attention mask covers {mask.shape[-1]} keys, the cache holds {scores.shape[-1]}")
    m = mask[:, :, -1:, :]                                   # [B, 1, 1, N]: the decode query's row
    if m.dtype == torch.bool:
        return scores.masked_fill(~m, float("-inf"))
    return scores + m.float()


def _split(query: torch.Tensor, heads: int) -> torch.Tensor:
    B, Hq, L, D = query.shape
    if L != 1:
        raise ValueError(f"decode attention takes one query token, got {L}")
    return query.float().reshape(B, heads, Hq // heads, D)      # [B, H, R, D]


def reference_decode_attention(query, qkeys: kv.KVBlocks | None, qvalues: kv.KVBlocks | None,
                               keys_r: torch.Tensor, values_r: torch.Tensor, scaling: float,
                               mask: torch.Tensor | None = None) -> torch.Tensor:
    """Dequantize the blocks, concatenate the residual, plain softmax attention. [B, 1, Hq, D]."""
    B, H = keys_r.shape[:2]
    q = _split(query, H) * scaling
    k, v = keys_r.float(), values_r.float()
    if qkeys is not None:
        k = torch.cat([kv.dequantize_keys(qkeys, B, H), k], -2)
        v = torch.cat([kv.dequantize_values(qvalues, B, H), v], -2)
    p = torch.softmax(_masked(q @ k.transpose(-1, -2), mask), dim=-1)    # [B, H, R, N]
    out = p @ v                                                          # [B, H, R, D]
    return out.reshape(B, -1, 1, out.shape[-1]).transpose(1, 2).to(query.dtype)


def kivi_decode_attention(query, qkeys: kv.KVBlocks | None, qvalues: kv.KVBlocks | None,
                          keys_r: torch.Tensor, values_r: torch.Tensor, scaling: float,
                          mask: torch.Tensor | None = None) -> torch.Tensor:
    """The same as reference_decode_attention, reading the quantized blocks in the native kernel."""
    if qkeys is None:
        return reference_decode_attention(query, None, None, keys_r, values_r, scaling, mask)
    ext = kernels.load_or_warn("kv_attention", "decoding through the dequantizing reference")
    if ext is None:
        return reference_decode_attention(query, qkeys, qvalues, keys_r, values_r, scaling, mask)
    B, H = keys_r.shape[:2]
    q = (_split(query, H) * scaling).contiguous()
    n, rows, _ = qkeys.codes.shape
    sk = ext.key_scores(q, qkeys.codes, qkeys.scales.reshape(n, rows).float(),
                        qkeys.mins.reshape(n, rows).float(), qkeys.bits, qkeys.width)
    sr = q @ keys_r.float().transpose(-1, -2)
    p = torch.softmax(_masked(torch.cat([sk, sr], -1), mask), dim=-1)
    tq = sk.shape[-1]
    out = ext.value_mix(p[..., :tq].contiguous(), qvalues.codes, qvalues.scales.float(), qvalues.mins.float(),
                        qvalues.bits, qvalues.group_size)
    out = out + p[..., tq:] @ values_r.float()
    return out.reshape(B, -1, 1, out.shape[-1]).transpose(1, 2).to(query.dtype)
