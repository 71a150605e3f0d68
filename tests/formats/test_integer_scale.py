"""Integer Scale: group scales on a per-row integer grid, stored bit-exactly, at a small and
bounded accuracy cost against float16 scales."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lowbit.algorithms.gptq import gptq_quantize
from lowbit.algorithms.rtn import rtn_quantize
from lowbit.errors import ConfigError
from lowbit.formats import integer_scale
from lowbit.qtensor import QuantFormat, QuantizedWeight
from lowbit.recipes import ClipConfig


@settings(max_examples=50, deadline=None)
@given(bits=st.integers(2, 8), mode=st.sampled_from(["max", "pow2"]), seed=st.integers(0, 1000))
def test_round_scale_is_an_integer_multiple_at_least_the_scale(bits, mode, seed):
    g = torch.Generator().manual_seed(seed)
    scales = torch.rand(6, 9, generator=g) * 10 ** torch.empty(6, 1).uniform_(-4, 1, generator=g)
    mult = integer_scale.row_multiplier(scales, bits, mode)
    r = integer_scale.round_scale(scales, mult[:, None], bits)
    k = integer_scale.integer_codes(r, mult[:, None])
    assert (r >= scales * (1 - 1e-6)).all()                       # never shrinks a range
    assert ((k >= 1) & (k.int() <= (1 << bits) - 1)).all()
    assert torch.equal(k.float() * mult[:, None], r)              # exactly k * mult
    if mode == "pow2":
        assert torch.equal(torch.log2(mult), torch.log2(mult).round())


def test_bad_scale_bits_and_multiplier():
    with pytest.raises(ConfigError, match="2..8"):
        integer_scale.row_multiplier(torch.ones(1, 1), 9)
    with pytest.raises(ConfigError, match="pow2"):
        integer_scale.row_multiplier(torch.ones(1, 1), 8, "log")


@pytest.mark.parametrize("bits,gs", [(4, 32), (3, 128), (2, 64)])
def test_rtn_with_integer_scales_round_trips_and_costs_little(bits, gs):
    g = torch.Generator().manual_seed(0)
    w = torch.randn(64, 256, generator=g) * 0.02
    w[:, :3] *= 10
    ref = rtn_quantize(w, QuantFormat(bits, gs, False), clip=ClipConfig())
    q = rtn_quantize(w, QuantFormat(bits, gs, False, scale_bits=8), clip=ClipConfig())
    assert q.scales.dtype == torch.uint8 and q.fmt.scale_bits == 8
    # the stored integers times the row multiplier are the scales the codes were computed with
    back = QuantizedWeight.from_packed(q.packed(), q.fmt, q.shape)
    assert torch.equal(back.dequantize(), q.dequantize())
    e_int = float((q.dequantize() - w).pow(2).mean())
    e_fp = float((ref.dequantize() - w).pow(2).mean())
    assert e_int < 1.05 * e_fp
    # one byte per group instead of two, plus a float32 multiplier per row
    out, n_groups = q.scales.shape
    assert q.nbytes() == ref.nbytes() - out * n_groups + 4 * out


def test_coarse_integer_scales_cost_accuracy():
    # 3-bit integer scales cannot follow the spread of group scales within a row: error grows
    g = torch.Generator().manual_seed(1)
    w = torch.randn(64, 256, generator=g) * torch.exp(torch.randn(1, 256, generator=g))
    fine = rtn_quantize(w, QuantFormat(4, 16, False, scale_bits=8))
    coarse = rtn_quantize(w, QuantFormat(4, 16, False, scale_bits=3))
    err = lambda q: float((q.dequantize() - w).pow(2).mean())
    assert err(coarse) > 1.1 * err(fine)


def test_gptq_with_integer_scales_keeps_every_scale_on_the_grid():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(512, 128, generator=g)
    w = torch.randn(48, 128, generator=g) * 0.05
    H = 2 * x.T @ x / 512
    res = gptq_quantize(w, H, QuantFormat(3, 32, False, scale_bits=8))
    qw = res.qweight
    assert qw.scale_mult is not None and qw.scales.dtype == torch.uint8 and int(qw.scales.min()) >= 1
    plain = gptq_quantize(w, H, QuantFormat(3, 32, False)).qweight
    err = lambda q: float((x @ (q.dequantize() - w).T).pow(2).mean())
    assert err(qw) < 1.1 * err(plain)
