"""SliM-LLM mixed precision: exact budgets, salience ranking, and mixed widths beating uniform
GPTQ at the same average width on a layer whose column groups differ in importance."""

import math

import pytest
import torch

from lowbit.algorithms.gptq import gptq_quantize
from lowbit.algorithms.slim import (allocate_bits, group_error_table, group_salience, hessian_inverse_diagonal,
                                    slim_quantize, width_range)
from lowbit.recipes import ClipConfig, GPTQConfig


def salient_layer(seed=0, n=2048, d_in=256, d_out=96, gs=32):
    """Inputs whose column groups have very different energy (a few groups carry most of it)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d_in, generator=g)
    energy = torch.exp(torch.randn(d_in // gs, generator=g) * 1.2).repeat_interleave(gs)
    x = x * energy
    w = torch.randn(d_out, d_in, generator=g) * 0.05
    H = 2 * x.T @ x / n
    return w, H, x


def out_err(x, w, q):
    return float((x @ (q - w).T).pow(2).mean())


@pytest.mark.parametrize("avg", [2, 2.5, 3])
def test_allocation_meets_the_budget_exactly(avg):
    w, H, _ = salient_layer()
    G = 8
    lo, hi = width_range(avg)
    sal = group_salience(w, hessian_inverse_diagonal(H, 0.01), 32)
    table = group_error_table(w, H, 32, list(range(lo, hi + 1)))
    alloc = allocate_bits(sal, table, avg)
    assert int(alloc.group_bits.sum()) == math.floor(avg * G)
    assert lo <= int(alloc.group_bits.min()) and int(alloc.group_bits.max()) <= hi
    assert alloc.error <= alloc.base_error
    # wider groups are never less salient than narrower ones (the allocation follows the ranking)
    order = torch.argsort(sal, descending=True)
    assert torch.all(alloc.group_bits[order][:-1] >= alloc.group_bits[order][1:])


def test_width_ranges():
    assert width_range(2) == (1, 3) and width_range(3) == (2, 4) and width_range(2.5) == (1, 4)


@pytest.mark.parametrize("avg", [2, 3])
def test_slim_beats_uniform_gptq_at_the_same_average(avg):
    w, H, x = salient_layer()
    clip = ClipConfig()
    uniform = gptq_quantize(w, H, avg, 32, clip=clip).qweight
    mixed = slim_quantize(w, H, avg, 32, clip=clip)
    qw = mixed.gptq.qweight
    assert qw.average_bits() == pytest.approx(avg)
    assert qw.nbytes() == pytest.approx(uniform.nbytes(), rel=0.02)
    assert mixed.allocation.k > 0
    assert out_err(x, w, qw.dequantize()) < 0.8 * out_err(x, w, uniform.dequantize())


def test_mixed_widths_with_static_act_order():
    w, H, x = salient_layer(seed=1)
    cfg = GPTQConfig(act_order=True, static_groups=True)
    res = slim_quantize(w, H, 2.5, 32, config=cfg)
    qw = res.gptq.qweight
    assert qw.perm is None and qw.mixed
    # each group's codes fit its width
    for gi, b in enumerate(qw.group_bits.tolist()):
        assert int(qw.codes[:, gi * 32 : (gi + 1) * 32].max()) < 2**b
