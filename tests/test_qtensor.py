"""QuantizedWeight with mixed widths per group: packing round trips bit-exactly, sizes are what
is stored, bad widths are refused."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lowbit.errors import ShapeError
from lowbit.formats import affine
from lowbit.qtensor import QuantFormat, QuantizedWeight


def random_mixed(out, n_in, gs, symmetric, seed):
    g = torch.Generator().manual_seed(seed)
    G = affine.n_groups(n_in, gs)
    gb = torch.randint(1, 9, (G,), generator=g).to(torch.uint8)
    col_bits = gb[torch.arange(n_in) // gs].long()
    codes = (torch.rand(out, n_in, generator=g) * (2 ** col_bits).float()).floor().to(torch.uint8)
    zeros = None
    if not symmetric:
        zeros = (torch.rand(out, G, generator=g) * (2 ** gb.long()).float()).floor().to(torch.uint8)
    scales = (torch.rand(out, G, generator=g) + 0.01).half()
    return QuantizedWeight(codes, scales, zeros, QuantFormat(int(gb.max()), gs, symmetric), group_bits=gb)


@settings(max_examples=40, deadline=None)
@given(out=st.integers(1, 9), n_in=st.integers(1, 80), gs=st.integers(1, 40), symmetric=st.booleans(),
       seed=st.integers(0, 10_000))
def test_mixed_width_pack_round_trip(out, n_in, gs, symmetric, seed):
    gs = min(gs, n_in)
    qw = random_mixed(out, n_in, gs, symmetric, seed)
    packed = qw.packed()
    assert qw.nbytes() == sum(t.numel() * t.element_size() for t in packed.values())
    back = QuantizedWeight.from_packed(packed, qw.fmt, qw.shape)
    assert torch.equal(back.codes, qw.codes) and torch.equal(back.group_bits, qw.group_bits)
    assert (back.zeros is None) == symmetric and (symmetric or torch.equal(back.zeros, qw.zeros))
    assert torch.equal(back.dequantize(), qw.dequantize())


def test_symmetric_midpoint_follows_each_groups_width():
    gb = torch.tensor([2, 4], dtype=torch.uint8)
    qw = QuantizedWeight(torch.zeros(1, 8, dtype=torch.uint8), torch.ones(1, 2).half(), None,
                         QuantFormat(4, 4, True), group_bits=gb)
    assert qw.zero_points().tolist() == [[2.0, 8.0]]
    assert qw.average_bits() == 3.0


def test_group_bits_are_validated():
    codes, scales = torch.zeros(2, 8, dtype=torch.uint8), torch.ones(2, 2).half()
    with pytest.raises(ShapeError, match="group_bits.*3"):
        QuantizedWeight(codes, scales, None, QuantFormat(3, 4, True), group_bits=torch.tensor([2, 4], dtype=torch.uint8))
    with pytest.raises(ShapeError, match=r"uint8 \[2\]"):
        QuantizedWeight(codes, scales, None, QuantFormat(3, 4, True), group_bits=torch.tensor([2, 3, 3], dtype=torch.uint8))


@pytest.mark.parametrize("bits,gs,sym,scale_bits", [(4, 32, False, 0), (3, 48, True, 0), (2, 128, False, 8),
                                                   (8, 100, True, 6)])
def test_format_nbytes_matches_the_packed_tensors(bits, gs, sym, scale_bits):
    from lowbit.algorithms.rtn import rtn_quantize
    from lowbit.qtensor import format_nbytes

    w = torch.randn(13, 200)
    qw = rtn_quantize(w, QuantFormat(bits, gs, sym, scale_bits))
    assert format_nbytes(13, 200, qw.fmt) == qw.nbytes() == sum(
        t.numel() * t.element_size() for t in qw.packed().values())
