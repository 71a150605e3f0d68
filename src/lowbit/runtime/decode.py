"""Lean single-token decode: the decoder's own modules, called in a plain loop.

A transformers forward for one new token spends several milliseconds per step on work around the
arithmetic (output capture, mask construction for every layer type, the cache's bookkeeping,
keyword plumbing, dispatch through the attention interface) -- for a packed 1.5B model about a
quarter of the step. `LeanDecoder` runs the same step with none of that: embedding, then per layer
the model's own norms, projections, activation and rotary function and lowbit's decode attention,
reading and writing the StaticCache's buffers in place, then the final norm and head. It calls the
very modules and functions transformers calls, in the same order and dtypes, so its logits are
bit-identical to the transformers forward (tests/runtime/test_decode.py checks that).

It covers the Llama / Qwen2 layer (pre-norm attention and gated MLP, full attention, optional
q/k/v bias) with lowbit's decode attention (runtime/attention.py) and a StaticCache; anything
else (`unsupported_reason` says why) keeps the transformers forward.

For a bfloat16 model of packed layers it goes one step further (the native loop, the default):
every decoder layer runs inside one native call (kernels/csrc/decoder.cpp's Decoder: the packed products, with
their bias and residual additions, and RMSNorm, rotary embedding, cache write and attention from
kernels/csrc/decode_ops.h, with SiLU), so a step is the embedding, one call
and the head. Its norms and attention sum in another order than torch's kernels, so its logits
agree with the transformers forward to bfloat16 rounding rather than bit for bit;
`native=False` keeps the bit-identical torch loop.

    cache = StaticCache(model.config, max_cache_len=...)
    prefill(model, prompt, cache)                      # transformers forward, fills the cache
    dec = LeanDecoder(model, cache)
    logits = dec.step(token, position)                 # [vocab] float32
"""

from __future__ import annotations

import sys

import torch
from transformers.cache_utils import StaticCache, StaticLayer

from lowbit.runtime import attention
from lowbit.runtime.embedding import embedding_dtype

LAYER_TYPES = ("llama", "qwen2")


def unsupported_reason(model: torch.nn.Module, cache=None) -> str | None:
    """Why `model` (with `cache`) cannot run the lean step, or None if it can."""
    config = model.config
    if config.model_type not in LAYER_TYPES:
        return f"model type {config.model_type!r} (lean decode covers {', '.join(LAYER_TYPES)})"
    if config._attn_implementation != attention.NAME:
        return f"attention {config._attn_implementation!r} (lean decode runs {attention.NAME!r})"
    if any(t != "full_attention" for t in getattr(config, "layer_types", None) or ()):
        return "sliding-window layers"
    if cache is not None and (type(cache) is not StaticCache or any(type(la) is not StaticLayer for la in cache.layers)):
        return f"a {type(cache).__name__} (lean decode writes a full-attention StaticCache in place)"
    body = getattr(model, "model", None)
    if body is None or not hasattr(body, "rotary_emb") or not hasattr(model, "lm_head"):
        return "no model.model.rotary_emb / lm_head"
    for layer in body.layers:
        attn, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
        if attn is None or mlp is None or any(hasattr(attn, n) for n in ("q_norm", "k_norm")):
            return "a decoder layer of another shape"
        if not all(hasattr(mlp, n) for n in ("gate_proj", "up_proj", "down_proj", "act_fn")):
            return "an MLP of another shape"
    return None


class LeanDecoder:
    """Decode steps for `model` over `cache` (a StaticCache that prefill has filled)."""

    def __init__(self, model: torch.nn.Module, cache: StaticCache, native: bool = True):
        reason = unsupported_reason(model, cache)
        if reason is not None:
            raise ValueError(f"lean decode does not cover {reason}; use the model's forward")
        self.model, self.cache, self.body = model, cache, model.model
        self.layers = list(self.body.layers[: model.config.num_hidden_layers])
        first = self.layers[0].self_attn
        self.rotary = sys.modules[type(first).__module__].apply_rotary_pos_emb
        self.head_dim = first.head_dim
        if not all(layer.is_initialized for layer in cache.layers):
            raise ValueError("the cache is empty: prefill the prompt into it first")
        self.max_len = cache.layers[0].max_cache_len
        self.positions = torch.arange(self.max_len)
        self._cos_sin: tuple[torch.Tensor, torch.Tensor] | None = None
        self.rotate_half = sys.modules[type(first).__module__].rotate_half
        bf16 = embedding_dtype(self.body.embed_tokens) == torch.bfloat16  # the kernels' direct path
        self.plans = [_LayerPlan(layer, bf16) for layer in self.layers]
        self.native = _native_decoder(model, self.plans, cache) if native else None

    def _rope(self, like: torch.Tensor, pos: int) -> tuple[torch.Tensor, torch.Tensor]:
        # the rotary module's table for every position at once: each entry is the same float
        # operations (inv_freq * position, a product with nothing to sum) as one position alone
        if self._cos_sin is None or self._cos_sin[0].dtype != like.dtype:
            self._cos_sin = self.body.rotary_emb(like, self.positions.unsqueeze(0))
        cos, sin = self._cos_sin
        return cos[:, pos:pos + 1], sin[:, pos:pos + 1]

    @torch.inference_mode()
    def step(self, token: int, pos: int) -> torch.Tensor:
        """Logits [vocab] (float32) for `token` at position `pos`; writes its keys and values."""
        if not 0 <= pos < self.max_len:
            raise ValueError(f"position {pos} is outside the cache ({self.max_len} positions)")
        h = self.body.embed_tokens(torch.tensor([[token]]))
        cos, sin = self._rope(h, pos)
        if self.native is not None:
            h = h.contiguous()
            self.native.step(h, cos, sin, pos)  # every layer, h in place
            return self.model.lm_head(self.body.norm(h))[0, -1].float()
        mask = (self.positions <= pos).view(1, 1, 1, -1)
        d = self.head_dim
        cos1, sin1 = cos.unsqueeze(1), sin.unsqueeze(1)
        for layer, plan, kv in zip(self.layers, self.plans, self.cache.layers):
            attn, mlp = layer.self_attn, layer.mlp
            x = layer.input_layernorm(h)
            if plan.qkv is not None:  # one product for q, k and v; the rotation on q and k at once
                y = plan.qkv(x)
                qk = y[..., :plan.qk_rows].view(1, 1, -1, d).transpose(1, 2)
                qk = (qk * cos1) + (self.rotate_half(qk) * sin1)
                q, k = qk[:, :plan.q_heads], qk[:, plan.q_heads:]
                v = y[..., plan.qk_rows:].view(1, 1, -1, d).transpose(1, 2)
            else:
                q = attn.q_proj(x).view(1, 1, -1, d).transpose(1, 2)
                k = attn.k_proj(x).view(1, 1, -1, d).transpose(1, 2)
                v = attn.v_proj(x).view(1, 1, -1, d).transpose(1, 2)
                q, k = self.rotary(q, k, cos, sin)
            kv.keys[:, :, pos] = k[:, :, 0]
            kv.values[:, :, pos] = v[:, :, 0]
            kv.cumulative_length.fill_(pos + 1)
            o, _ = attention.decode_attention(attn, q, kv.keys, kv.values, mask, scaling=attn.scaling)
            h = h + plan.o(o.reshape(1, 1, -1))
            x = layer.post_attention_layernorm(h)
            if plan.gate_up is not None:
                y = plan.gate_up(x)
                h = h + plan.down(mlp.act_fn(y[..., :plan.inter]) * y[..., plan.inter:])
            else:
                h = h + plan.down(mlp.act_fn(mlp.gate_proj(x)) * mlp.up_proj(x))
        return self.model.lm_head(self.body.norm(h))[0, -1].float()


def _native_decoder(model: torch.nn.Module, plans: list, cache: StaticCache) -> object | None:
    """qgemv's Decoder over every layer where each qualifies (bfloat16 RMSNorms, SiLU, all four
    products packed for the bfloat16 path), else None."""
    from lowbit.runtime.packed import _ext

    ext = _ext()
    config = model.config
    if ext is None or not hasattr(ext, "Decoder") or getattr(config, "hidden_act", None) != "silu" \
            or any(None in (p.qkv_p, p.o_p, p.gate_up_p, p.down_p) for p in plans):
        return None
    for layer in model.model.layers:
        for norm in (layer.input_layernorm, layer.post_attention_layernorm):
            if not hasattr(norm, "variance_epsilon") or norm.weight.dtype != torch.bfloat16:
                return None
    dec = ext.Decoder()
    for layer, plan, kv in zip(model.model.layers, plans, cache.layers):
        ln1, ln2 = layer.input_layernorm, layer.post_attention_layernorm
        dec.add_layer(ln1.weight.detach().contiguous(), ln1.variance_epsilon, plan.qkv_p, plan.o_p,
                      ln2.weight.detach().contiguous(), ln2.variance_epsilon, plan.gate_up_p, plan.down_p,
                      kv.keys, kv.values, kv.cumulative_length, layer.self_attn.scaling,
                      config.num_attention_heads, config.num_key_value_heads)
    return dec


def _product(linears: list[torch.nn.Module]):
    """qgemv's Product for PackedLinears that share a fused GEMV (or for one PackedLinear), in
    the order given: x [1, in] bfloat16 -> bf16(x W^T + bias) [1, sum of outputs], the operations
    their forwards run (the kernel's float32 result, plus each bias in float32, rounded once),
    without the per-module calls. None where the members do not qualify; their forwards then run."""
    from lowbit.runtime.packed import PackedLinear, _ext

    ext = _ext()
    if ext is None or not ext.has_bf16_path() or not all(isinstance(m, PackedLinear) for m in linears):
        return None
    first = linears[0]
    if any(m.perm is not None or m.group_size % 64 for m in linears):
        return None
    if len(linears) > 1:
        shared = first._fused
        if shared is None or any(m._fused is not shared for m in linears) or len(shared.rows) != len(linears):
            return None
        starts = [0] + [m._rows[1] for m in linears[:-1]]
        if [m._rows[0] for m in linears] != starts:  # the fused rows must be in the order asked for
            return None
        src = shared
    else:
        if first._fused is not None:
            return None
        src = first
    with_bias = [m.bias is not None for m in linears]
    if any(with_bias) and not all(with_bias):
        return None
    bias = torch.cat([m.bias.float() for m in linears]) if all(with_bias) else None
    return ext.Product(src.packed, src.widths, src.offsets, src.scales, src.zero_points, src.group_size,
                       src.interleave, bias)


def _call(product) -> object | None:
    """x [1, 1, in] -> product(x) [1, 1, out] bfloat16 (None for no product)."""
    if product is None:
        return None
    return lambda x: product(x.reshape(1, -1).contiguous()).reshape(1, 1, -1)


class _LayerPlan:
    """The direct products of one decoder layer (None: call the modules)."""

    def __init__(self, layer: torch.nn.Module, bf16: bool):
        attn, mlp = layer.self_attn, layer.mlp
        product = _product if bf16 else (lambda linears: None)
        self.qkv_p = product([attn.q_proj, attn.k_proj, attn.v_proj])
        self.o_p = product([attn.o_proj])
        self.gate_up_p = product([mlp.gate_proj, mlp.up_proj])
        self.down_p = product([mlp.down_proj])
        self.qkv, self.gate_up = _call(self.qkv_p), _call(self.gate_up_p)
        self.o, self.down = _call(self.o_p) or attn.o_proj, _call(self.down_p) or mlp.down_proj
        self.q_heads = attn.config.num_attention_heads
        self.qk_rows = (attn.config.num_attention_heads + attn.config.num_key_value_heads) * attn.head_dim
        self.inter = mlp.gate_proj.out_features
