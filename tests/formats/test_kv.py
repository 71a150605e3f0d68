"""KV formats: keys per channel over token blocks, values per token over channel groups; packed
round trips bit-exact against a slow reference."""

import pytest
import torch
from hypothesis import given, settings, strategies as st

from lowbit.errors import ShapeError
from lowbit.formats import affine, kv


def slow_keys(k, bits, block):
    """Channel by channel, block by block, with the scalar affine primitives."""
    B, H, T, D = k.shape
    out = torch.empty_like(k)
    for b in range(B):
        for h in range(H):
            for d in range(D):
                for t0 in range(0, T, block):
                    x = k[b, h, t0:t0 + block, d].reshape(1, 1, -1)
                    s, z = affine.choose_qparams(x, bits, False)
                    q = affine.quantize_groups(x, s, z, bits)
                    out[b, h, t0:t0 + block, d] = affine.dequantize_groups(q, s, z).flatten()
    return out


def slow_values(v, bits, group):
    B, H, T, D = v.shape
    out = torch.empty_like(v)
    for b in range(B):
        for h in range(H):
            for t in range(T):
                for c0 in range(0, D, group):
                    x = v[b, h, t, c0:c0 + group].reshape(1, 1, -1)
                    s, z = affine.choose_qparams(x, bits, False)
                    q = affine.quantize_groups(x, s, z, bits)
                    out[b, h, t, c0:c0 + group] = affine.dequantize_groups(q, s, z).flatten()
    return out


@settings(max_examples=25, deadline=None)
@given(bits=st.sampled_from([2, 4, 8]), block=st.sampled_from([1, 4, 8]), n_blocks=st.integers(1, 3),
       heads=st.integers(1, 2), d=st.sampled_from([4, 8, 12]), group=st.sampled_from([4, 8]), seed=st.integers(0, 99))
def test_kv_formats_match_the_slow_reference(bits, block, n_blocks, heads, d, group, seed):
    g = torch.Generator().manual_seed(seed)
    k = torch.randn(1, heads, block * n_blocks, d, generator=g) * 3
    v = torch.randn(1, heads, block * n_blocks, d, generator=g)
    qk, qv = kv.quantize_keys(k, bits, block), kv.quantize_values(v, bits, group)
    assert torch.equal(kv.dequantize_keys(qk, 1, heads), slow_keys(k, bits, block))
    assert torch.equal(kv.dequantize_values(qv, 1, heads), slow_values(v, bits, min(group, d)))


def test_append_concatenates_blocks_and_counts_bytes():
    g = torch.Generator().manual_seed(0)
    k = torch.randn(2, 3, 64, 16, generator=g)
    whole = kv.quantize_keys(k, 4, 32)
    parts = kv.quantize_keys(k[..., :32, :], 4, 32).append(kv.quantize_keys(k[..., 32:, :], 4, 32))
    assert torch.equal(kv.dequantize_keys(whole, 2, 3), kv.dequantize_keys(parts, 2, 3))
    # 4-bit codes + a float16 scale and uint8 zero per channel per 32 tokens
    assert whole.nbytes() == 2 * 3 * 16 * (64 // 2 + 2 * (2 + 1))
    with pytest.raises(ShapeError, match="whole number of blocks"):
        kv.quantize_keys(k[..., :40, :], 4, 32)
    with pytest.raises(ShapeError, match="another format"):
        whole.append(kv.quantize_keys(k, 2, 32))
