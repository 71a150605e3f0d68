import math

import pytest
import torch
import torch.nn.functional as F
from rendered import numbers

from lowbit.errors import ConfigError
from lowbit.eval import default_seqlen, perplexity


def reference_perplexity(model, tokens, seqlen):
    """The slow, obvious version: full windows only, cross-entropy of seqlen - 1 predictions."""
    nlls = []
    with torch.no_grad():
        for w in range(tokens.shape[1] // seqlen):
            ids = tokens[:, w * seqlen : (w + 1) * seqlen]
            logits = model(ids).logits.float()
            nlls.append(F.cross_entropy(logits[0, :-1], ids[0, 1:], reduction="mean"))
    return math.exp(torch.stack(nlls).mean().item())


def test_matches_hand_computed_reference(model, tokens):
    result = perplexity(model, tokens, seqlen=32, progress=False)
    expected = reference_perplexity(model, tokens, 32)
    assert result.ppl == pytest.approx(expected, rel=1e-5)
    assert result.nll_mean == pytest.approx(math.log(expected), rel=1e-5)
    assert (result.n_windows, result.n_tokens_scored) == (3, 3 * 31)
    assert (result.seqlen, result.n_tokens_input) == (32, 100)


def test_trailing_partial_window_is_dropped(model, tokens):
    """Changing only the tail (tokens 96..99) must not change the result."""
    changed = tokens.clone()
    changed[0, 96:] = (changed[0, 96:] + 1) % 128
    a = perplexity(model, tokens, 32, progress=False)
    b = perplexity(model, changed, 32, progress=False)
    assert a.ppl == b.ppl


def test_uniform_model_has_perplexity_vocab(constant_logits, tokens):
    result = perplexity(constant_logits(torch.zeros(128)), tokens, 32, progress=False)
    assert result.ppl == pytest.approx(128, rel=1e-6)


def test_too_few_tokens(model):
    with pytest.raises(ConfigError, match="seqlen") as e:
        perplexity(model, torch.zeros(1, 10, dtype=torch.long), 32, progress=False)
    assert {10, 32} <= set(numbers(str(e.value)))  # the tokens given, the window asked for


@pytest.mark.parametrize("shape", [(100,), (2, 50)])
def test_tokens_must_be_one_row(model, shape):
    with pytest.raises(ConfigError, match=r"\[1, N\]"):
        perplexity(model, torch.zeros(shape, dtype=torch.long), 32, progress=False)


def test_restores_training_flag(model, tokens):
    model.train()
    try:
        perplexity(model, tokens, 32, progress=False)
        assert model.training
    finally:
        model.eval()


def test_default_seqlen(model):
    assert default_seqlen(model) == 256  # the tiny config's max_position_embeddings
    assert default_seqlen(torch.nn.Linear(2, 2)) == 2048


def test_compare_restores_training_flag_of_a_model_used_twice(model, tokens):
    from lowbit.eval import compare_to_reference

    model.train()
    try:
        compare_to_reference(model, model, tokens, 32, progress=False)
        assert model.training
    finally:
        model.eval()
