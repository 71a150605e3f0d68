"""Compressed and evicting caches inside transformers models: exact while everything is in the
full-precision window, close at 8 bits, compressed tokens really used by later chunks, bytes
accounted from tensors."""

import pytest
import torch
from tiny_models import build_tiny

from lowbit.errors import ConfigError
from lowbit.runtime.kvcache.build import kv_cache_for
from lowbit.runtime.kvcache.eviction import EvictingLayer
from lowbit.runtime.kvcache.layers import KIVILayer, ZipLayer
from lowbit.runtime.kvcache.nbytes import cache_nbytes
from lowbit.runtime.kvcache.observe import observing
from lowbit.runtime.kvcache.spec import (
    ZipSpec,
    parse_cache,
    parse_kv,
    parse_policy,
)


def chunked_logits(model, ids, cache, chunk):
    outs = []
    with torch.inference_mode(), observing(model, cache):
        for i in range(0, ids.shape[1], chunk):
            outs.append(model(ids[:, i:i + chunk], past_key_values=cache, use_cache=True).logits)
    return torch.cat(outs, 1)


@pytest.fixture
def ids():
    return torch.randint(0, 256, (1, 96), generator=torch.Generator().manual_seed(0))


def test_window_larger_than_the_text_is_exact(arch, ids):
    model = build_tiny(arch)
    with torch.inference_mode():
        ref = model(ids).logits
    got = chunked_logits(model, ids, kv_cache_for(model.config, "kivi2-b128-w0"), 16)
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)


def test_8_bit_cache_is_close_and_2_bit_is_not_free(arch, ids):
    model = build_tiny(arch)
    with torch.inference_mode():
        ref = model(ids).logits
    err = {}
    for name in ("int8-w0", "int2-w0", "int2-w32"):
        cache = kv_cache_for(model.config, name)
        got = chunked_logits(model, ids, cache, 16)
        err[name] = float((got - ref).pow(2).mean() / ref.pow(2).mean())
        flushed = 96 if name.endswith("w0") else 64  # blocks of 32; w32 keeps the last 32 tokens
        assert all(layer.n_quantized == flushed for layer in cache.layers)
    assert err["int8-w0"] < 1e-4 and err["int2-w0"] > 10 * err["int8-w0"]
    assert err["int2-w32"] < err["int2-w0"]  # the full-precision window helps


def test_bytes_held_are_measured_from_the_tensors(ids):
    model = build_tiny("llama")
    cache = kv_cache_for(model.config, "int4-w0")
    chunked_logits(model, ids[:, :80], cache, 80)  # 2 blocks quantized, 16 tokens in the window
    layer = cache.layers[0]
    assert isinstance(layer, KIVILayer) and layer.n_quantized == 64 and layer.keys.shape[-2] == 16
    B, H, D = 1, 2, 16
    keys = B * H * D * 2 * (32 // 2 + 4)           # per channel per block: codes, fp16 scale, fp16 minimum
    values = 64 * B * H * (D // 2 + 4)             # per token: codes, one group of 16 channels
    window = 2 * B * H * 16 * D * 4                # fp32 keys and values of the 16 recent tokens
    assert layer.nbytes() == keys + values + window
    assert cache_nbytes(cache) == 2 * layer.nbytes()


def test_generate_with_a_compressed_cache(ids):
    model = build_tiny("qwen2")
    out = model.generate(ids[:, :40], max_new_tokens=8, do_sample=False,
                         past_key_values=kv_cache_for(model.config, "int8-w0"))
    ref = model.generate(ids[:, :40], max_new_tokens=8, do_sample=False)
    assert out.shape == (1, 48) and torch.equal(out, ref)


def test_perplexity_with_the_cache_in_the_loop():
    from lowbit.eval.perplexity import perplexity

    model = build_tiny("llama")
    tokens = torch.randint(0, 256, (1, 256), generator=torch.Generator().manual_seed(3))
    full = perplexity(model, tokens, 128, progress=False)
    same = perplexity(model, tokens, 128, progress=False, kv=parse_cache("kivi8"), kv_chunk=32)  # 128-token window: no flush
    int8 = perplexity(model, tokens, 128, progress=False, kv=parse_cache("int8-w0"), kv_chunk=32)
    int2 = perplexity(model, tokens, 128, progress=False, kv=parse_cache("int2-w0"), kv_chunk=32)
    assert same.ppl == pytest.approx(full.ppl, rel=1e-5)
    assert int8.ppl == pytest.approx(full.ppl, rel=1e-3)
    assert abs(int2.ppl - full.ppl) > abs(int8.ppl - full.ppl)
    # 128 tokens: 4 blocks quantized, nothing left in the window; bytes measured vs a bf16 cache
    assert int8.kv_bf16_bytes == 2 * 2 * 2 * 16 * 128 * 2
    assert int2.kv_bytes < int8.kv_bytes < int8.kv_bf16_bytes


@pytest.mark.parametrize("name", ["h2o@1000", "snapkv@1000", "streaming@1000", "zipcache-w512", "gear2-w512"])
def test_a_cache_that_drops_or_compresses_nothing_is_exact(arch, ids, name):
    model = build_tiny(arch)
    with torch.inference_mode():
        ref = model(ids).logits
    got = chunked_logits(model, ids, kv_cache_for(model.config, name), 16)
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("arch_name", ["llama", "qwen2"])
def test_evicting_caches_hold_the_budget_and_positions_stay_true(arch_name, ids):
    model = build_tiny(arch_name)
    for policy in ("streaming", "h2o", "snapkv"):
        cache = kv_cache_for(model.config, f"{policy}@24")
        got = chunked_logits(model, ids, cache, 16)
        assert all(layer.keys.shape[-2] == 24 for layer in cache.layers)
        assert cache.get_seq_length() == 96 and torch.isfinite(got).all()
    # streaming with the budget as a fraction: after 96 tokens, 20% of them
    cache = kv_cache_for(model.config, "streaming@0.2")
    chunked_logits(model, ids, cache, 16)
    assert cache.layers[0].keys.shape[-2] == 20
    # the first chunk never sees an eviction: its logits are the full model's
    with torch.inference_mode():
        ref = model(ids[:, :16]).logits
    torch.testing.assert_close(chunked_logits(model, ids[:, :16], kv_cache_for(model.config, "h2o@4"), 16), ref)


def test_eviction_at_the_budget_equals_a_sliding_window_model(ids):
    """StreamingLLM with no sinks, one token per step, keeps exactly the last `budget` tokens:
    the same as a sliding-window attention of budget + 1 (the token itself) in the full model."""
    sliding = build_tiny("qwen2", tie=False, use_sliding_window=True, sliding_window=9, max_window_layers=0,
                         layer_types=["sliding_attention"] * 2)
    plain = build_tiny("qwen2", tie=False)
    plain.load_state_dict(sliding.state_dict())
    with torch.inference_mode():
        ref = sliding(ids[:, :40]).logits
    policy = parse_policy("streaming", 8, sinks=0)
    from transformers.cache_utils import Cache


    cache = Cache(layers=[EvictingLayer(policy) for _ in range(2)])
    got = chunked_logits(plain, ids[:, :40], cache, 1)
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)


def test_zipcache_puts_the_most_attended_tokens_at_high_precision():
    layer = ZipLayer(ZipSpec(hi=8, lo=2, salient=0.25, probes=1.0, block=8, window=0))
    n, d = 8, 8
    keys = torch.zeros(1, 1, n, d)
    keys[0, 0, torch.arange(n), torch.arange(n)] = 1.0
    keys[0, 0, [2, 5], 0] = 3.0                      # tokens 2 and 5 answer direction 0
    values = torch.randn(1, 1, n, d, generator=torch.Generator().manual_seed(0))
    query = torch.zeros(1, 1, n, d)
    query[..., 0] = 5.0
    k, _ = layer.update(keys, values)
    layer.observe(query, k, 1.0)
    assert layer.n_quantized == 8
    qk, qv = layer.blocks[0]
    import numpy as np

    for q, count in ((qk, n), (qv, qv.rows)):
        flags = np.unpackbits(q.salient_bits.numpy(), count=count).astype(bool)
        assert flags.nonzero()[0].tolist() == [2, 5]
    _, v_back = layer.dequantized()
    err = (v_back - values).abs().amax(-1)[0, 0]
    assert err[[2, 5]].max() < err[[0, 1, 3, 4, 6, 7]].min()


def test_zipcache_outside_observing_is_a_clear_error(ids):
    model = build_tiny("llama")
    cache = kv_cache_for(model.config, "zipcache")
    with torch.inference_mode():
        model(ids[:, :8], past_key_values=cache, use_cache=True)
        with pytest.raises(ConfigError, match="observing"):
            model(ids[:, 8:16], past_key_values=cache, use_cache=True)


def test_gear_and_zipcache_beat_plain_2_bit_kivi(ids):
    model = build_tiny("llama")
    with torch.inference_mode():
        ref = model(ids).logits
    err = {}
    for name in ("kivi2-w0", "gear2-w0-b32-r4", "zipcache-h4-l2-r0.5-w0-b32", "zipcache-h2-l2-w0-b32"):
        got = chunked_logits(model, ids, kv_cache_for(model.config, name), 32)
        err[name] = float((got - ref).pow(2).mean() / ref.pow(2).mean())
    assert err["gear2-w0-b32-r4"] < 0.8 * err["kivi2-w0"]
    assert err["zipcache-h4-l2-r0.5-w0-b32"] < 0.8 * err["zipcache-h2-l2-w0-b32"]


def test_transformers_quantized_cache_peer_runs_and_its_bytes_are_counted(ids):
    pytest.importorskip("hqq")
    model = build_tiny("llama")
    with torch.inference_mode():
        ref = model(ids).logits
    err, held = {}, {}
    for name in ("hf-hqq4", "hf-hqq2"):
        cache = kv_cache_for(model.config, name)
        got = chunked_logits(model, ids, cache, 32)
        err[name] = float((got - ref).pow(2).mean() / ref.pow(2).mean())
        held[name] = cache_nbytes(cache)
    full_fp32 = 2 * 2 * 2 * 96 * 16 * 4
    assert err["hf-hqq4"] < err["hf-hqq2"] and held["hf-hqq2"] < held["hf-hqq4"] < full_fp32
    with pytest.raises(ConfigError, match="hf-hqq<bits>"):
        parse_kv("hf-hqq5")


def test_attention_sinks_stay_exact_and_the_rest_is_quantized(ids):
    model = build_tiny("llama")
    cache = kv_cache_for(model.config, "kivi2-w8-a4")
    with torch.inference_mode(), observing(model, cache):
        model(ids[:, :50], past_key_values=cache, use_cache=True)
    layer = cache.layers[0]
    assert layer.sink_keys.shape[-2] == 4 and layer.n_quantized == 32 and layer.keys.shape[-2] == 14
    assert cache.get_seq_length() == 50
    with torch.inference_mode():
        plain = kv_cache_for(model.config, "kivi8-b128-w128")   # never flushes: exact keys of the same tokens
        model(ids[:, :50], past_key_values=plain, use_cache=True)
    exact_k = plain.layers[0].keys
    torch.testing.assert_close(layer.sink_keys, exact_k[..., :4, :])
    assert not torch.allclose(layer.dequantized()[0], exact_k[..., 4:36, :], atol=1e-3)
    assert parse_kv("gear2-a4").sinks == 4 and parse_kv("zipcache-a2").sinks == 2


def test_sinks_help_a_2_bit_cache(ids):
    model = build_tiny("llama")
    with torch.inference_mode():
        ref = model(ids).logits
    err = {}
    for name in ("kivi2-w0", "kivi2-w0-a4"):
        got = chunked_logits(model, ids, kv_cache_for(model.config, name), 16)
        err[name] = float((got - ref).pow(2).mean() / ref.pow(2).mean())
    assert err["kivi2-w0-a4"] < err["kivi2-w0"]


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma3"])
def test_a_static_cache_generates_what_the_dynamic_one_does(ids, arch):
    from lowbit.runtime.generate import generate

    model = build_tiny(arch)
    prompt = ids[0, :30]
    dynamic = generate(model, prompt, 12, prefill_chunk=7)
    static = generate(model, prompt, 12, prefill_chunk=7, static=True)
    assert static.tokens == dynamic.tokens and len(static.tokens) == 12
    with pytest.raises(ConfigError, match="static"):
        generate(model, prompt, 2, kv_cache_for(model.config, "kivi4"), static=True)
