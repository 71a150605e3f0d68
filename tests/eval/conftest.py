"""Models and tokens built in-process: a tiny random Llama and a constant-logits stub."""

from types import SimpleNamespace

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

VOCAB = 128


def tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        initializer_range=0.1,  # peaked enough that a perturbed copy has a clear KL
    )
    return LlamaForCausalLM(config).eval()


@pytest.fixture(scope="module")
def model() -> LlamaForCausalLM:
    return tiny_llama()


@pytest.fixture
def tokens() -> torch.Tensor:
    """[1, 100]: three full windows of 32 and a 4-token tail that must be dropped."""
    return torch.randint(0, VOCAB, (1, 100), generator=torch.Generator().manual_seed(1))


class ConstantLogits(torch.nn.Module):
    """Predicts the same logits [vocab] at every position: a model with a known answer."""

    def __init__(self, logits: torch.Tensor):
        super().__init__()
        self.register_buffer("logits", logits)
        self.dummy = torch.nn.Parameter(torch.zeros(1))  # gives the model a device

    def forward(self, input_ids, use_cache=False):
        logits = self.logits.expand(1, input_ids.shape[1], -1)  # [1, seqlen, vocab]
        return SimpleNamespace(logits=logits)


@pytest.fixture
def constant_logits():
    return ConstantLogits
