"""llama.cpp's IQ4_NL and IQ4_XS: bytes gguf-py reads back bit for bit, tables that are the decoder's
own values, and a scale search that beats the plain max-abs scale choice."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from test_ggml_legacy import (
    at_codes,
    gguf_decode,
    importances,
    random_f16,
    same_bits,
    weights,
)

from lowbit.formats.ggml import iq4
from lowbit.formats.ggml.base import BlockType
from lowbit.formats.ggml.legacy import ScaleParams
from lowbit.formats.ggml.search import inverse, signed_absmax, to_f16

IQ4 = iq4.TYPES


def random_params(bt: BlockType, n: int, rng: np.random.Generator):
    d = random_f16(n, rng)
    if bt.name == "IQ4_NL":
        return ScaleParams(d)
    return iq4.SuperScaleParams(d, torch.from_numpy(rng.integers(-32, 32, (n, 8))))


def max_abs_params(bt: BlockType, w: torch.Tensor):
    """The plain choice: each (sub-)block's largest weight on the lowest level, -127; for IQ4_XS the
    largest sub-block scale on -32 and the others rounded to it."""
    if bt.name == "IQ4_NL":
        return ScaleParams(to_f16(signed_absmax(w) / -127))
    s = signed_absmax(w.reshape(-1, 32)).reshape(-1, 8) / -127
    d = to_f16(signed_absmax(s) / -32)
    return iq4.SuperScaleParams(d, (s * inverse(d)).round().clamp(-32, 31).long())


@settings(max_examples=30, deadline=None)
@given(bt=st.sampled_from(IQ4), n=st.integers(1, 6), seed=st.integers(0, 10_000))
def test_any_scales_and_codes_decode_as_their_table(bt, n, seed):
    rng = np.random.default_rng(seed)
    params = random_params(bt, n, rng)
    codes = torch.from_numpy(rng.integers(0, bt.n_levels, (n, bt.block), dtype=np.uint8))
    data = bt.encode(params, codes)
    assert same_bits(bt.decode(data), at_codes(bt.table(params), codes))
    assert same_bits(bt.decode(data), gguf_decode(bt, data))


@settings(max_examples=30, deadline=None)
@given(bt=st.sampled_from(IQ4), n=st.integers(1, 6), seed=st.integers(0, 10_000))
def test_random_bytes_decode_as_gguf_reads_them(bt, n, seed):
    rng = np.random.default_rng(seed)
    data = torch.from_numpy(rng.integers(0, 256, (n, bt.type_size), dtype=np.uint8))
    data[:, :2] = random_f16(n, rng).half().reshape(n, 1).view(torch.uint8)     # a finite d
    assert same_bits(bt.decode(data), gguf_decode(bt, data))


@settings(max_examples=40, deadline=None)
@given(bt=st.sampled_from(IQ4), n=st.integers(1, 4), seed=st.integers(0, 10_000),
       spread=st.sampled_from([0.0, 0.5, 1.0, 3.0]))
def test_nearest_is_the_reference_nearest_bit_for_bit(bt, n, seed, spread):
    rng = np.random.default_rng(seed)
    table = bt.table(random_params(bt, n, rng))
    s = table.shape[1]
    # weights on the table's values, on its midpoints, and between them
    k = torch.from_numpy(rng.integers(0, bt.n_levels - 1, (n, s, bt.sub)))
    lo, hi = table.gather(2, k), table.gather(2, k + 1)
    t = torch.from_numpy(rng.random((n, s, bt.sub), dtype=np.float32)) * spread
    w = (lo + (hi - lo) * torch.where(torch.from_numpy(rng.random((n, s, bt.sub))) < 0.3, 0.5, t)).reshape(n, -1)
    codes, values = bt.nearest(table, w)
    ref_codes, ref_values = BlockType.nearest(bt, table, w)
    assert torch.equal(codes, ref_codes)
    assert same_bits(values, ref_values)


@pytest.mark.parametrize("bt", IQ4, ids=lambda bt: bt.name)
def test_empty_zero_and_constant_blocks(bt):
    assert bt.decode(bt.quantize_blocks(torch.zeros(0, bt.block))).shape == (0, bt.block)
    zero = bt.decode(bt.quantize_blocks(torch.zeros(2, bt.block)))
    assert torch.equal(zero, torch.zeros(2, bt.block))
    c = torch.tensor([[0.3], [-2e3]]).expand(2, bt.block)
    assert torch.allclose(bt.decode(bt.quantize_blocks(c)), c, rtol=1e-3, atol=0)


@pytest.mark.parametrize("bt", IQ4, ids=lambda bt: bt.name)
def test_mirrored_weights_get_mirrored_scales(bt):
    # the search has no sign bias: -w gets -d (and the same sub-block scales), and decodes to -decode(w)
    w = weights("student_t", 8, bt.block, seed=5)
    imp = importances("random", w, seed=5)
    p, q = bt.fit(w, imp), bt.fit(-w, imp)
    assert torch.equal(q.d, -p.d)
    if bt.name == "IQ4_XS":
        assert torch.equal(q.scales, p.scales) and int(p.scales.min()) < 0 < int(p.scales.max())
    assert torch.equal(bt.decode(bt.quantize_blocks(-w, imp)), -bt.decode(bt.quantize_blocks(w, imp)))


# lowbit's error / the max-abs choice's, 256 super-blocks (measured, then a small allowance):
# (type, distribution, weighted) -> the ratio the search must stay under.
RATIO_LIMIT = {
    ("IQ4_NL", "gauss", False): 0.86, ("IQ4_NL", "gauss", True): 0.82,
    ("IQ4_NL", "student_t", False): 0.93, ("IQ4_NL", "student_t", True): 0.89,
    ("IQ4_XS", "gauss", False): 0.87, ("IQ4_XS", "gauss", True): 0.83,
    ("IQ4_XS", "student_t", False): 0.94, ("IQ4_XS", "student_t", True): 0.90,
}


@pytest.mark.parametrize("weighted", [False, True], ids=["mse", "weighted"])
@pytest.mark.parametrize("dist", ["gauss", "student_t"])
@pytest.mark.parametrize("bt", IQ4, ids=lambda bt: bt.name)
def test_the_search_beats_the_max_abs_scale(bt, dist, weighted):
    w = weights(dist, 65536 // bt.block, bt.block, seed=7)
    imp = importances("random" if weighted else "none", w, seed=7)
    q = torch.ones_like(w) if imp is None else imp
    ours = bt.decode(bt.quantize_blocks(w, imp))
    params = max_abs_params(bt, w)
    plain = bt.decode(bt.encode(params, bt.nearest(bt.table(params), w)[0]))
    ratio = float((q * (w - ours).square()).sum() / (q * (w - plain).square()).sum())
    assert ratio < RATIO_LIMIT[bt.name, dist, weighted], (bt.name, dist, weighted, ratio)
