"""RTN and GPTQ on llama.cpp's block types (algorithms/ggml.py)."""

from __future__ import annotations

import pytest
import torch

from lowbit.algorithms.ggml import ggml_gptq, ggml_rtn
from lowbit.errors import ConfigError, ShapeError
from lowbit.formats.ggml import BLOCK_TYPES
from lowbit.recipes import GPTQConfig


def _layer(out=48, n_in=256, tokens=512, seed=0):
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(n_in, n_in, generator=g) / n_in**0.5 + torch.eye(n_in)  # correlated inputs
    x = torch.randn(tokens, n_in, generator=g) @ mix * (1 + 3 * torch.rand(n_in, generator=g))
    w = torch.randn(out, n_in, generator=g) * 0.05
    return w, x, 2 * x.T @ x / tokens


def _output_error(w, x, record):
    return float(((x @ (w - record.dequantize()).T) ** 2).mean())


@pytest.mark.parametrize("type_name", ["Q4_0", "Q4_1", "Q5_0", "Q8_0"])
def test_gptq_on_the_block_grid_has_less_output_error_than_rtn(type_name):
    w, x, H = _layer()
    rtn = ggml_rtn(w, type_name, torch.diag(H))
    gptq, loss, damp = ggml_gptq(w, H, type_name)
    assert loss > 0 and damp == GPTQConfig().damp
    assert _output_error(w, x, gptq) < 0.8 * _output_error(w, x, rtn)


@pytest.mark.parametrize("type_name", ["Q4_0", "Q4_1"])
def test_importance_weighting_lowers_the_output_error_of_rtn(type_name):
    w, x, H = _layer(seed=1)
    assert _output_error(w, x, ggml_rtn(w, type_name, torch.diag(H))) < _output_error(w, x, ggml_rtn(w, type_name))


@pytest.mark.parametrize("type_name", ["Q4_0", "Q5_1", "Q4_K", "Q6_K", "IQ4_XS"])
def test_with_uncorrelated_inputs_gptq_is_the_types_own_rounding(type_name):
    """With H = I no error is fed forward, so GPTQ's bytes are RTN's with the same importance:
    the loop rounds on the exact grid the type's encoder chose, block by block."""
    w, _, _ = _layer(out=8, n_in=512)
    rec, loss, _ = ggml_gptq(w, torch.eye(512), type_name, GPTQConfig(block_size=96))
    assert torch.equal(rec.data, ggml_rtn(w, type_name, torch.ones(512)).data)
    assert loss == pytest.approx(float(((w - rec.dequantize()) ** 2).sum()) / 2 * (1 + GPTQConfig().damp), rel=1e-4)
    assert rec.nbytes() == 8 * 512 // BLOCK_TYPES[type_name].block * BLOCK_TYPES[type_name].type_size


def test_bad_widths_and_act_order_are_refused_naming_the_tensor():
    w, _, H = _layer(out=4, n_in=96)
    with pytest.raises(ShapeError, match="blk.0.ffn_down.weight"):
        ggml_rtn(w[:, :80], "Q4_0", name="blk.0.ffn_down.weight")
    with pytest.raises(ConfigError, match="act-order"):
        ggml_gptq(w[:, :64], H[:64, :64], "Q4_0", GPTQConfig(act_order=True))
    with pytest.raises(ConfigError, match="Q7_Z"):
        ggml_rtn(w, "Q7_Z")
