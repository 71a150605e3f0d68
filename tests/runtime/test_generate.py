"""runtime/generate.py's prompt and sampling: the chat template's ids, and each logits processor
doing what it says (on a tiny random Llama; assertions on token ids)."""

import pytest
import torch
from tiny_models import CHAT_TEMPLATE, CHAT_WORDS, build_tiny, save_tiny_folder
from transformers import AutoTokenizer

from lowbit.runtime.generate import (
    chat_prompt_ids,
    generate,
    has_chat_template,
    logits_processors,
)

ID = {w: i for i, w in enumerate(CHAT_WORDS)}


@pytest.fixture(scope="module")
def model():
    return build_tiny("llama")


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory):
    root = tmp_path_factory.mktemp("tok")
    chat = AutoTokenizer.from_pretrained(save_tiny_folder(root / "chat", CHAT_TEMPLATE))
    plain = AutoTokenizer.from_pretrained(save_tiny_folder(root / "plain"))
    return chat, plain


def test_the_chat_template_wraps_the_prompt_in_a_user_turn_and_opens_the_assistant(tokenizers):
    chat, plain = tokenizers
    assert has_chat_template(chat) and not has_chat_template(plain)
    assert chat_prompt_ids(chat, "w1 w2") == [ID["<s>"], ID["<|user|>"], ID["w1"], ID["w2"], ID["<|end|>"],
                                             ID["<|assistant|>"]]
    assert chat_prompt_ids(chat, "w1", system="w3 w4") == [
        ID["<s>"], ID["<|system|>"], ID["w3"], ID["w4"], ID["<|end|>"],
        ID["<|user|>"], ID["w1"], ID["<|end|>"], ID["<|assistant|>"]]


def test_plain_greedy_runs_no_processor():
    assert len(logits_processors()) == 0
    assert len(logits_processors(repetition_penalty=1.0)) == 0
    assert len(logits_processors(0.0, top_k=5, top_p=0.5)) == 0  # they shape sampling only


def _prompt():
    return torch.tensor([5, 17, 42, 5, 99, 17, 3])


def test_greedy_repeats_and_a_strong_repetition_penalty_stops_it(model):
    plain = generate(model, _prompt(), 40).tokens
    seen = set(_prompt().tolist()) | set(plain)
    assert len(seen) < len(_prompt()) + len(plain)  # this model repeats tokens when left alone
    penalised = generate(model, _prompt(), 40, repetition_penalty=1e6).tokens
    assert len(set(penalised)) == len(penalised)
    assert not set(penalised) & set(_prompt().tolist())


def test_top_k_1_sampling_is_greedy(model):
    greedy = generate(model, _prompt(), 16).tokens
    for seed in range(3):
        assert generate(model, _prompt(), 16, temperature=1.5, top_k=1, seed=seed).tokens == greedy


def test_sampled_tokens_lie_in_the_top_k(model):
    k = 3
    tokens = generate(model, _prompt(), 24, temperature=50.0, top_k=k, seed=1).tokens
    ids = torch.cat([_prompt(), torch.tensor(tokens)])
    with torch.no_grad():
        logits = model(ids.unsqueeze(0)).logits[0]  # [T, vocab]
    n = len(_prompt())
    for i, tok in enumerate(tokens):
        assert tok in logits[n - 1 + i].topk(k).indices.tolist()
    assert len(set(tokens)) > 1  # a high temperature really sampled


def test_sampling_is_reproducible_for_a_seed(model):
    a = generate(model, _prompt(), 16, temperature=1.0, top_k=20, top_p=0.9, seed=7).tokens
    b = generate(model, _prompt(), 16, temperature=1.0, top_k=20, top_p=0.9, seed=7).tokens
    assert a == b


def test_stop_ends_generation_after_the_token_it_sees(model):
    seen = []

    def stop(tokens):
        seen.append(len(tokens))
        return len(tokens) == 3

    out = generate(model, _prompt(), 10, stop=stop)
    assert len(out.tokens) == 3 and seen == [1, 2, 3]
    assert out.tokens == generate(model, _prompt(), 10).tokens[:3]
