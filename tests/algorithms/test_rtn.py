"""Round-to-nearest: the clipping search's factors, handed back, reproduce its codes exactly
(the budget allocator searches once per layer and level and re-quantizes from them)."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lowbit.algorithms.rtn import rtn_quantize, rtn_shrink
from lowbit.budget.sensitivity import ShrinkStore
from lowbit.qtensor import QuantFormat
from lowbit.recipes import ClipConfig, IntegerScaleConfig

F3 = QuantFormat(3, 32, False)


@settings(max_examples=25, deadline=None)
@given(bits=st.integers(2, 8), group=st.sampled_from([16, 32, 64, -1]), symmetric=st.booleans(),
       iscale=st.booleans(), seed=st.integers(0, 2**16))
def test_the_searched_shrink_reproduces_the_codes_exactly(bits, group, symmetric, iscale, seed):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(12, 96, generator=g) * torch.rand(12, 1, generator=g)
    w[0, 3] = 8.0  # an outlier, so the search clips somewhere
    clip = ClipConfig(grid=10)
    isc = IntegerScaleConfig(enabled=iscale)
    fmt = QuantFormat.resolved(w.shape[1], bits, group, symmetric, isc.bits if isc.enabled else 0)
    searched = rtn_quantize(w, fmt, clip)
    shrink = rtn_shrink(w, fmt, clip)
    assert shrink is not None
    again = rtn_quantize(w, fmt, clip, shrink)
    assert torch.equal(again.codes, searched.codes)
    assert torch.equal(again.dequantize(), searched.dequantize())


def test_the_search_clips_an_outlier_group():
    w = torch.randn(4, 64, generator=torch.Generator().manual_seed(0))
    w[1, 5] = 30.0
    shrink = rtn_shrink(w, F3, clip=ClipConfig())
    assert shrink[1, 0] < 1
    assert torch.equal(rtn_quantize(w, F3, None, shrink).codes, rtn_quantize(w, F3, ClipConfig()).codes)


def test_no_clip_means_no_shrink():
    w = torch.randn(4, 64)
    assert rtn_shrink(w, F3, clip=None) is None
    assert rtn_shrink(w, F3, clip=ClipConfig(enabled=False)) is None


@pytest.mark.parametrize("distinct", [3, 256, 300])
def test_the_shrink_store_returns_what_it_was_given(distinct):
    shrink = torch.rand(distinct).repeat(5)[torch.randperm(5 * distinct)].reshape(5, distinct)
    store = ShrinkStore()
    store.put("a", 1, shrink)
    store.put("b", 0, None)
    assert ("a", 1) in store and ("a", 0) not in store
    assert torch.equal(store.get("a", 1), shrink)
    assert store.get("b", 0) is None


@pytest.mark.parametrize("bits,gs,symmetric,clip", [(4, 32, False, True), (8, 64, True, True), (3, 48, False, False)])
def test_rtn_in_row_blocks_equals_rtn_in_one_piece(monkeypatch, bits, gs, symmetric, clip):
    """A large weight is rounded a block of rows at a time (bounded temporaries): the same record."""
    from lowbit.algorithms import rtn

    w = torch.randn(37, 96, generator=torch.Generator().manual_seed(bits)) * torch.logspace(-1, 1, 96)
    fmt = QuantFormat.resolved(96, bits, gs, symmetric)
    cfg = ClipConfig() if clip else None
    whole = rtn.rtn_quantize(w, fmt, cfg)
    monkeypatch.setattr(rtn, "ROW_BLOCK_VALUES", 5 * 96)  # blocks of 5 rows, the last one of 2
    pieces = rtn.rtn_quantize(w, fmt, cfg)
    for key, t in whole.packed().items():
        assert torch.equal(pieces.packed()[key], t), key
