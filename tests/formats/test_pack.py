import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lowbit.errors import ConfigError, ShapeError
from lowbit.formats import pack


@settings(max_examples=60, deadline=None)
@given(bits=st.integers(1, 8), rows=st.integers(1, 4), n=st.integers(1, 37), seed=st.integers(0, 2**16))
def test_pack_matches_bit_by_bit_reference_and_round_trips(bits, rows, n, seed):
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 1 << bits, (rows, n), generator=g, dtype=torch.uint8)
    fast = pack.pack(codes, bits)
    ref = pack.pack_reference(codes, bits)
    assert torch.equal(fast, ref)
    assert fast.shape == (rows, pack.packed_length(n, bits))
    assert torch.equal(pack.unpack(fast, bits, n), codes)
    assert torch.equal(pack.unpack_reference(ref, bits, n), codes)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_packed_size_is_bits_per_code(bits):
    codes = torch.zeros(3, 64, dtype=torch.uint8)
    assert pack.pack(codes, bits).numel() == 3 * 64 * bits // 8


def test_extreme_codes_survive():
    for bits in range(1, 9):
        codes = torch.full((2, 16), (1 << bits) - 1, dtype=torch.uint8)
        assert torch.equal(pack.unpack(pack.pack(codes, bits), bits, 16), codes)


def test_pack_rejects_out_of_range_codes_and_bad_bits():
    with pytest.raises(ShapeError, match="exceeds the 3-bit range"):
        pack.pack(torch.tensor([[8]], dtype=torch.uint8), 3)
    with pytest.raises(ShapeError, match="uint8"):
        pack.pack(torch.tensor([[1]], dtype=torch.int32), 3)
    with pytest.raises(ConfigError, match="bits=9"):
        pack.pack(torch.tensor([[1]], dtype=torch.uint8), 9)


def test_unpack_rejects_wrong_length():
    with pytest.raises(ShapeError, match="do not hold"):
        pack.unpack(torch.zeros(1, 5, dtype=torch.uint8), 4, 16)
