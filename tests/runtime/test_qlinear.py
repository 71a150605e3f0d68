import torch
import torch.nn.functional as F

from lowbit.algorithms.gptq import gptq_quantize
from lowbit.algorithms.rtn import rtn_quantize
from lowbit.qtensor import QuantFormat
from lowbit.recipes import GPTQConfig
from lowbit.runtime.qlinear import QuantLinear


def test_forward_is_dense_matmul_of_the_dequantized_weight():
    g = torch.Generator().manual_seed(0)
    w, b = torch.randn(24, 64, generator=g), torch.randn(24, generator=g)
    x = torch.randn(5, 64, generator=g)
    for sym in (False, True):
        qw = rtn_quantize(w, QuantFormat(3, 16, sym))
        m = QuantLinear.from_quantized(qw, b)
        assert torch.equal(m(x), F.linear(x, qw.dequantize(), b))
        assert torch.equal(m.quantized_weight().codes, qw.codes)


def test_permuted_weights_run_in_the_original_column_order():
    g = torch.Generator().manual_seed(1)
    w = torch.randn(16, 64, generator=g)
    x = torch.randn(40, 64, generator=g) * torch.linspace(0.1, 3, 64)
    qw = gptq_quantize(w, 2 * x.T @ x / 40, QuantFormat(4, 16, False), config=GPTQConfig(act_order=True)).qweight
    assert qw.perm is not None
    m = QuantLinear.from_quantized(qw)
    y = m(x)
    assert torch.equal(y, F.linear(x, qw.dequantize()))
    assert (y - F.linear(x, w)).abs().mean() < 0.1 * F.linear(x, w).abs().mean()


def test_bf16_activations_give_bf16_outputs():
    qw = rtn_quantize(torch.randn(8, 32), QuantFormat(4, 32, False))
    m = QuantLinear.from_quantized(qw)
    assert m(torch.randn(2, 32, dtype=torch.bfloat16)).dtype == torch.bfloat16


def test_dense_weights_gives_identical_outputs_and_releases_memory():
    from lowbit.runtime.qlinear import dense_weights

    qw = rtn_quantize(torch.randn(16, 48), QuantFormat(3, 16, False))
    m = QuantLinear.from_quantized(qw, torch.randn(16))
    x = torch.randn(4, 48)
    plain = m(x)
    with dense_weights(m):
        assert m._dense is not None
        assert torch.equal(m(x), plain)
        # a call in another dtype falls back to dequantizing for that dtype
        assert torch.equal(m(x.double()), F.linear(x.double(), qw.dequantize(torch.float64), m.bias.double()))
    assert m._dense is None
