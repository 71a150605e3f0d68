import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lowbit.errors import ShapeError
from lowbit.formats import affine


def _w(out, n, seed=0):
    return torch.randn(out, n, generator=torch.Generator().manual_seed(seed))


@settings(max_examples=40, deadline=None)
@given(bits=st.integers(2, 8), sym=st.booleans(), groups=st.integers(1, 5), gs=st.sampled_from([1, 3, 8, 32]),
       extra=st.integers(0, 7), out=st.integers(1, 7), seed=st.integers(0, 1000))
def test_round_trip_error_within_half_step(bits, sym, groups, gs, extra, out, seed):
    n = groups * gs + (extra % gs if gs > 1 else 0)  # a short last group when extra > 0
    w = _w(out, n, seed)
    codes, scale, zero = affine.quantize(w, bits, gs, sym)
    assert codes.shape == w.shape and codes.dtype == torch.uint8 and int(codes.max()) < (1 << bits)
    assert scale.shape == (out, -(-n // min(gs, n)))
    wq = affine.dequantize(codes, scale, zero, gs)
    step = scale.repeat_interleave(min(gs, n), dim=1)[:, :n]
    # unclipped RTN: every value within its group's representable range is off by <= half a step
    assert torch.all((w - wq).abs() <= step / 2 + 1e-6 * step + 1e-7)


@pytest.mark.parametrize("bits", range(2, 9))
@pytest.mark.parametrize("sym", [False, True])
def test_values_on_the_grid_are_exact(bits, sym):
    # re-quantizing a dequantized weight with the same params gives the same codes (idempotence)
    w = _w(5, 64)
    codes, scale, zero = affine.quantize(w, bits, 16, sym)
    wq = affine.dequantize(codes, scale, zero, 16)
    codes2 = affine.quantize_groups(affine.group_view(wq, 16), scale, zero, bits).reshape(codes.shape)
    assert torch.equal(codes, codes2)


def test_scales_are_float16_representable():
    _codes, scale, _zero = affine.quantize(_w(4, 128), 4, 32)
    assert torch.equal(scale, scale.half().float())


def test_asymmetric_zero_is_an_integer_in_range():
    _, _, zero = affine.quantize(_w(4, 128) + 3.0, 3, 32)
    assert torch.equal(zero, zero.round()) and zero.min() >= 0 and zero.max() <= 7


def test_per_channel_and_constant_groups():
    w = torch.zeros(3, 10)
    codes, scale, zero = affine.quantize(w, 4, -1)
    assert scale.shape == (3, 1)
    assert torch.equal(affine.dequantize(codes, scale, zero, -1), w)


def test_short_last_group_equals_quantizing_it_alone():
    # documented rule: 96 columns in groups of 64 -> groups of 64 and 32
    w = _w(3, 96)
    codes, scale, zero = affine.quantize(w, 3, 64)
    c1, s1, z1 = affine.quantize(w[:, :64], 3, 64)
    c2, s2, z2 = affine.quantize(w[:, 64:], 3, 32)
    assert torch.equal(codes, torch.cat([c1, c2], 1))
    assert torch.equal(scale, torch.cat([s1, s2], 1)) and torch.equal(zero, torch.cat([z1, z2], 1))
    for sym in (False, True):
        shrink = affine.search_shrink(w, 3, 64, sym)
        assert torch.equal(shrink, torch.cat([affine.search_shrink(w[:, :64], 3, 64, sym),
                                              affine.search_shrink(w[:, 64:], 3, 32, sym)], 1))


def test_non_matrix_is_a_clear_error():
    with pytest.raises(ShapeError, match="2-D"):
        affine.quantize(torch.zeros(2, 3, 4), 4, 2)


def test_clipping_search_never_worse_and_beats_min_max():
    w = _w(64, 256, 1)  # Gaussian rows: min/max ranges waste levels on the tails
    for sym in (False, True):
        plain = affine.dequantize(*affine.quantize(w, 3, 64, sym), 64)
        shrink = affine.search_shrink(w, 3, 64, sym, norm=2.0)
        clipped = affine.dequantize(*affine.quantize(w, 3, 64, sym, shrink), 64)
        e_plain = ((plain - w) ** 2).reshape(64, 4, 64).sum(-1)
        e_clip = ((clipped - w) ** 2).reshape(64, 4, 64).sum(-1)
        assert torch.all(e_clip <= e_plain + 1e-6)
        assert e_clip.sum() < 0.9 * e_plain.sum()
