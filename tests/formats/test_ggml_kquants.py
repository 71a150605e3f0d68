"""llama.cpp's K quants (Q2_K ... Q6_K): lowbit's bytes decode bit for bit as gguf-py (llama.cpp's
own Python reference) decodes them, the table is exactly what the decoder computes, and the
weighted scale search beats a plain min/max encoder by a measured margin."""

import gguf
import numpy as np
import pytest
import torch
from gguf.quants import dequantize
from hypothesis import given, settings
from hypothesis import strategies as st

from lowbit.formats.ggml import BLOCK_TYPES
from lowbit.formats.ggml.base import BlockType
from lowbit.formats.ggml.kquants import TYPES
from lowbit.formats.ggml.kquants_search import KFit, to_f16

NAMES = [bt.name for bt in TYPES]
F16_FIELDS = {"Q2_K": (80, 82), "Q3_K": (108,), "Q4_K": (0, 2), "Q5_K": (0, 2), "Q6_K": (208,)}
KINDS = ["gauss", "student_t", "zeros", "constant", "outliers", "huge", "tiny", "shifted", "sparse"]


def weights(kind: str, n: int, seed: int) -> torch.Tensor:
    """[n, 256] weights of one distribution."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, 256, generator=g) * 0.02
    if kind == "student_t":                                          # 3 degrees of freedom
        w = w / torch.randn(3, n, 256, generator=g).pow(2).mean(0).sqrt()
    elif kind == "zeros":
        w = torch.zeros(n, 256)
    elif kind == "constant":
        w = torch.full((n, 256), 0.013) * torch.randn(n, 1, generator=g).sign()
    elif kind == "outliers":
        w[:, ::37] *= 50
    elif kind == "huge":
        w = w * 1e7
    elif kind == "tiny":
        w = w * 1e-6
    elif kind == "shifted":
        w = w + 0.05
    elif kind == "sparse":
        w = w * (torch.rand(n, 256, generator=g) < 0.1)
    return w


def importance(n: int, seed: int, holes: bool = False) -> torch.Tensor:
    """Random positive importance, spread over two orders of magnitude; with holes, also zero on
    every third weight and on whole sub-blocks."""
    g = torch.Generator().manual_seed(seed + 1)
    imp = torch.rand(n, 256, generator=g) ** 2 * 10 + 0.01
    if holes:
        imp[:, ::3] = 0
        imp[:, 32:64] = 0
    return imp


def random_bytes(bt: BlockType, n: int, seed: int) -> torch.Tensor:
    """Random bytes, with every float16 field set to a random finite value."""
    g = torch.Generator().manual_seed(seed)
    data = torch.randint(0, 256, (n, bt.type_size), generator=g, dtype=torch.uint8)
    for at in F16_FIELDS[bt.name]:
        f = torch.randn(n, generator=g) * 10.0 ** torch.randint(-6, 4, (n,), generator=g)
        data[:, at:at + 2] = to_f16(f).reshape(-1, 1).view(torch.uint8)
    return data


def gguf_decode(bt: BlockType, data: torch.Tensor) -> torch.Tensor:
    return torch.from_numpy(dequantize(data.numpy(), gguf.GGMLQuantizationType[bt.name]))


def random_params(bt: BlockType, n: int, seed: int) -> KFit:
    g = torch.Generator().manual_seed(seed)
    gr = bt.grid
    s = bt.block // bt.sub
    d = to_f16(torch.randn(n, generator=g) * 10.0 ** torch.randint(-7, 3, (n,), generator=g))
    sc = torch.randint(gr.sc_lo, gr.sc_hi + 1, (n, s), generator=g, dtype=torch.int16)
    if not gr.has_min:
        return KFit(d, torch.zeros_like(d), sc, torch.zeros_like(sc))
    dmin = to_f16(torch.randn(n, generator=g) * 10.0 ** torch.randint(-7, 3, (n,), generator=g))
    return KFit(d, dmin, sc, torch.randint(0, gr.m_hi + 1, (n, s), generator=g, dtype=torch.int16))


def test_the_registry_holds_the_k_quants_with_llama_cpp_sizes():
    for bt in TYPES:
        assert BLOCK_TYPES[bt.name] is bt
        block, size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[bt.name]]
        assert (bt.block, bt.type_size) == (block, size)
        assert bt.n_levels == bt.grid.nmax + 1


@settings(max_examples=25, deadline=None)
@given(name=st.sampled_from(NAMES), n=st.integers(1, 40), kind=st.sampled_from(KINDS), seed=st.integers(0, 10**6),
       holes=st.booleans())
def test_lowbit_bytes_decode_as_gguf_and_as_the_table(name, n, kind, seed, holes):
    bt = BLOCK_TYPES[name]
    w = weights(kind, n, seed)
    params = bt.fit(w, importance(n, seed, holes))
    table = bt.table(params)
    codes, values = bt.nearest(table, w)
    data = bt.encode(params, codes)
    assert data.dtype == torch.uint8 and data.shape == (n, bt.type_size)
    out = bt.decode(data)
    assert torch.equal(out, values)                                  # decode(encode(p, c)) == table at c
    assert torch.equal(out, gguf_decode(bt, data))                   # bit for bit, gguf-py's decoder
    assert (codes.int() < bt.n_levels).all() and torch.isfinite(out).all()


@settings(max_examples=25, deadline=None)
@given(name=st.sampled_from(NAMES), n=st.integers(1, 30), seed=st.integers(0, 10**6))
def test_random_bytes_decode_as_gguf_and_encode_back(name, n, seed):
    bt = BLOCK_TYPES[name]
    data = random_bytes(bt, n, seed)
    out = bt.decode(data)
    assert np.array_equal(out.numpy(), gguf_decode(bt, data).numpy())
    f = type(bt).unpack(data)                                        # every bit is a field: bytes come back
    zeros = torch.zeros(n, dtype=torch.float16)
    params = KFit(f.d, zeros if f.dmin is None else f.dmin, f.sc, torch.zeros_like(f.sc) if f.m is None else f.m)
    assert torch.equal(bt.encode(params, f.codes), data)


@settings(max_examples=25, deadline=None)
@given(name=st.sampled_from(NAMES), n=st.integers(1, 30), seed=st.integers(0, 10**6))
def test_decode_of_encode_is_the_table_at_the_codes(name, n, seed):
    bt = BLOCK_TYPES[name]
    params = random_params(bt, n, seed)
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, bt.n_levels, (n, bt.block), generator=g, dtype=torch.uint8)
    data = bt.encode(params, codes)
    expect = bt.table(params).gather(-1, codes.reshape(n, -1, bt.sub).long()).reshape(n, -1)
    assert torch.equal(bt.decode(data), expect)
    assert torch.equal(bt.decode(data), gguf_decode(bt, data))


@settings(max_examples=30, deadline=None)
@given(name=st.sampled_from(NAMES), n=st.integers(1, 20), seed=st.integers(0, 10**6),
       spread=st.sampled_from([1e-3, 1.0, 1e3]))
def test_the_fast_nearest_is_the_reference_nearest(name, n, seed, spread):
    bt = BLOCK_TYPES[name]
    params = random_params(bt, n, seed)
    params.sc[:, ::5] = 0                                            # sub-blocks of equal values
    table = bt.table(params)
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, bt.block, generator=g) * spread
    c = torch.randint(0, bt.n_levels - 1, (n, bt.block // bt.sub, bt.sub), generator=g)
    exact = table.gather(-1, c).reshape(n, -1)                       # on a value, and on a midpoint
    mid = ((table.gather(-1, c) + table.gather(-1, c + 1)) / 2).reshape(n, -1)
    pick = torch.randint(0, 3, (n, bt.block), generator=g)
    w = torch.where(pick == 0, exact, torch.where(pick == 1, mid, w))
    fast = bt.nearest(table, w)
    ref = BlockType.nearest(bt, table, w)
    assert torch.equal(fast[0], ref[0]) and torch.equal(fast[1], ref[1])


def baseline(bt: BlockType, w: torch.Tensor) -> torch.Tensor:
    """The plain encoder: min/max per sub-block gives (scale, min); d = largest scale / top integer,
    dmin likewise; sub-scales and mins rounded; codes rounded to nearest. -> decoded [N, 256]."""
    g, n = bt.grid, w.shape[0]
    x = w.reshape(n, -1, bt.sub)

    def ints(s, top, lo, hi):
        dd = to_f16(s.gather(-1, s.abs().argmax(-1, keepdim=True)).squeeze(-1) / top)
        q = torch.where(dd[:, None] != 0, s / dd.float()[:, None], 0.0).round().clamp(lo, hi)
        return dd, q.to(torch.int16)
    if g.has_min:
        lo = x.amin(-1).clamp(max=0.0)
        d, sc = ints((x.amax(-1) - lo) / g.nmax, g.sc_hi, 0, g.sc_hi)
        dmin, m = ints(-lo, g.m_hi, 0, g.m_hi)
    else:                                                            # the largest weight at code 0
        big = x.gather(-1, x.abs().argmax(-1, keepdim=True)).squeeze(-1)
        d, sc = ints(big / -g.zero, g.sc_lo, g.sc_lo, g.sc_hi)
        dmin, m = torch.zeros_like(d), torch.zeros_like(sc)
    params = KFit(d, dmin, sc, m)
    return bt.decode(bt.encode(params, bt.nearest(bt.table(params), w)[0]))


# lowbit / baseline weighted squared error, measured on 512 super-blocks (seed 0):
# (gauss + importance, gauss MSE, student-t + importance, student-t MSE)
MEASURED = {"Q2_K": (0.487, 0.620, 0.439, 0.570), "Q3_K": (0.725, 0.857, 0.767, 0.911),
            "Q4_K": (0.658, 0.778, 0.679, 0.803), "Q5_K": (0.674, 0.791, 0.700, 0.812),
            "Q6_K": (0.632, 0.768, 0.741, 0.853)}


@pytest.mark.parametrize("name", NAMES)
def test_the_search_beats_plain_min_max_by_a_margin(name):
    bt = BLOCK_TYPES[name]
    n = 512
    ratios = []
    for kind in ("gauss", "student_t"):
        w = weights(kind, n, 0)
        for imp in (importance(n, 0), torch.ones(n, 256)):
            ours = bt.decode(bt.quantize_blocks(w, imp))
            ratios.append(float((imp * (w - ours) ** 2).sum() / (imp * (w - baseline(bt, w)) ** 2).sum()))
    assert all(r < m + 0.01 for r, m in zip(ratios, MEASURED[name])), ratios


@pytest.mark.parametrize("name", NAMES)
def test_degenerate_blocks(name):
    bt = BLOCK_TYPES[name]
    assert bt.decode(bt.quantize_blocks(torch.zeros(0, 256))).shape == (0, 256)
    zeros = torch.zeros(3, 256)
    assert torch.equal(bt.decode(bt.quantize_blocks(zeros)), zeros)
    const = torch.full((2, 256), -0.37)
    const[1] = 0.37
    assert (bt.decode(bt.quantize_blocks(const)) - const).abs().max() < 1e-3 * 0.37
    one = torch.zeros(1, 256)
    one[0, 100] = 5.0                                                # a lone outlier is kept
    assert abs(float(bt.decode(bt.quantize_blocks(one))[0, 100]) - 5.0) < 0.01
    w = weights("gauss", 3, 2)                                       # no importance at all: plain MSE
    assert torch.equal(bt.quantize_blocks(w, torch.zeros(3, 256)), bt.quantize_blocks(w))
    for scale in (1e9, 1e-12):                                       # past float16's range
        out = bt.decode(bt.quantize_blocks(weights("gauss", 4, 1) * scale))
        assert torch.isfinite(out).all()
