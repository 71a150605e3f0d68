"""llama.cpp's legacy block types (Q4_0 ... Q8_0): bytes gguf-py reads back bit for bit, tables that
are the decoder's own values, and a scale search that beats gguf-py's reference quantizer."""

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType, quants
from hypothesis import given, settings
from hypothesis import strategies as st

from lowbit.formats.ggml import BLOCK_TYPES, iq4, legacy
from lowbit.formats.ggml.base import BlockType
from lowbit.formats.ggml.search import (
    Levels,
    affine_codes,
    affine_values,
    importance,
    nearest_monotone,
    search_scale_min,
    uniform_guess,
)

LEGACY = legacy.TYPES
SCALAR = (*legacy.TYPES, *iq4.TYPES)  # one scale (and min) per block of 32, or IQ4_XS's 6-bit sub-scales
KINDS = ("gauss", "student_t", "zeros", "constant", "outlier", "tiny", "huge", "mixed")


def weights(kind: str, n: int, block: int, seed: int) -> torch.Tensor:
    """[n, block] float32 weights of one kind of distribution."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, block, generator=g)
    if kind == "student_t":                                     # 3 degrees of freedom: heavy tails
        x = x / (torch.randn(3, n, block, generator=g).square().mean(0)).sqrt()
    elif kind == "zeros":
        x = torch.zeros(n, block)
    elif kind == "constant":
        x = torch.randn(n, 1, generator=g).expand(n, block).contiguous()
    elif kind == "outlier":
        x[:, 3] *= 50
    elif kind == "tiny":
        x = x * 1e-7                                            # scales below float16's normal range
    elif kind == "huge":
        x = x * 1e7                                             # scales above float16's largest value
    elif kind == "mixed":
        x = x * 10 ** (torch.rand(n, 1, generator=g) * 7 - 4)
    return x


def importances(kind: str, w: torch.Tensor, seed: int) -> torch.Tensor | None:
    g = torch.Generator().manual_seed(seed + 1)
    if kind == "none":
        return None
    imp = torch.rand(w.shape, generator=g) * 2 + 0.01
    if kind == "sparse":                                        # zeros, and a whole block of them
        imp = imp * (torch.rand(w.shape, generator=g) < 0.5)
        imp[0] = 0
    return imp


def gguf_decode(bt: BlockType, data: torch.Tensor) -> torch.Tensor:
    out = quants.dequantize(data.numpy(), GGMLQuantizationType[bt.name])
    return torch.from_numpy(np.ascontiguousarray(out)).reshape(-1, bt.block)


def gguf_quantize(bt: BlockType, w: torch.Tensor) -> torch.Tensor:
    return torch.from_numpy(quants.quantize(w.numpy(), GGMLQuantizationType[bt.name]))


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and torch.equal(a.contiguous().view(torch.int32), b.contiguous().view(torch.int32))


def at_codes(table: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    """table [N, S, L] gathered at codes [N, S * sub] -> [N, S * sub]."""
    n, s, _ = table.shape
    return table.gather(2, codes.long().reshape(n, s, -1)).reshape(n, -1)


def random_f16(n: int, rng: np.random.Generator) -> torch.Tensor:
    """n finite float16 values of every kind (zeros, subnormals, the largest), both signs, as float32."""
    bits = rng.integers(0, 0x7C00, n, dtype=np.uint16) | (rng.integers(0, 2, n, dtype=np.uint16) << 15)
    return torch.from_numpy(bits.view(np.float16).astype(np.float32))


def random_params(bt: BlockType, n: int, rng: np.random.Generator):
    if isinstance(bt, legacy._Affine):
        return legacy.ScaleMinParams(random_f16(n, rng), random_f16(n, rng))
    return legacy.ScaleParams(random_f16(n, rng))


def test_the_registry_holds_the_legacy_and_iq4_types_with_llama_cpp_geometry():
    assert iq4.KVALUES == quants.IQ4_NL.kvalues
    for bt in SCALAR:
        assert BLOCK_TYPES[bt.name] is bt
        block, type_size = quants.GGML_QUANT_SIZES[GGMLQuantizationType[bt.name]]
        assert (bt.block, bt.type_size) == (block, type_size)


@settings(max_examples=80, deadline=None)
@given(bt=st.sampled_from(SCALAR), kind=st.sampled_from(KINDS), n=st.integers(1, 5),
       imp_kind=st.sampled_from(["none", "random", "sparse"]), seed=st.integers(0, 10_000))
def test_encoded_blocks_decode_as_gguf_reads_them_and_as_their_table(bt, kind, n, imp_kind, seed):
    w = weights(kind, n, bt.block, seed)
    imp = importances(imp_kind, w, seed)
    params = bt.fit(w, torch.ones_like(w) if imp is None else imp)
    table = bt.table(params)
    codes, values = bt.nearest(table, w)
    data = bt.encode(params, codes)
    assert data.dtype == torch.uint8 and data.shape == (n, bt.type_size)
    assert int(codes.max()) < bt.n_levels
    decoded = bt.decode(data)
    assert same_bits(decoded, gguf_decode(bt, data))
    assert same_bits(decoded, at_codes(table, codes))
    assert same_bits(decoded, values)
    assert torch.isfinite(decoded).all()
    assert torch.equal(bt.quantize_blocks(w, imp), data)


@settings(max_examples=40, deadline=None)
@given(bt=st.sampled_from(LEGACY), n=st.integers(1, 8), seed=st.integers(0, 10_000))
def test_any_scales_and_codes_decode_as_their_table(bt, n, seed):
    rng = np.random.default_rng(seed)
    params = random_params(bt, n, rng)
    codes = torch.from_numpy(rng.integers(0, bt.n_levels, (n, bt.block), dtype=np.uint8))
    data = bt.encode(params, codes)
    assert same_bits(bt.decode(data), at_codes(bt.table(params), codes))
    assert same_bits(bt.decode(data), gguf_decode(bt, data))


@settings(max_examples=40, deadline=None)
@given(bt=st.sampled_from(LEGACY), n=st.integers(1, 8), seed=st.integers(0, 10_000))
def test_random_bytes_decode_as_gguf_reads_them(bt, n, seed):
    rng = np.random.default_rng(seed)
    data = torch.from_numpy(rng.integers(0, 256, (n, bt.type_size), dtype=np.uint8))
    scales = 2 if isinstance(bt, legacy._Affine) else 1                 # d (and m) must be finite
    data[:, :2 * scales] = torch.stack([random_f16(n, rng) for _ in range(scales)], 1).half().view(torch.uint8)
    assert same_bits(bt.decode(data), gguf_decode(bt, data))


def test_q8_0_never_writes_minus_128():
    w = weights("outlier", 256, 32, 0)
    q = BLOCK_TYPES["Q8_0"].quantize_blocks(w)[:, 2:].view(torch.int8)
    assert int(q.min()) >= -127 and int(q.max()) == 127


@pytest.mark.parametrize("bt", LEGACY, ids=lambda bt: bt.name)
def test_empty_zero_and_constant_blocks(bt):
    assert bt.decode(bt.quantize_blocks(torch.zeros(0, bt.block))).shape == (0, bt.block)
    zero = bt.decode(bt.quantize_blocks(torch.zeros(3, 32)))
    assert torch.equal(zero, torch.zeros(3, 32))
    c = torch.tensor([[0.3], [-1e-3], [2e3]]).expand(3, 32)
    assert torch.allclose(bt.decode(bt.quantize_blocks(c)), c, rtol=1e-3, atol=0)


@pytest.mark.parametrize("bt", [t for t in LEGACY if isinstance(t, legacy._Symmetric)], ids=lambda bt: bt.name)
def test_mirrored_weights_get_mirrored_scales(bt):
    # the search has no sign bias: -w gets -d, and decodes to -decode(w)
    w = weights("student_t", 64, 32, seed=5)
    imp = importances("random", w, seed=5)
    assert torch.equal(bt.fit(-w, imp).d, -bt.fit(w, imp).d)
    assert torch.equal(bt.decode(bt.quantize_blocks(-w, imp)), -bt.decode(bt.quantize_blocks(w, imp)))


@settings(max_examples=60, deadline=None)
@given(bt=st.sampled_from(LEGACY), n=st.integers(1, 6), seed=st.integers(0, 10_000),
       spread=st.sampled_from([0.0, 0.5, 1.0, 3.0]))
def test_nearest_is_the_reference_nearest_bit_for_bit(bt, n, seed, spread):
    rng = np.random.default_rng(seed)
    params = random_params(bt, n, rng)
    if isinstance(bt, legacy._Affine) and seed % 3 == 0:              # steps below m's precision: ties
        params = legacy.ScaleMinParams(params.d * 1e-4, params.m)
    table = bt.table(params)
    # weights on the table's values, on its midpoints, and between them
    k = torch.from_numpy(rng.integers(0, bt.n_levels - 1, (n, 1, bt.block)))
    lo, hi = table.gather(2, k), table.gather(2, k + 1)
    t = torch.from_numpy(rng.random((n, 1, bt.block), dtype=np.float32)) * spread
    w = (lo + (hi - lo) * torch.where(torch.from_numpy(rng.random((n, 1, bt.block))) < 0.3, 0.5, t)).reshape(n, -1)
    codes, values = bt.nearest(table, w)
    ref_codes, ref_values = BlockType.nearest(bt, table, w)
    assert torch.equal(codes, ref_codes)
    assert same_bits(values, ref_values)


def test_nearest_handles_a_repeated_value_and_a_descending_row():
    table = torch.tensor([[[1.0, 2.0, 2.0, 2.0, 3.0]], [[4.0, 3.0, 2.0, 1.0, 0.0]]])
    w = torch.tensor([[2.0, 2.4, 1.5, 9.0], [2.5, 0.5, -1.0, 3.2]])
    codes, _ = nearest_monotone(table, w, uniform_guess(table, w))
    assert codes.tolist() == [[1, 1, 0, 4], [1, 3, 4, 1]]


def test_levels_round_to_the_nearest_level():
    levels = Levels.of([-10, -3, 0, 1, 7])
    y = torch.tensor([-50.0, -6.6, -6.4, -1.6, -1.4, 0.4, 0.6, 3.9, 4.1, 50.0])
    assert levels.snap(y.clone()).tolist() == [-10, -10, -3, -3, 0, 0, 1, 1, 7, 7]
    assert Levels.integers(-8, 7).snap(y.clone()).tolist() == [-8, -7, -6, -2, -1, 0, 1, 4, 4, 7]


def test_importance_counts_every_weight_of_a_block_without_any():
    imp = torch.tensor([[0.0, 0.0], [-1.0, 2.0]])
    assert importance(imp).tolist() == [[1.0, 1.0], [0.0, 2.0]]


def test_the_min_can_be_bounded_and_the_error_reported_is_the_decoded_one():
    w = weights("gauss", 256, 32, seed=2).abs() + 1                     # every block's min is above 0
    imp = importances("random", w, seed=2)
    d, m, err = search_scale_min(w, imp, 15, legacy.SPAN)
    d0, m0, err0 = search_scale_min(w, imp, 15, legacy.SPAN, m_max=0.0)
    assert (m > 0).all() and (m0 <= 0).all()
    assert err.sum() < 0.7 * err0.sum()                                 # the bound costs accuracy here
    for dd, mm, ee in ((d, m, err), (d0, m0, err0)):                    # the codes the search saw, or better
        decoded = affine_values(dd, mm, affine_codes(w, dd, mm, 15))
        assert ((imp * (w - decoded).square()).sum(-1) <= ee * (1 + 1e-6)).all()


# lowbit's error / gguf-py's reference quantizer's, 2048 blocks (measured, then a small allowance):
# (type, distribution, weighted) -> the ratio the search must stay under.
RATIO_LIMIT = {
    ("Q4_0", "gauss", False): 0.90, ("Q4_0", "gauss", True): 0.86,
    ("Q4_0", "student_t", False): 0.95, ("Q4_0", "student_t", True): 0.91,
    ("Q4_1", "gauss", False): 0.85, ("Q4_1", "gauss", True): 0.81,
    ("Q4_1", "student_t", False): 0.85, ("Q4_1", "student_t", True): 0.81,
    ("Q5_0", "gauss", False): 0.90, ("Q5_0", "gauss", True): 0.86,
    ("Q5_0", "student_t", False): 0.96, ("Q5_0", "student_t", True): 0.94,
    ("Q5_1", "gauss", False): 0.85, ("Q5_1", "gauss", True): 0.81,
    ("Q5_1", "student_t", False): 0.85, ("Q5_1", "student_t", True): 0.81,
    ("Q8_0", "gauss", False): 0.80, ("Q8_0", "gauss", True): 0.76,
    ("Q8_0", "student_t", False): 0.88, ("Q8_0", "student_t", True): 0.86,
}


@pytest.mark.parametrize("weighted", [False, True], ids=["mse", "weighted"])
@pytest.mark.parametrize("dist", ["gauss", "student_t"])
@pytest.mark.parametrize("bt", LEGACY, ids=lambda bt: bt.name)
def test_the_search_beats_the_gguf_reference_quantizer(bt, dist, weighted):
    w = weights(dist, 2048, 32, seed=7)
    imp = importances("random" if weighted else "none", w, seed=7)
    q = torch.ones_like(w) if imp is None else imp
    ours = bt.decode(bt.quantize_blocks(w, imp))
    reference = gguf_decode(bt, gguf_quantize(bt, w))
    ratio = float((q * (w - ours).square()).sum() / (q * (w - reference).square()).sum())
    assert ratio < RATIO_LIMIT[bt.name, dist, weighted], (bt.name, dist, weighted, ratio)
