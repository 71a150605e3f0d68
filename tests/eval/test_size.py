import torch
from tiny_models import tiny_llama

from lowbit.eval import ModelSize, count_linear_params, tensor_bytes


def test_tied_weights_counted_once():
    tied = torch.nn.Sequential(torch.nn.Embedding(10, 4), torch.nn.Linear(4, 10, bias=False))
    tied[1].weight = tied[0].weight  # [10, 4] shared
    assert tensor_bytes(tied) == 10 * 4 * 4
    assert count_linear_params(tied) == 40


def test_linear_params_with_include_and_bias():
    model = torch.nn.ModuleDict({"a": torch.nn.Linear(3, 5), "head": torch.nn.Linear(5, 7)})
    assert count_linear_params(model) == 3 * 5 + 5 * 7  # weights only, no biases
    assert count_linear_params(model, include=lambda name: name != "head") == 15


def test_buffers_and_dtypes_counted():
    model = torch.nn.BatchNorm1d(8).to(torch.float16)  # weight, bias, mean, var: f16; count: i64
    assert tensor_bytes(model) == 4 * 8 * 2 + 8


def test_tiny_llama_size():
    model = tiny_llama(vocab=128, tie=True)
    size = ModelSize.of(model, include=lambda name: "layers." in name)
    per_layer = 64 * 64 * 2 + 64 * 32 * 2 + 64 * 128 * 3  # q, o; k, v; gate, up, down
    assert size.n_linear_params == 2 * per_layer
    assert size.n_params == sum(p.numel() for p in model.parameters())  # already deduplicated
    params_bytes = size.n_params * 4
    buffer_bytes = sum(b.numel() * b.element_size() for b in model.buffers())
    assert size.tensor_bytes == params_bytes + buffer_bytes


def test_meta_device_tensors_are_not_merged():
    with torch.device("meta"):
        model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 4))
    assert tensor_bytes(model) == 2 * (16 + 4) * 4
