"""The single-query decode attention against transformers' sdpa path: same greedy tokens and
close logits on tiny Llama, Qwen2 and Gemma3 (sliding windows) models, prefill untouched."""

import pytest
import torch
from tiny_models import build_tiny
from transformers import DynamicCache

from lowbit.runtime.attention import NAME, use_fast_attention
from lowbit.runtime.generate import generate
from lowbit.runtime.kvcache import kv_cache_for


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma3"])
@pytest.mark.parametrize("static", [False, True])
def test_decode_attention_matches_sdpa(arch, static):
    ids = torch.randint(0, 256, (40,), generator=torch.Generator().manual_seed(0))
    ref = build_tiny(arch)
    fast = build_tiny(arch)
    assert use_fast_attention(fast) and fast.config._attn_implementation == NAME
    want, got = generate(ref, ids, 12, static=static), generate(fast, ids, 12, static=static)
    assert got.tokens == want.tokens
    step = torch.tensor([[got.tokens[0]]])
    with torch.inference_mode():
        a = ref(torch.cat([ids.unsqueeze(0), step], 1)).logits[:, -1]
        cache = DynamicCache()
        fast(ids.unsqueeze(0), past_key_values=cache, use_cache=True)
        b = fast(step, past_key_values=cache, use_cache=True).logits[:, -1]
    torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-4)


def test_other_attention_implementations_are_left_alone():
    model = build_tiny("llama")
    model.config._attn_implementation = "eager"
    assert not use_fast_attention(model) and model.config._attn_implementation == "eager"


def test_compressed_caches_still_work_under_the_fast_path():
    model = build_tiny("qwen2")
    ids = torch.randint(0, 256, (60,), generator=torch.Generator().manual_seed(1))
    ref = generate(model, ids, 8, kv_cache_for(model.config, "kivi8")).tokens
    use_fast_attention(model)
    assert generate(model, ids, 8, kv_cache_for(model.config, "kivi8")).tokens == ref
