"""W8A8Linear (oneDNN int8 GEMM, per-token dynamic activations) against the slow reference:
integer parts identical, results equal to float32 rounding; refused formats; a checkpoint run
with int8 activations stays close to its float run."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from rendered import warnings_logged
from tiny_models import build_tiny, records_of

from lowbit.algorithms.rtn import rtn_quantize
from lowbit.errors import CheckpointError, ConfigError
from lowbit.qtensor import QuantFormat, QuantizedWeight
from lowbit.runtime.qlinear import QuantLinear
from lowbit.runtime.w8a8 import W8A8Linear, quantize_per_token, w8a8_reference


def w8_weight(out, n_in, seed, perm=False):
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(1, 256, (out, n_in), generator=g, dtype=torch.uint8)  # 1..255: c - 128 in [-127, 127]
    scales = (torch.rand(out, 1, generator=g) * 0.01 + 0.001).half()
    p = torch.randperm(n_in, generator=g) if perm else None
    return QuantizedWeight(codes, scales, None, QuantFormat(8, n_in, True), p)


@settings(max_examples=25, deadline=None)
@given(rows=st.integers(1, 40), n_in=st.sampled_from([16, 64, 200]), out=st.integers(1, 50), perm=st.booleans(),
       bias=st.booleans(), seed=st.integers(0, 999))
def test_int8_gemm_matches_the_reference(rows, n_in, out, perm, bias, seed):
    qw = w8_weight(out, n_in, seed, perm)
    b = torch.randn(out) if bias else None
    x = torch.randn(rows, n_in, generator=torch.Generator().manual_seed(seed + 1)) * 3
    m = W8A8Linear(qw, b)
    got, want = m(x), w8a8_reference(x, qw, b)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6 * float(want.abs().max()))


def test_the_integer_product_is_exact():
    """Unit scales expose the int32 sums: identical to an int64 matmul of the same codes."""
    qw = w8_weight(24, 256, 0)
    qw = QuantizedWeight(qw.codes, torch.ones(24, 1).half(), None, qw.fmt)
    x = torch.randn(9, 256)
    q, s = quantize_per_token(x)
    ints = (W8A8Linear(qw)(x) / s).round().long()  # s per token is the only float left
    assert torch.equal(ints, q.long() @ (qw.codes.long() - 128).T)


@pytest.mark.parametrize("onednn_exact", [True, False])
def test_full_range_activations_sum_exactly_on_either_gemm(onednn_exact, monkeypatch):
    """Activations at the top of their range with same-sign weights: where oneDNN's int16 pair sums
    would saturate (CPUs without VNNI) the layer must use the exact torch._int_mm path instead."""
    from lowbit.runtime import w8a8

    if onednn_exact and not w8a8.onednn_int8_exact():
        pytest.skip("oneDNN's int8 GEMM saturates on this CPU")
    monkeypatch.setattr(w8a8, "onednn_int8_exact", lambda: onednn_exact)
    codes = torch.full((3, 128), 255, dtype=torch.uint8)  # c - 128 = 127 everywhere
    qw = QuantizedWeight(codes, torch.ones(3, 1).half(), None, QuantFormat(8, 128, True))
    x = torch.ones(2, 128)
    _, s = quantize_per_token(x)
    ints = (W8A8Linear(qw)(x) / s).round().long()
    assert torch.equal(ints, torch.full((2, 3), 127 * 127 * 128))


def test_per_token_quantization_keeps_each_token_within_half_a_step():
    x = torch.randn(5, 64) * torch.tensor([[0.01], [1], [100], [0], [5]])
    q, s = quantize_per_token(x)
    assert int(q.abs().max()) <= 127
    assert bool(((q.float() * s - x).abs() <= s / 2 + 1e-12).all())


def test_int8_activations_cost_little_on_a_w8_layer():
    w = torch.randn(32, 128)
    qw = rtn_quantize(w, QuantFormat(8, 128, True))
    x = torch.randn(10, 128)
    exact = x @ w.T
    err = (W8A8Linear(qw)(x) - exact).abs().max() / exact.abs().max()
    assert err < 0.02


@pytest.mark.parametrize("fmt", [QuantFormat(4, 128, True), QuantFormat(8, 32, True), QuantFormat(8, 128, False)])
def test_formats_int8_activations_cannot_run_are_refused(fmt):
    qw = rtn_quantize(torch.randn(8, 128), fmt)
    with pytest.raises(ConfigError, match="8-bit per-channel symmetric"):
        W8A8Linear(qw)


def test_a_checkpoint_loads_with_int8_activations_and_stays_close(tmp_path):
    from lowbit.checkpoint import save_checkpoint
    from lowbit.loading import load_checkpoint

    model = build_tiny("qwen2")
    for name, lin in [(n, m) for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and ".layers." in n]:
        model.set_submodule(name, QuantLinear.from_quantized(rtn_quantize(lin.weight.detach(), QuantFormat.resolved(lin.in_features, 8, -1, True)),
                                                             lin.bias))
    save_checkpoint(records_of(model), model, None, tmp_path / "ck", {})
    ids = torch.randint(0, 256, (1, 24), generator=torch.Generator().manual_seed(0))
    w8 = load_checkpoint(tmp_path / "ck", runtime="packed", int8_activations=True).model
    assert sum(isinstance(m, W8A8Linear) for m in w8.modules()) == 14
    with torch.inference_mode():
        ref, got = model(ids).logits, w8(ids).logits
    assert float((got - ref).abs().max() / ref.abs().max()) < 0.05
    assert (got.argmax(-1) == ref.argmax(-1)).float().mean() > 0.9


def test_a_4_bit_checkpoint_is_refused_int8_activations(tmp_path):
    from lowbit.checkpoint import save_checkpoint
    from lowbit.loading import load_checkpoint

    model = build_tiny("llama")
    for name, lin in [(n, m) for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and ".layers." in n]:
        model.set_submodule(name, QuantLinear.from_quantized(rtn_quantize(lin.weight.detach(), QuantFormat(4, 16, False)), lin.bias))
    save_checkpoint(records_of(model), model, None, tmp_path / "ck", {})
    with pytest.raises(CheckpointError, match=str(tmp_path / "ck")):  # names the checkpoint it refuses
        load_checkpoint(tmp_path / "ck", runtime="packed", int8_activations=True)


def _w4a8_available() -> bool:
    from lowbit import kernels

    return kernels.available("qgemv") and kernels.load("qgemv").has_w4a8_path()


needs_w4a8 = pytest.mark.skipif(not _w4a8_available(), reason="no AVX-512 VNNI for the W4A8 kernel")


def w4_iscale_weight(out, n_in, gs, symmetric, seed, perm=False):

    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out, n_in, generator=g)
    qw = rtn_quantize(w, QuantFormat(4, gs, symmetric, scale_bits=8))
    if perm:
        qw = QuantizedWeight(qw.codes, qw.scales, qw.zeros, qw.fmt, torch.randperm(n_in, generator=g),
                             scale_mult=qw.scale_mult)
    return qw


@needs_w4a8
@settings(max_examples=25, deadline=None)
@given(rows=st.integers(1, 20), groups=st.integers(1, 4), gs=st.sampled_from([64, 128]), out=st.sampled_from([3, 8, 36]),
       symmetric=st.booleans(), perm=st.booleans(), bias=st.booleans(), seed=st.integers(0, 999))
def test_w4a8_is_bit_identical_to_the_integer_reference(rows, groups, gs, out, symmetric, perm, bias, seed):
    from lowbit.runtime.w8a8 import W4A8Linear, w4a8_reference

    qw = w4_iscale_weight(out, gs * groups, gs, symmetric, seed, perm)
    b = torch.randn(out) if bias else None
    x = torch.randn(rows, gs * groups, generator=torch.Generator().manual_seed(seed + 1)) * 2
    assert torch.equal(W4A8Linear(qw, b)(x), w4a8_reference(x, qw, b))


@needs_w4a8
def test_w4a8_stays_close_to_the_float_weight_and_refuses_float_scales():
    from lowbit.runtime.w8a8 import W4A8Linear

    qw = w4_iscale_weight(64, 256, 64, False, 0)
    x = torch.randn(7, 256)
    exact = x @ qw.dequantize().T
    assert float((W4A8Linear(qw)(x) - exact).abs().max() / exact.abs().max()) < 0.03
    with pytest.raises(ConfigError, match="Integer Scale"):
        W4A8Linear(rtn_quantize(torch.randn(8, 128), QuantFormat(4, 64, False)))


@needs_w4a8
def test_a_4_bit_integer_scale_checkpoint_runs_w4a8(tmp_path):
    from lowbit.checkpoint import save_checkpoint
    from lowbit.loading import load_checkpoint
    from lowbit.runtime.w8a8 import W4A8Linear

    model = build_tiny("qwen2")
    for name, lin in [(n, m) for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and ".layers." in n]:
        qw = rtn_quantize(lin.weight.detach(), QuantFormat(4, 64, False, scale_bits=8))
        model.set_submodule(name, QuantLinear.from_quantized(qw, lin.bias))
    save_checkpoint(records_of(model), model, None, tmp_path / "ck", {})
    w4 = load_checkpoint(tmp_path / "ck", runtime="packed", int8_activations=True).model
    assert sum(isinstance(m, W4A8Linear) for m in w4.modules()) == 14
    ids = torch.randint(0, 256, (1, 24), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        ref, got = model(ids).logits, w4(ids).logits
    assert (got.argmax(-1) == ref.argmax(-1)).float().mean() > 0.8


def test_layers_without_an_integer_format_stay_weight_only(tmp_path, caplog):
    from lowbit.checkpoint import save_checkpoint
    from lowbit.loading import load_checkpoint
    from lowbit.runtime.packed import PackedLinear

    model = build_tiny("qwen2", tie=False)
    for name, lin in [(n, m) for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and ".layers." in n]:
        model.set_submodule(name, QuantLinear.from_quantized(rtn_quantize(lin.weight.detach(), QuantFormat.resolved(lin.in_features, 8, -1, True)),
                                                             lin.bias))
    model.lm_head = QuantLinear.from_quantized(rtn_quantize(model.lm_head.weight.detach(), QuantFormat(8, 32, False)))  # group-wise
    save_checkpoint(records_of(model), model, None, tmp_path / "ck", {})
    loaded = load_checkpoint(tmp_path / "ck", runtime="packed", int8_activations=True).model
    assert isinstance(loaded.lm_head, PackedLinear)
    assert sum(isinstance(m, W8A8Linear) for m in loaded.modules()) == 14
    assert [w for w in warnings_logged(caplog) if "lm_head" in w]  # named as the layer left weight-only


@pytest.mark.skipif(not __import__("lowbit.kernels", fromlist=["available"]).available("qgemv"), reason="no kernel")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_native_row_quantization_and_epilogue_equal_the_torch_ops(dtype):
    from lowbit import kernels

    ext = kernels.load("qgemv")
    x = (torch.randn(13, 300) * torch.logspace(-3, 2, 13).unsqueeze(1)).to(dtype)
    x[3] = 0  # an all-zero token keeps the smallest positive scale
    q, s = ext.quantize_rows(x)
    q_ref, s_ref = quantize_per_token(x)
    assert torch.equal(q.long(), q_ref.long()) and torch.equal(s, s_ref)
    u, s2 = ext.quantize_rows(x, shifted=True)  # oneDNN's unsigned activations
    assert u.dtype == torch.uint8 and torch.equal(u.long(), q_ref.long() + 128) and torch.equal(s2, s_ref)
    # half-way values round to even, as torch.round does
    half = torch.tensor([[127.0, 0.5, 1.5, 2.5, -0.5, -1.5, 126.5, -126.5] + [0.0] * 9], dtype=dtype)
    assert torch.equal(ext.quantize_rows(half)[0].long(), quantize_per_token(half)[0].long())
    acc, ws, bias = torch.randn(13, 40) * 1e4, torch.rand(40), torch.randn(40)
    want = acc * ws * s_ref + bias
    got = ext.scale_rows(acc, ws, s, bias, dtype == torch.bfloat16)
    assert torch.equal(got, want.to(dtype))


def test_an_int8_activation_load_reports_the_bits_per_weight_of_the_reference_load(tmp_path):
    """Size comes from the stored records, not from the runtime's module types."""
    from lowbit.checkpoint import save_checkpoint
    from lowbit.loading import load_checkpoint

    model = build_tiny("qwen2")
    for name, lin in [(n, m) for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and ".layers." in n]:
        model.set_submodule(name, QuantLinear.from_quantized(rtn_quantize(lin.weight.detach(), QuantFormat.resolved(lin.in_features, 8, -1, True)),
                                                             lin.bias))
    save_checkpoint(records_of(model), model, None, tmp_path / "ck", {})
    reference = load_checkpoint(tmp_path / "ck").size
    int8 = load_checkpoint(tmp_path / "ck", runtime="packed", int8_activations=True).size
    assert reference.bits_per_weight is not None
    assert int8 == reference
