"""KV formats: keys per channel over token blocks, values per token over channel groups; packed
round trips bit-exact against a slow reference."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lowbit.errors import ShapeError
from lowbit.formats import affine, kv


def slow_group(x, bits):
    """One group, value by value: KIVI's min/max format with float16 scale (rounded up) and minimum."""
    x = x.float()
    lo, hi = x.min(), x.max()
    scale = affine.round_scale_up(((hi - lo) / 2 + (hi - lo) / 2) / (2**bits - 1))  # as (2 * half) / qmax
    mn = lo.half().float() if hi == lo else ((lo + hi) / 2 - (hi - lo) / 2).half().float()
    out = torch.empty_like(x)
    for i, v in enumerate(x):
        code = 0.0 if scale == 0 else min(max(float(torch.round((v - mn) / scale)), 0.0), 2.0**bits - 1)
        out[i] = torch.tensor(code) * scale + mn
    return out


def slow_keys(k, bits, block):
    """Channel by channel, block by block."""
    B, H, T, D = k.shape
    out = torch.empty_like(k)
    for b in range(B):
        for h in range(H):
            for d in range(D):
                for t0 in range(0, T, block):
                    out[b, h, t0:t0 + block, d] = slow_group(k[b, h, t0:t0 + block, d], bits)
    return out


def slow_values(v, bits, group):
    """Token by token, channel group by channel group."""
    D = v.shape[-1]
    return slow_rows(v.reshape(-1, D), bits, group).reshape(v.shape)


@settings(max_examples=25, deadline=None)
@given(bits=st.sampled_from([2, 3, 4, 8]), block=st.sampled_from([1, 4, 8]), n_blocks=st.integers(1, 3),
       heads=st.integers(1, 2), d=st.sampled_from([8, 16]), group=st.sampled_from([4, 8]), seed=st.integers(0, 99))
def test_kv_formats_match_the_slow_reference(bits, block, n_blocks, heads, d, group, seed):
    g = torch.Generator().manual_seed(seed)
    k = torch.randn(1, heads, block * n_blocks, d, generator=g) * 3
    k[..., 1] += 50  # a channel far from zero, as Qwen2's key biases make
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
    # 4-bit codes + a float16 scale and float16 minimum per channel per 32 tokens
    assert whole.nbytes() == 2 * 3 * 16 * (64 // 2 + 2 * (2 + 2))
    with pytest.raises(ShapeError, match="whole number of blocks"):
        kv.quantize_keys(k[..., :40, :], 4, 32)
    with pytest.raises(ShapeError, match="groups of 12"):
        kv.quantize_values(k, 4, 12)
    with pytest.raises(ShapeError, match="another format"):
        whole.append(kv.quantize_keys(k, 2, 32))


def slow_rows(x, bits, group):
    """Row by row, group by group."""
    out = torch.empty_like(x)
    for r in range(x.shape[0]):
        for c0 in range(0, x.shape[1], group):
            out[r, c0:c0 + group] = slow_group(x[r, c0:c0 + group], bits)
    return out


@settings(max_examples=20, deadline=None)
@given(rows=st.integers(1, 20), d=st.sampled_from([8, 16]), hi=st.sampled_from([4, 8]), lo=st.sampled_from([2, 3]),
       seed=st.integers(0, 99))
def test_mixed_rows_match_the_slow_reference_per_width(rows, d, hi, lo, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, d, generator=g)
    salient = torch.rand(rows, generator=g) < 0.4
    q = kv.quantize_rows_mixed(x, salient, hi, lo, 8)
    want = torch.where(salient[:, None], slow_rows(x, hi, 8), slow_rows(x, lo, 8))
    assert torch.equal(kv.dequantize_rows_mixed(q), want)
    # the flags are held as bits, the codes at their own widths
    n_hi = int(salient.sum())
    codes = n_hi * pack_len(d, hi) + (rows - n_hi) * pack_len(d, lo)
    assert q.nbytes() == (rows + 7) // 8 + codes + rows * (d // 8) * 4


def pack_len(n, bits):
    from lowbit.formats import pack

    return pack.packed_length(n, bits)


def test_mixed_rows_reject_a_flag_count_that_does_not_match():
    with pytest.raises(ShapeError, match="one flag per row"):
        kv.quantize_rows_mixed(torch.zeros(4, 8), torch.zeros(3, dtype=torch.bool), 4, 2, 8)


@settings(max_examples=20, deadline=None)
@given(heads=st.integers(1, 3), t=st.sampled_from([8, 16, 24]), n_hi=st.integers(0, 8), hi=st.sampled_from([4, 8]),
       lo=st.sampled_from([2, 3]), seed=st.integers(0, 99))
def test_mixed_keys_quantize_each_heads_sets_per_channel(heads, t, n_hi, hi, lo, seed):
    g = torch.Generator().manual_seed(seed)
    k = torch.randn(1, heads, t, 8, generator=g)
    salient = torch.zeros(1, heads, t, dtype=torch.bool)
    for h in range(heads):
        salient[0, h, torch.randperm(t, generator=g)[:n_hi]] = True
    q = kv.quantize_keys_mixed(k, salient, hi, lo)
    got = kv.dequantize_keys_mixed(q)
    for h in range(heads):
        for mask, bits in ((salient[0, h], hi), (~salient[0, h], lo)):
            if mask.any():  # each channel of each set is one group: the slow per-group quantizer
                sub = k[0, h][mask]
                want = torch.stack([slow_group(sub[:, c], bits) for c in range(8)], 1)
                assert torch.equal(got[0, h][mask], want)
    codes = heads * 8 * (pack_len(n_hi, hi) if n_hi else 0) + heads * 8 * (pack_len(t - n_hi, lo) if n_hi < t else 0)
    groups = heads * 8 * ((n_hi > 0) + (n_hi < t))
    assert q.nbytes() == (heads * t + 7) // 8 + codes + groups * 4


def test_mixed_keys_need_the_same_salient_count_per_head():
    salient = torch.zeros(1, 2, 8, dtype=torch.bool)
    salient[0, 0, 0] = True
    with pytest.raises(ShapeError, match="same number"):
        kv.quantize_keys_mixed(torch.zeros(1, 2, 8, 4), salient, 4, 2)


def test_gear_residual_beats_plain_quantization_and_restores_outliers_exactly():
    g = torch.Generator().manual_seed(0)
    # a low-rank structure plus noise plus a few spikes
    x = (torch.randn(4, 64, 2, generator=g) @ torch.randn(4, 2, 32, generator=g)) + 0.1 * torch.randn(4, 64, 32, generator=g)
    x[0, 5, 7] = 40.0
    rest, idx, val = kv.split_outliers(x, 0.01)
    assert int(idx.shape[1]) == round(0.01 * 64 * 32) and rest[0, 5, 7] == 0
    q = kv.quantize_values(rest.reshape(1, 4, 64, 32), 2, 32)
    deq = kv.dequantize_values(q, 1, 4).reshape(4, 64, 32)
    left, right = kv.lowrank(rest - deq, 2)
    res = kv.Residual(idx, val, left, right)
    fixed = kv.apply_residual(deq, res)
    plain = kv.dequantize_values(kv.quantize_values(x.reshape(1, 4, 64, 32), 2, 32), 1, 4).reshape(4, 64, 32)
    assert (fixed - x).pow(2).mean() < 0.7 * (plain - x).pow(2).mean()
    assert fixed[0, 5, 7] == torch.tensor(40.0, dtype=torch.float16).float()
    assert res.nbytes() == idx.numel() * 6 + (left.numel() + right.numel()) * 2


def test_clipping_search_lowers_the_2_bit_error_and_never_raises_it():
    g = torch.Generator().manual_seed(0)
    v = torch.randn(1, 2, 64, 64, generator=g) * torch.rand(1, 2, 64, 1, generator=g)
    v[..., 7] *= 6  # heavy-tailed rows, where min/max ranges waste levels
    err = {}
    for clip in (False, True):
        q = kv.quantize_values(v, 2, 32, clip=clip)
        err[clip] = (kv.dequantize_values(q, 1, 2) - v).pow(2).sum(-1)   # per token
        assert q.nbytes() == kv.quantize_values(v, 2, 32).nbytes()      # same bytes
    assert float(err[True].sum()) < 0.85 * float(err[False].sum())
    # each group's search includes the unclipped range, so no row gets worse
    assert bool((err[True] <= err[False] * (1 + 1e-5) + 1e-6).all())


def test_a_channel_far_from_zero_keeps_its_resolution():
    """The float minimum follows an offset channel; a range forced to include 0 would not."""
    k = 100 + torch.rand(1, 1, 32, 4, generator=torch.Generator().manual_seed(0))  # values in [100, 101)
    back = kv.dequantize_keys(kv.quantize_keys(k, 4, 32), 1, 1)
    assert float((back - k).abs().max()) < 1.0 / 15  # half a step of the true range, plus float16 rounding
