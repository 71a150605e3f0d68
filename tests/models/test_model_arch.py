"""arch: decoder blocks and linear groups of tiny Llama / Qwen2 / Gemma3 models (the `tiny`
fixture of tests/conftest.py), checked against the order in which a forward pass uses them."""

import itertools

import pytest
import torch
from tiny_models import tiny_gpt2
from torch import nn

from lowbit.errors import ConfigError
from lowbit.models.arch import decoder_layers, linear_layers, sequential_linear_groups

EXPECTED = [
    ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"],
    ["self_attn.o_proj"],
    ["mlp.gate_proj", "mlp.up_proj"],
    ["mlp.down_proj"],
]


def test_decoder_layers(tiny):
    layers = decoder_layers(tiny)
    assert isinstance(layers, nn.ModuleList)
    assert len(layers) == tiny.config.num_hidden_layers == 2
    assert layers is tiny.model.layers


def test_groups_and_linears(tiny):
    block = decoder_layers(tiny)[0]
    groups = sequential_linear_groups(block)
    assert groups == EXPECTED
    linears = linear_layers(block)
    assert sorted(linears) == sorted(name for group in groups for name in group)
    for name, module in linears.items():
        assert isinstance(module, nn.Linear)
        assert block.get_submodule(name) is module


def test_groups_follow_the_forward_pass(tiny):
    """Layers of one group see the same input; groups run in the listed order."""
    block = decoder_layers(tiny)[0]
    calls: list[tuple[str, torch.Tensor]] = []
    hooks = [
        module.register_forward_hook(lambda m, args, out, name=name: calls.append((name, args[0])))
        for name, module in linear_layers(block).items()
    ]
    try:
        with torch.no_grad():
            tiny(torch.arange(12).unsqueeze(0))
    finally:
        for hook in hooks:
            hook.remove()
    first_call = {name: i for i, (name, _) in reversed(list(enumerate(calls)))}
    inputs = dict(calls)
    groups = sequential_linear_groups(block)
    for earlier, later in itertools.pairwise(groups):
        assert max(first_call[n] for n in earlier) < min(first_call[n] for n in later)
    for group in groups:
        for name in group[1:]:
            torch.testing.assert_close(inputs[name], inputs[group[0]], rtol=0, atol=0)


def test_unsupported_model_names_its_type():
    with pytest.raises(ConfigError, match="'gpt2'"):
        decoder_layers(tiny_gpt2())


def test_unsupported_block_names_its_type():
    block = tiny_gpt2().transformer.h[0]
    with pytest.raises(ConfigError, match="'gpt2'.*GPT2Block"):
        sequential_linear_groups(block)


def test_block_with_an_extra_linear_is_rejected(tiny):
    block = decoder_layers(tiny)[0]
    block.mlp.extra_proj = nn.Linear(4, 4)
    with pytest.raises(ConfigError, match="unexpected: \\['mlp.extra_proj'\\]"):
        sequential_linear_groups(block)
