"""Decode attention read from packed KIVI codes: the native kernel against the dequantizing
reference, the reference against plain attention, and decode steps inside a model equal to the
dequantizing path."""

import pytest
import torch
from tiny_models import build_tiny

from lowbit import kernels
from lowbit.formats import kv
from lowbit.runtime.kv_attention import (
    kivi_decode_attention,
    reference_decode_attention,
)
from lowbit.runtime.kvcache import kv_cache_for, observing
from lowbit.runtime.kvcache.layers import KIVILayer

needs_kernel = pytest.mark.skipif(not kernels.available("kv_attention"),
                                  reason="no C++ toolchain to build the native kernel")


def _case(bits, B=2, H=2, R=3, D=64, T=96, Tr=17, seed=0):
    g = torch.Generator().manual_seed(seed)
    k, v = torch.randn(B, H, T, D, generator=g), torch.randn(B, H, T, D, generator=g)
    k[..., 5] *= 8  # an outlier channel, as real keys have
    qk, qv = kv.quantize_keys(k, bits, 32), kv.quantize_values(v, bits, 32)
    q = torch.randn(B, H * R, 1, D, generator=g)
    kr, vr = torch.randn(B, H, Tr, D, generator=g), torch.randn(B, H, Tr, D, generator=g)
    return q, qk, qv, kr, vr


@needs_kernel
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("R", [1, 3])
def test_kernel_matches_the_dequantizing_reference(bits, R):
    q, qk, qv, kr, vr = _case(bits, R=R)
    got = kivi_decode_attention(q, qk, qv, kr, vr, 0.125)
    ref = reference_decode_attention(q, qk, qv, kr, vr, 0.125)
    assert got.shape == (2, 1, 2 * R, 64)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


@needs_kernel
def test_kernel_applies_bool_and_additive_masks():
    q, qk, qv, kr, vr = _case(4)
    n = 96 + 17
    keep = torch.rand(2, 1, 1, n, generator=torch.Generator().manual_seed(1)) > 0.3
    additive = torch.zeros(2, 1, 1, n).masked_fill(~keep, float("-inf"))
    for mask in (keep, additive):
        got = kivi_decode_attention(q, qk, qv, kr, vr, 0.1, mask)
        ref = reference_decode_attention(q, qk, qv, kr, vr, 0.1, mask)
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    unmasked = kivi_decode_attention(q, qk, qv, kr, vr, 0.1)
    assert (unmasked - got).abs().max() > 1e-3  # the mask changed something


def test_reference_is_plain_attention_over_the_dequantized_cache():
    q, qk, qv, kr, vr = _case(4, B=1, R=2)
    k = torch.cat([kv.dequantize_keys(qk, 1, 2), kr], -2).repeat_interleave(2, 1)
    v = torch.cat([kv.dequantize_values(qv, 1, 2), vr], -2).repeat_interleave(2, 1)
    want = torch.nn.functional.scaled_dot_product_attention(q, k, v, scale=0.2).transpose(1, 2)
    torch.testing.assert_close(reference_decode_attention(q, qk, qv, kr, vr, 0.2), want, rtol=1e-5, atol=1e-5)


def test_without_a_kernel_the_reference_is_used(monkeypatch):
    monkeypatch.setenv(kernels.DISABLE_ENV, "1")
    q, qk, qv, kr, vr = _case(2)
    with pytest.raises(kernels.KernelUnavailable, match="LOWBIT_NO_KERNELS"):
        kernels.load("kv_attention")
    torch.testing.assert_close(kivi_decode_attention(q, qk, qv, kr, vr, 0.125),
                               reference_decode_attention(q, qk, qv, kr, vr, 0.125))


def _decode_logits(model, ids, cache, steps, fused):
    out = []
    with torch.inference_mode(), observing(model, cache):
        for layer in cache.layers:
            layer.fused = fused  # observing turns it on; the comparison turns it off
        model(ids, past_key_values=cache, use_cache=True)
        prefilled = [layer.n_quantized for layer in cache.layers]
        tok = ids[:, -1:]
        for _ in range(steps):
            logits = model(tok, past_key_values=cache, use_cache=True).logits[:, -1]
            out.append(logits)
            tok = logits.argmax(-1, keepdim=True)
    assert all(layer.n_quantized > n for layer, n in zip(cache.layers, prefilled))  # blocks flushed while decoding
    return torch.stack(out, 1)


@pytest.mark.parametrize("name", ["kivi4-w16", "kivi2-w0", "kivi2-w8-a4"])
def test_decode_steps_inside_a_model_equal_the_dequantizing_path(arch, name, monkeypatch):
    model = build_tiny(arch)
    ids = torch.randint(0, 256, (1, 70), generator=torch.Generator().manual_seed(2))
    calls = []
    attend = KIVILayer.attend
    monkeypatch.setattr(KIVILayer, "attend", lambda self, *a: calls.append(1) or attend(self, *a))
    fused_cache = kv_cache_for(model.config, name)
    got = _decode_logits(model, ids, fused_cache, 40, fused=True)
    assert len(calls) == 40 * len(fused_cache.layers)
    want = _decode_logits(model, ids, kv_cache_for(model.config, name), 40, fused=False)
    assert len(calls) == 40 * len(fused_cache.layers)
    assert not any(layer.fused for layer in fused_cache.layers)  # switched off on exit
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_a_kernel_that_cannot_load_is_warned_about_once_per_extension(monkeypatch, caplog):
    monkeypatch.setenv(kernels.DISABLE_ENV, "1")
    monkeypatch.setattr(kernels, "_warned", set())
    with caplog.at_level("WARNING", logger="lowbit.kernels"):
        assert kernels.load_or_warn("kv_attention", "the reference runs") is None
        assert kernels.load_or_warn("kv_attention", "the reference runs") is None
        assert kernels.load_or_warn("qgemv", "torch runs") is None
    assert [r.name for r in caplog.records if r.levelname == "WARNING"] == ["lowbit.kernels"] * 2
    assert kernels._warned == {"kv_attention", "qgemv"}
