"""KIVI cache inside transformers models: exact while everything is in the full-precision window,
close at 8 bits, compressed tokens really used by later chunks, bytes accounted from tensors."""

import pytest
import torch

from lowbit.errors import ConfigError
from lowbit.runtime.kvcache import KIVILayer, KVSpec, cache_nbytes, kv_cache_for
from tiny_models import build_tiny


def chunked_logits(model, ids, cache, chunk):
    outs = []
    with torch.inference_mode():
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
    keys = B * H * D * 2 * (32 // 2 + 3)           # per channel per block: codes, fp16 scale, uint8 zero
    values = 64 * B * H * (D // 2 + 3)             # per token: codes, one group of 16 channels
    window = 2 * B * H * 16 * D * 4                # fp32 keys and values of the 16 recent tokens
    assert layer.nbytes() == keys + values + window
    assert cache_nbytes(cache) == 2 * layer.nbytes()


def test_generate_with_a_compressed_cache(ids):
    model = build_tiny("qwen2")
    out = model.generate(ids[:, :40], max_new_tokens=8, do_sample=False,
                         past_key_values=kv_cache_for(model.config, "int8-w0"))
    ref = model.generate(ids[:, :40], max_new_tokens=8, do_sample=False)
    assert out.shape == (1, 48) and torch.equal(out, ref)


def test_bad_names():
    assert KVSpec.parse("kivi2-b64") == KVSpec(2, 64) and KVSpec.parse("int4-w0").window == 0
    assert kv_cache_for(build_tiny("llama").config, "none") is None
    for bad in ("int3", "fp8", "kivi2-b0"):
        with pytest.raises(ConfigError, match="--kv"):
            KVSpec.parse(bad)


def test_perplexity_with_the_cache_in_the_loop():
    from lowbit.eval.perplexity import perplexity

    model = build_tiny("llama")
    tokens = torch.randint(0, 256, (1, 256), generator=torch.Generator().manual_seed(3))
    full = perplexity(model, tokens, 128, progress=False)
    same = perplexity(model, tokens, 128, progress=False, kv="kivi8", kv_chunk=32)  # 128-token window: no flush
    int8 = perplexity(model, tokens, 128, progress=False, kv="int8-w0", kv_chunk=32)
    int2 = perplexity(model, tokens, 128, progress=False, kv="int2-w0", kv_chunk=32)
    assert same.ppl == pytest.approx(full.ppl, rel=1e-5)
    assert int8.ppl == pytest.approx(full.ppl, rel=1e-3)
    assert abs(int2.ppl - full.ppl) > abs(int8.ppl - full.ppl)
    # 128 tokens: 4 blocks quantized, nothing left in the window; bytes measured vs a bf16 cache
    assert int8.kv_bf16_bytes == 2 * 2 * 2 * 16 * 128 * 2
    assert int2.kv_bytes < int8.kv_bytes < int8.kv_bf16_bytes
