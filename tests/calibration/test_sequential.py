import pytest
import torch
from tiny_models import build_tiny

from lowbit.calibration.capture import base_model, capture_block_inputs
from lowbit.calibration.hessian import HessianAccumulator
from lowbit.calibration.sequential import run_sequential
from lowbit.models.arch import decoder_layers


def _ids(n=3, seqlen=24, seed=0):
    return torch.randint(0, 256, (n, seqlen), generator=torch.Generator().manual_seed(seed))


@torch.inference_mode()
def test_captured_inputs_replay_the_model(tiny):
    ids = _ids()
    layers = decoder_layers(tiny)
    cap = capture_block_inputs(tiny, layers, ids)
    assert cap.hidden.shape == (3, 24, 64)
    x = cap.hidden
    for i, layer in enumerate(layers):
        x = torch.cat([layer(x[j:j + 1], *cap.layer_args[i], **cap.layer_kwargs[i]) for j in range(3)])
    body = base_model(tiny)
    expected = torch.cat([body(input_ids=ids[j:j + 1]).last_hidden_state for j in range(3)])
    torch.testing.assert_close(body.norm(x), expected, rtol=1e-5, atol=1e-5)
    assert all(isinstance(m, torch.nn.Module) and not type(m).__name__.startswith("_") for m in layers)


@torch.inference_mode()
@pytest.mark.parametrize("true_sequential", [True, False])
def test_hessians_match_a_plain_forward_when_nothing_changes(tiny, true_sequential):
    """With a quantizer that changes nothing, every block's Hessians equal those of a full forward,
    each layer getting the Hessian of its own input."""
    ids = _ids()
    expected: dict[str, HessianAccumulator] = {}
    handles = []
    for name, m in tiny.named_modules():
        if isinstance(m, torch.nn.Linear) and ".layers." in name:
            acc, h = HessianAccumulator.attach(m)
            expected[name], handles = acc, handles + [h]
    for j in range(ids.shape[0]):
        tiny(input_ids=ids[j:j + 1], use_cache=False)
    for h in handles:
        h.remove()

    got: dict[str, torch.Tensor] = {}

    def keep(i, linears, hessians):
        for name, H in hessians.items():
            got[f"model.layers.{i}.{name}"] = H
        return {}

    run_sequential(tiny, ids, keep, true_sequential=true_sequential, progress=False)
    assert set(got) == set(expected)
    for name, acc in expected.items():
        torch.testing.assert_close(got[name], acc.H, rtol=1e-4, atol=1e-5)


@torch.inference_mode()
def test_true_sequential_sees_already_quantized_layers(tiny):
    """Zeroing q/k/v must change the Hessian seen by o_proj of the same block."""
    ids = _ids()
    seen = {}

    def zero_qkv(i, linears, hessians):
        seen.update({(i, n): H.clone() for n, H in hessians.items()})
        out = {}
        for n, lin in linears.items():
            if n.endswith("v_proj"):
                new = torch.nn.Linear(lin.in_features, lin.out_features, bias=lin.bias is not None)
                new.weight.data.zero_()
                if new.bias is not None:
                    new.bias.data.zero_()
                out[n] = new
        return out

    run_sequential(tiny, ids, zero_qkv, progress=False)
    assert torch.count_nonzero(seen[(0, "self_attn.o_proj")]) == 0  # o_proj's input is attention over v = 0
    assert torch.count_nonzero(seen[(0, "mlp.down_proj")]) > 0
    # without true-sequential, every Hessian of a block comes from its unquantized forward
    seen.clear()
    run_sequential(build_tiny("llama"), ids, zero_qkv, true_sequential=False, progress=False)
    assert torch.count_nonzero(seen[(0, "self_attn.o_proj")]) > 0


def test_hessian_accumulator_is_a_running_mean():
    g = torch.Generator().manual_seed(0)
    xs = [torch.randn(1, 7, 5, generator=g) for _ in range(3)]
    acc = HessianAccumulator(5)
    for x in xs:
        acc.add(x)
    allx = torch.cat([x.reshape(-1, 5) for x in xs])
    torch.testing.assert_close(acc.H, 2 * allx.T @ allx / allx.shape[0])
    assert acc.n_tokens == 21


@pytest.mark.parametrize("in_features", [7, 16, 37])
def test_wide_hessians_accumulate_upper_blocks_and_read_symmetric(monkeypatch, in_features):
    monkeypatch.setattr(HessianAccumulator, "BLOCK", 8)  # several blocks, a partial last one
    g = torch.Generator().manual_seed(1)
    xs = [torch.randn(2, 9, in_features, generator=g) for _ in range(3)]
    acc = HessianAccumulator(in_features)
    acc.add(xs[0])
    first = acc.H.clone()  # read between adds: the sum goes on from where it was
    x0 = xs[0].reshape(-1, in_features)
    torch.testing.assert_close(first, 2 * x0.T @ x0 / x0.shape[0])
    for x in xs[1:]:
        acc.add(x)
    allx = torch.cat([x.reshape(-1, in_features) for x in xs])
    H = acc.H
    torch.testing.assert_close(H, 2 * allx.T @ allx / allx.shape[0])
    torch.testing.assert_close(H, H.T)
    assert acc.n_tokens == 54
    assert acc.H is H  # reading twice does not scale twice
    torch.testing.assert_close(acc.H, 2 * allx.T @ allx / allx.shape[0])
