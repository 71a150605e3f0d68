"""The lean decode step against the transformers forward it replaces: bit-identical logits step
by step (float32 and bfloat16, plain, packed and fused linears), the same generated tokens, and
a clear refusal of what it does not cover."""

import pytest
import torch
from tiny_models import build_tiny
from transformers import DynamicCache, StaticCache

from lowbit.runtime.attention import use_fast_attention
from lowbit.runtime.decode import LeanDecoder, unsupported_reason
from lowbit.runtime.generate import generate, prefill


def _packed(arch: str, dtype: torch.dtype = torch.bfloat16) -> torch.nn.Module:
    from test_packed import random_qweight

    from lowbit.runtime.packed import fuse_projections, pack_model
    from lowbit.runtime.qlinear import QuantLinear

    model = build_tiny(arch, tie=False)
    for name, mod in list(model.named_modules()):
        for cname, child in list(mod.named_children()):
            if isinstance(child, torch.nn.Linear):
                qw = random_qweight(child.out_features, child.in_features, 4, 64, False, len(name))
                setattr(mod, cname, QuantLinear.from_quantized(qw, child.bias))
    model = pack_model(model).to(dtype)
    fuse_projections(model)
    return model


def _bf16_kernel() -> bool:
    from lowbit import kernels

    return kernels.available("qgemv") and kernels.load("qgemv").has_bf16_path()


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("kind", ["float32", "bfloat16", "packed", "packed-float32"])
def test_lean_steps_give_the_forwards_logits_bit_for_bit(arch, kind):
    if kind.startswith("packed"):
        model = _packed(arch, torch.float32 if kind == "packed-float32" else torch.bfloat16)
    else:
        model = build_tiny(arch).to(getattr(torch, kind))
    assert use_fast_attention(model)
    ids = torch.randint(0, 256, (23,), generator=torch.Generator().manual_seed(0))
    ref_cache, lean_cache = (StaticCache(model.config, max_cache_len=40) for _ in range(2))
    want = prefill(model, ids, ref_cache)
    assert torch.equal(prefill(model, ids, lean_cache), want)
    dec = LeanDecoder(model, lean_cache, native=False)  # the native loop: test_native_small_ops_...
    if kind == "packed" and _bf16_kernel():  # the fused products are called directly
        assert all(p.qkv is not None and p.gate_up is not None and p.o is not p.down for p in dec.plans)
    if kind == "packed-float32":  # float32 activations take the modules (the kernel's float32 path)
        assert all(p.qkv is None and p.gate_up is None for p in dec.plans)
    tok = int(want.argmax())
    with torch.inference_mode():
        for pos in range(23, 33):
            a = model(input_ids=torch.tensor([[tok]]), past_key_values=ref_cache, use_cache=True).logits[0, -1].float()
            b = dec.step(tok, pos)
            assert torch.equal(a, b), f"position {pos}: max difference {float((a - b).abs().max())}"
            tok = int(a.argmax())
    for la, lb in zip(ref_cache.layers, lean_cache.layers):  # the cache holds the same keys and values
        assert torch.equal(la.keys, lb.keys) and torch.equal(la.values, lb.values)
        assert int(la.cumulative_length) == int(lb.cumulative_length) == 33


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_generate_takes_the_lean_path_with_a_static_cache_and_keeps_its_tokens(arch, monkeypatch):
    model = build_tiny(arch)
    use_fast_attention(model)
    ids = torch.randint(0, 256, (30,), generator=torch.Generator().manual_seed(2))
    calls = []
    step = LeanDecoder.step
    monkeypatch.setattr(LeanDecoder, "step", lambda self, t, p: calls.append(p) or step(self, t, p))
    lean = generate(model, ids, 12, static=True, temperature=0.8, seed=3)
    assert calls == list(range(30, 41))
    plain = generate(model, ids, 12, static=True, lean=False, temperature=0.8, seed=3)
    assert lean.tokens == plain.tokens and len(lean.tokens) == 12
    assert generate(model, ids, 12).tokens == generate(model, ids, 12, static=True).tokens
    assert len(calls) == 11 + 11  # the dynamic-cache run did not use it


def test_what_lean_decode_does_not_cover_is_named():
    gemma = build_tiny("gemma3")
    use_fast_attention(gemma)
    assert "gemma3" in unsupported_reason(gemma)
    llama = build_tiny("llama")
    assert "attention 'sdpa'" in unsupported_reason(llama)  # without lowbit's decode attention
    use_fast_attention(llama)
    assert unsupported_reason(llama) is None
    assert "DynamicCache" in unsupported_reason(llama, DynamicCache())
    with pytest.raises(ValueError, match="prefill the prompt"):
        LeanDecoder(llama, StaticCache(llama.config, max_cache_len=8))
    cache = StaticCache(llama.config, max_cache_len=8)
    prefill(llama, torch.arange(5), cache)
    with pytest.raises(ValueError, match="outside the cache"):
        LeanDecoder(llama, cache).step(1, 8)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_native_layers_follow_the_torch_step(arch):
    """The native loop (every layer in one call: products with their bias and residual, norms,
    rotary, cache write and attention) against the torch lean step: logits within bfloat16
    rounding, the same greedy tokens, the same cache."""
    if not _bf16_kernel():
        pytest.skip("no native kernels with a bfloat16 path on this machine")
    model = _packed(arch)
    use_fast_attention(model)
    ids = torch.randint(0, 256, (29,), generator=torch.Generator().manual_seed(4))
    caches = [StaticCache(model.config, max_cache_len=64) for _ in range(2)]
    logits = [prefill(model, ids, c) for c in caches]
    ref, nat = LeanDecoder(model, caches[0], native=False), LeanDecoder(model, caches[1])
    assert ref.native is None and nat.native is not None and len(nat.native) == model.config.num_hidden_layers
    tok = int(logits[0].argmax())
    for pos in range(29, 60):
        a, b = ref.step(tok, pos), nat.step(tok, pos)
        torch.testing.assert_close(b, a, rtol=0.02, atol=0.02 * float(a.abs().max()))
        assert int(b.argmax()) == int(a.argmax()), f"position {pos}"
        tok = int(a.argmax())
    for la, lb in zip(caches[0].layers, caches[1].layers):
        torch.testing.assert_close(lb.keys.float(), la.keys.float(), rtol=0.02, atol=0.02)
        torch.testing.assert_close(lb.values.float(), la.values.float(), rtol=0.02, atol=0.02)
        assert int(lb.cumulative_length) == int(la.cumulative_length) == 60


@pytest.mark.parametrize("threads", [1, 2])
def test_native_attention_over_a_long_cache_follows_the_torch_step(threads):
    """Past 256 cached positions the tiny model's KV heads split across threads (16384 products
    per step); a softmax over hundreds of positions runs the vectorized exp on full and partial
    vectors. Same bounds as above, with one thread and with two."""
    if not _bf16_kernel():
        pytest.skip("no native kernels with a bfloat16 path on this machine")
    model = _packed("qwen2")
    use_fast_attention(model)
    ids = torch.randint(0, 256, (300,), generator=torch.Generator().manual_seed(5))
    caches = [StaticCache(model.config, max_cache_len=320) for _ in range(2)]
    logits = [prefill(model, ids, c) for c in caches]
    ref, nat = LeanDecoder(model, caches[0], native=False), LeanDecoder(model, caches[1])
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        tok = int(logits[0].argmax())
        for pos in range(300, 317):
            a, b = ref.step(tok, pos), nat.step(tok, pos)
            torch.testing.assert_close(b, a, rtol=0.02, atol=0.02 * float(a.abs().max()))
            assert int(b.argmax()) == int(a.argmax()), f"position {pos}"
            tok = int(a.argmax())
    finally:
        torch.set_num_threads(before)


def test_the_native_loop_refuses_a_position_outside_the_cache_and_layers_that_do_not_agree():
    if not _bf16_kernel():
        pytest.skip("no native kernels with a bfloat16 path on this machine")
    model = _packed("llama")
    use_fast_attention(model)
    cache = StaticCache(model.config, max_cache_len=32)
    prefill(model, torch.arange(4), cache)
    dec = LeanDecoder(model, cache)
    h = torch.zeros(1, 1, model.config.hidden_size, dtype=torch.bfloat16)
    cos, sin = dec._rope(h, 0)
    with pytest.raises(RuntimeError, match="outside the cache"):
        dec.native.step(h, cos[:, 0:1], sin[:, 0:1], 32)
    plan, layer, kv = dec.plans[0], model.model.layers[0], cache.layers[0]
    ln = layer.input_layernorm.weight.detach()
    with pytest.raises(RuntimeError, match="shapes do not agree"):  # q/k/v in the place of gate/up
        dec.native.add_layer(ln, 1e-6, plan.qkv_p, plan.o_p, ln, 1e-6, plan.qkv_p, plan.down_p, kv.keys, kv.values,
                             kv.cumulative_length, 1.0, model.config.num_attention_heads,
                             model.config.num_key_value_heads)

def test_the_native_silu_and_rms_norm_round_as_torch_does():
    """The Decoder's SiLU * up (its own vectorized exp) and RMSNorm (its own summation order)
    against the torch operations of the torch loop, on 40k values of a wide range: every output
    within one bfloat16 step, and nearly all identical."""
    if not _bf16_kernel():
        pytest.skip("no native kernels with a bfloat16 path on this machine")
    from lowbit import kernels

    ext = kernels.load("qgemv")
    gen = torch.Generator().manual_seed(0)
    gu = (torch.randn(2 * 40000, generator=gen) * torch.logspace(-3, 1.5, 2 * 40000)).bfloat16()
    gate, up = gu[:40000], gu[40000:]
    want = torch.nn.functional.silu(gate) * up
    got = ext.silu_mul(gu)
    ulp = (want.float().abs() * 2 ** -7).clamp_min(1e-30)
    assert ((got.float() - want.float()).abs() <= ulp).all()
    assert (got == want).float().mean() > 0.995
    model = build_tiny("llama", tie=False).to(torch.bfloat16)
    norm = model.model.layers[0].input_layernorm
    norm.weight.data = torch.randn(norm.weight.shape, generator=gen).bfloat16()
    for scale in (1e-3, 1.0, 1e3):
        x = (torch.randn(1, 1, norm.weight.numel(), generator=gen) * scale).bfloat16()
        want, got = norm(x), ext.rms_norm(x, norm.weight.data, norm.variance_epsilon)
        assert ((got.float() - want.float()).abs() <= want.float().abs() * 2 ** -7 + 1e-30).all()
