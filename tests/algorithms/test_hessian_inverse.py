"""inverse_hessian_cholesky runs its chain in place on one copy of H; the plain chain (a copy per
step, dead columns set to 1 first) is its reference, bit for bit."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lowbit.algorithms.gptq import (
    DAMP_ESCALATION,
    gptq_quantize,
    inverse_hessian_cholesky,
    transpose_square_,
)
from lowbit.calibration.hessian import HessianAccumulator
from lowbit.qtensor import QuantFormat


def plain_chain(H: torch.Tensor, damp: float) -> tuple[torch.Tensor, float]:
    """The obvious version: fix dead columns on a clone, then clone, damp, factor, invert, factor."""
    H = H.clone()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1.0
    mean_diag = torch.mean(torch.diag(H)).item()
    if not mean_diag > 0:
        mean_diag = 1.0
    for mult in DAMP_ESCALATION:
        Hd = H.clone()
        Hd.diagonal().add_(damp * mult * mean_diag)
        L, info = torch.linalg.cholesky_ex(Hd)
        if info == 0:
            U, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(L), upper=True)
            if info == 0 and bool(torch.isfinite(U).all()):
                return U, damp * mult
    return torch.eye(H.shape[0]), float("inf")


def accumulated_hessian(n: int, tokens: int, seed: int, dead: int = 0) -> torch.Tensor:
    """H as calibration builds it (upper blocks mirrored: not exactly symmetric in its last bits
    in general), with `dead` input columns that never fire."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, n, generator=g) * torch.logspace(-1, 1, n)
    x[:, torch.randperm(n, generator=g)[:dead]] = 0
    acc = HessianAccumulator(n)
    acc.add(x)
    return acc.H


@settings(max_examples=25, deadline=None)
@given(n=st.integers(1, 1100), seed=st.integers(0, 2**16), dead=st.integers(0, 5),
       damp=st.sampled_from([0.0, 0.01, 0.1]))
def test_in_place_chain_equals_the_plain_one_bit_for_bit(n, seed, dead, damp):
    H = accumulated_hessian(n, tokens=max(8, n // 3), seed=seed, dead=min(dead, n - 1))
    before = H.clone()
    U, d = inverse_hessian_cholesky(H, damp)
    U_ref, d_ref = plain_chain(H, damp)
    assert d == d_ref
    assert U.is_contiguous() and torch.equal(U, U_ref)
    assert torch.equal(H, before)  # the caller's H is read, not written


def test_escalation_and_fallback_match_the_plain_chain():
    H = accumulated_hessian(96, tokens=400, seed=3)
    H[0, 0] = -0.1 * torch.diag(H).mean()  # negative curvature: the first damp fails
    U, d = inverse_hessian_cholesky(H, 0.01)
    U_ref, d_ref = plain_chain(H, 0.01)
    assert d == d_ref > 0.01 and torch.equal(U, U_ref)
    nan = H.clone()
    nan[5, 7] = nan[7, 5] = float("nan")
    U, d = inverse_hessian_cholesky(nan, 0.01)
    assert d == float("inf") and torch.equal(U, torch.eye(96))


@pytest.mark.parametrize("n,block", [(1, 4), (7, 3), (12, 4), (1030, 512)])
def test_transpose_square_in_place(n, block):
    m = torch.randn(n, n)
    expected = m.T.clone()
    assert transpose_square_(m, block) is m and torch.equal(m, expected)


def test_gptq_on_dead_columns_leaves_them_zero_and_h_untouched():
    H = accumulated_hessian(64, tokens=256, seed=1, dead=3)
    dead = torch.diag(H) == 0
    w = torch.randn(16, 64)
    before = H.clone()
    q = gptq_quantize(w, H, QuantFormat.resolved(64, 4, 32, False)).qweight.dequantize()
    assert torch.equal(H, before)
    assert dead.sum() == 3 and torch.equal(q[:, dead], torch.zeros_like(q[:, dead]))  # dead columns: zeros
