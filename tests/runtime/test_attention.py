"""lowbit's attention against transformers' sdpa path: the single-query decode path and the
blocked prefill path give the same greedy tokens and close logits on tiny Llama, Qwen2 and Gemma3
(sliding windows) models; what the prefill path does not take goes to sdpa."""

import pytest
import torch
from tiny_models import build_tiny
from transformers import DynamicCache, StaticCache

from lowbit.runtime.attention import (
    NAME,
    PREFILL_BLOCK,
    decode_attention,
    use_fast_attention,
)
from lowbit.runtime.generate import generate, prefill
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


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma3"])
@pytest.mark.parametrize("static", [False, True])
@pytest.mark.parametrize("chunk", [300, 110])
def test_blocked_prefill_matches_sdpa(arch, static, chunk, monkeypatch):
    """A prompt over two blocks of query rows, in one forward or in chunks after cached positions
    (a boolean mask over a static cache's empty tail, sliding windows on gemma3): the last
    position's logits and every cached key/value as transformers' sdpa gives them, with every
    layer's prefill taken by the blocks (none left to sdpa)."""
    from lowbit.runtime import attention

    taken = []
    blocks = attention._prefill_blocks

    def counted(*args):
        out = blocks(*args)
        taken.append(out is not None)
        return out

    monkeypatch.setattr(attention, "_prefill_blocks", counted)
    n = PREFILL_BLOCK * 2 + 44
    ids = torch.randint(0, 256, (n,), generator=torch.Generator().manual_seed(2))
    ref, fast = build_tiny(arch), build_tiny(arch)
    use_fast_attention(fast)

    def run(model):
        cache = StaticCache(model.config, max_cache_len=n + 8) if static else DynamicCache()
        return prefill(model, ids, cache, chunk), cache

    (want, want_cache), (got, got_cache) = run(ref), run(fast)
    forwards = {300: 1, 110: 3}[chunk]  # 300 tokens: one forward, or 110 + 110 + 80
    assert len(taken) == forwards * fast.config.num_hidden_layers and all(taken)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    for a, b in zip(got_cache.layers, want_cache.layers, strict=True):
        torch.testing.assert_close(a.keys, b.keys, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(a.values, b.values, rtol=1e-4, atol=1e-4)


def _attend(q, k, v, mask, module=None):
    module = module or torch.nn.Module()
    return decode_attention(module, q, k, v, mask, scaling=0.125)[0]


def test_prefill_blocks_skip_the_keys_no_row_sees():
    """Keys past the last one any row of a block may see change nothing, even NaN there (the
    blocks never read them); queries grouped by their key/value head as repeat_kv does."""
    gen = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, h, t, 16, generator=gen) for h, t in ((4, 150), (2, 200), (2, 200)))
    keep = torch.ones(150, 200, dtype=torch.bool).tril()[None, None]  # queries at 0 .. 149
    want = torch.nn.functional.scaled_dot_product_attention(
        q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1), attn_mask=keep, scale=0.125).transpose(1, 2)
    k[:, :, 150:], v[:, :, 150:] = float("nan"), float("nan")
    torch.testing.assert_close(_attend(q, k, v, keep), want, rtol=1e-5, atol=1e-5)


def test_no_mask_is_causal_from_the_top_left_as_sdpa():
    """No mask and fewer queries than keys (a static cache's first chunk): query i sees keys 0 .. i."""
    gen = torch.Generator().manual_seed(4)
    q, k, v = torch.randn(1, 2, 140, 8, generator=gen), torch.randn(1, 2, 150, 8, generator=gen), torch.randn(1, 2, 150, 8, generator=gen)
    want = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, scale=0.125).transpose(1, 2)
    torch.testing.assert_close(_attend(q, k, v, None), want, rtol=1e-5, atol=1e-5)


def test_what_the_prefill_blocks_do_not_take_goes_to_sdpa(monkeypatch):
    """A float mask, a row that sees no key, a non-causal module and a per-head mask all reach
    sdpa (the stand-in records the call)."""
    import transformers.integrations.sdpa_attention as sdpa_module

    calls = []
    monkeypatch.setattr(sdpa_module, "sdpa_attention_forward", lambda *a, **kw: calls.append(1) or ("sdpa", None))
    q, k = torch.randn(1, 2, 5, 8), torch.randn(1, 2, 7, 8)
    blind = torch.ones(1, 1, 5, 7, dtype=torch.bool)
    blind[..., 2, :] = False
    bidirectional = torch.nn.Module()
    bidirectional.is_causal = False
    per_head = torch.ones(1, 2, 5, 7, dtype=torch.bool)
    cases = [(q, k, torch.zeros(1, 1, 5, 7), None), (q, k, blind, None), (q, q, None, bidirectional),
             (q, k, per_head, None)]
    for qq, kk, mask, module in cases:
        assert _attend(qq, kk, kk, mask, module) == "sdpa"
    assert len(calls) == len(cases)
    assert isinstance(_attend(q, k, k, None), torch.Tensor)  # no mask, a causal module: the blocks
