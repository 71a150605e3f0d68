"""AWQ: folding keeps the model's function, the scale search beats plain RTN on a layer with
outlier input channels, output-error clipping beats the unclipped range."""

import pytest
import torch
from tiny_models import build_tiny

from lowbit.algorithms import awq
from lowbit.models.arch import decoder_layers, norm_weight_offset, smoothing_groups


def outlier_layer(seed=0, n=512, d_in=256, d_out=128, n_outliers=4, boost=30.0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d_in, generator=g)
    hot = torch.randperm(d_in, generator=g)[:n_outliers]
    x[:, hot] *= boost
    w = torch.randn(d_out, d_in, generator=g) * 0.02
    return x, w, hot


def test_fold_scales_keeps_the_model_function(arch):
    model = build_tiny(arch)
    ids = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = model(ids).logits
        g = torch.Generator().manual_seed(2)
        n_groups = 0
        for block in decoder_layers(model):
            for sg in smoothing_groups(block):
                prev = block.get_submodule(sg.prev)
                width = block.get_submodule(sg.linears[0]).in_features
                s = torch.rand(width, generator=g) * 3 + 0.25
                awq.fold_scales(prev, [block.get_submodule(n) for n in sg.linears], s, norm_weight_offset(prev))
                n_groups += 1
        out = model(ids).logits
    # q/k/v from the input norm, gate/up from the MLP norm, down from up (o_proj has GQA here)
    assert n_groups == 3 * len(decoder_layers(model))
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)


def test_gemma_norm_fold_uses_the_unit_offset():
    model = build_tiny("gemma3")
    block = decoder_layers(model)[0]
    assert norm_weight_offset(block.input_layernorm) == 1.0
    assert [sg.prev for sg in smoothing_groups(block)][1] == "pre_feedforward_layernorm"


@pytest.mark.parametrize("bits,group_size", [(3, 64), (4, 128), (2, 32)])
def test_scale_search_beats_rtn_on_outlier_channels(bits, group_size):
    x, w, hot = outlier_layer()
    z = awq.compress_inputs(x)
    found = awq.search_scales(z, x.abs().mean(0), [w], bits, group_size)
    rtn = awq.output_error(x, awq.fake_quantize(w, bits, group_size, False) - w)
    assert found.identity_loss == pytest.approx(rtn, rel=1e-3)  # compressed inputs: same loss
    assert found.alpha is not None and found.loss < 0.7 * rtn
    # the outlier channels got the largest scales
    assert set(found.scales.topk(len(hot)).indices.tolist()) == set(hot.tolist())
    # the reported loss is the loss of the smoothed, quantized layer on the raw inputs
    s = found.scales
    direct = awq.output_error(x, awq.fake_quantize(w * s, bits, group_size, False) / s - w)
    assert found.loss == pytest.approx(direct, rel=1e-3)


def test_scale_search_keeps_identity_when_nothing_helps():
    # isotropic inputs and weights: no channel deserves protection, loss never worse than s = 1
    g = torch.Generator().manual_seed(3)
    x, w = torch.randn(256, 64, generator=g), torch.randn(32, 64, generator=g)
    found = awq.search_scales(awq.compress_inputs(x), x.abs().mean(0), [w], 4, 32)
    assert found.loss <= found.identity_loss


def test_output_clip_search_beats_full_range():
    x, w, _ = outlier_layer(seed=4)
    w[:, 7] *= 8  # one outlier weight column
    z = awq.compress_inputs(x)
    shrink = awq.search_clip_output(w, z, 3, 64)
    assert shrink.shape == (128, 4) and (shrink <= 1).all() and (shrink < 1).any()
    from lowbit.formats import affine

    def err(sh):
        codes, scale, zero = affine.quantize(w, 3, 64, False, sh)
        return awq.output_error(x, affine.dequantize(codes, scale, zero, 64) - w)

    assert err(shrink) < err(1.0)


def test_compress_inputs_preserves_the_gram_matrix():
    g = torch.Generator().manual_seed(5)
    x = torch.randn(300, 40, generator=g)
    z = awq.compress_inputs(x)
    assert z.shape == (40, 40)
    torch.testing.assert_close(z.T @ z, x.T @ x, rtol=1e-4, atol=1e-3)
