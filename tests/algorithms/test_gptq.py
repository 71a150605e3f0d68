import logging

import pytest
import torch

from lowbit.algorithms.gptq import gptq_quantize
from lowbit.algorithms.rtn import rtn_quantize
from lowbit.qtensor import QuantFormat
from lowbit.recipes import ClipConfig, GPTQConfig

F4 = QuantFormat(4, 32, False)


def _layer(out=48, n=128, samples=2048, seed=0):
    """A weight and inputs with strongly correlated, unevenly scaled features."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(n, n, generator=g) / n**0.5
    scale = torch.logspace(-1, 1, n)[torch.randperm(n, generator=g)]
    x = (torch.randn(samples, n, generator=g) @ mix + 0.3 * torch.randn(samples, n, generator=g)) * scale
    w = torch.randn(out, n, generator=g) * 0.05
    H = 2 * x.T @ x / samples
    return w, x, H


def _out_err(w, wq, x):
    return float(((x @ (w - wq).T) ** 2).mean())


@pytest.mark.parametrize("bits,gs", [(4, 32), (3, 64), (3, -1)])
@pytest.mark.parametrize(
    "cfg",
    [GPTQConfig(), GPTQConfig(act_order=True), GPTQConfig(act_order=True, static_groups=True), GPTQConfig(block_size=16)],
    ids=["plain", "act_order", "act_order_static", "small_blocks"],
)
def test_gptq_beats_rtn_on_output_error(bits, gs, cfg):
    w, x, H = _layer()
    rtn = rtn_quantize(w, QuantFormat.resolved(w.shape[1], bits, gs, False)).dequantize()
    res = gptq_quantize(w, H, QuantFormat.resolved(w.shape[1], bits, gs, False), config=cfg)
    gq = res.qweight.dequantize()
    assert _out_err(w, gq, x) < 0.8 * _out_err(w, rtn, x)
    assert res.damp_used == cfg.damp


@pytest.mark.parametrize("bits,cfg", [(3, GPTQConfig()), (2, GPTQConfig(act_order=True, static_groups=True))])
def test_gptq_with_clipping_still_beats_clipped_rtn(bits, cfg):
    # (at 2 bits on features spanning 100x in scale, plain-order GPTQ does not beat clipped RTN;
    # act-order does, by a wide margin)
    w, x, H = _layer(seed=3)
    clip = ClipConfig()
    rtn = rtn_quantize(w, QuantFormat(bits, 32, False), clip=clip).dequantize()
    gq = gptq_quantize(w, H, QuantFormat(bits, 32, False), config=cfg, clip=clip).qweight.dequantize()
    assert _out_err(w, gq, x) < 0.8 * _out_err(w, rtn, x)


def test_identity_hessian_reduces_to_rtn():
    # with H = I the error feedback is zero: GPTQ's codes are RTN's codes
    w, _, _ = _layer()
    n = w.shape[1]
    q = gptq_quantize(w, torch.eye(n), F4, config=GPTQConfig(damp=1e-6)).qweight
    r = rtn_quantize(w, F4)
    assert torch.equal(q.codes, r.codes) and torch.equal(q.scales, r.scales)


def test_act_order_without_static_groups_stores_a_permutation():
    w, _x, H = _layer()
    qw = gptq_quantize(w, H, F4, config=GPTQConfig(act_order=True)).qweight
    assert qw.perm is not None
    assert torch.equal(qw.perm, torch.argsort(torch.diag(H), descending=True))
    static = gptq_quantize(w, H, F4, config=GPTQConfig(act_order=True, static_groups=True)).qweight
    assert static.perm is None


def test_indefinite_hessian_escalates_damping_with_a_warning(caplog):
    w, _, H = _layer()
    H = H.clone()
    H[0, 0] = -0.002 * torch.diag(H).mean() * 50  # negative curvature: cholesky at damp 0.01 fails
    with caplog.at_level(logging.WARNING):
        res = gptq_quantize(w, H, F4)
    assert res.damp_used > 0.01
    assert "damp" in caplog.text


def test_hopeless_hessian_falls_back_to_rtn_and_says_so(caplog):
    w, _, _ = _layer()
    n = w.shape[1]
    H = -torch.eye(n) * 1000 + torch.ones(n, n)  # negative definite, mean diag negative
    with caplog.at_level(logging.INFO):
        res = gptq_quantize(w, H, F4)
    assert "identity" in caplog.text
    assert res.fallback  # the pipeline reports it per layer and once as a warning
    assert torch.equal(res.qweight.codes, rtn_quantize(w, F4).codes)


def test_nan_hessian_falls_back():
    w, _, H = _layer()
    H = H.clone()
    H[3, 3] = float("nan")
    res = gptq_quantize(w, H, F4)
    assert res.fallback and not gptq_quantize(w, _layer()[2], F4).fallback
    assert torch.isfinite(res.qweight.dequantize()).all()


def test_dead_inputs_get_zero_weight():
    w, _x, H = _layer()
    H[5, :] = 0
    H[:, 5] = 0
    qw = gptq_quantize(w, H, F4).qweight.dequantize()
    assert torch.all(qw[:, 5].abs() <= qw.abs().max() * 0 + 1e-2)
