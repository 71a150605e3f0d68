"""A tiny random Llama (hidden 64, 2 layers, vocab 128) and random tokens, built in-process."""

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
    )
    return LlamaForCausalLM(config).eval()


@pytest.fixture(scope="module")
def model() -> LlamaForCausalLM:
    return tiny_llama()


@pytest.fixture
def tokens() -> torch.Tensor:
    """[1, 100]: three full windows of 32 and a 4-token tail that must be dropped."""
    return torch.randint(0, VOCAB, (1, 100), generator=torch.Generator().manual_seed(1))
