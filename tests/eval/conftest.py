"""Models and tokens built in-process: a tiny random Llama (tiny_models, vocabulary VOCAB, untied
head) and a constant-logits stub."""

from types import SimpleNamespace

import pytest
import torch
from tiny_models import tiny_llama

VOCAB = 128


@pytest.fixture(scope="module")
def model():
    return tiny_llama(vocab=VOCAB, tie=False, max_positions=256)


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
