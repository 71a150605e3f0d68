"""Needle prompts are built exactly as specified; the task loops score through the cache."""

import pytest
import torch
from rendered import numbers
from tiny_models import build_tiny

from lowbit.errors import ConfigError
from lowbit.eval.tasks import (
    INTRO,
    NEEDLE,
    QUESTION,
    lambada_eval,
    needle_cases,
    needle_eval,
)
from lowbit.runtime.kvcache import parse_cache


class ByteTokenizer:
    """One token per byte (ids < 256, as the tiny models' vocabulary)."""

    bos_token_id = None
    add_bos_token = False

    def __call__(self, text, add_special_tokens=True):
        return {"input_ids": list(text.encode())}

    def decode(self, ids, skip_special_tokens=False):
        return bytes(ids).decode(errors="replace")


def test_needle_prompts_have_the_length_and_the_key_at_the_depth():
    tok = ByteTokenizer()
    filler = torch.tensor(list(b"abcdefgh" * 200))
    cases = needle_cases(tok, filler, [300, 500], [0.0, 0.5, 1.0], per_cell=2, seed=1)
    assert len(cases) == 12 and len({c.key for c in cases}) > 1
    for c in cases:
        text = tok.decode(c.ids.tolist())
        needle = NEEDLE.format(key=c.key)
        assert c.ids.numel() == c.length and c.key.isdigit() and len(c.key) == 5
        assert text.startswith(INTRO) and text.endswith(QUESTION) and text.count(c.key) == 2
        before = text.index(needle) - len(INTRO)
        after = len(text) - len(QUESTION) - text.index(needle) - len(needle)
        assert before == round(c.depth * (before + after))
    assert needle_cases(tok, filler, [300], [0.5], seed=1)[0].key == cases[0].key  # seeded


def test_needle_errors():
    tok = ByteTokenizer()
    filler = torch.tensor(list(b"abc" * 50))
    with pytest.raises(ConfigError, match="100"):  # the length that cannot hold the fixed text
        needle_cases(tok, filler, [100], [0.5])
    with pytest.raises(ConfigError, match="2000") as e:  # the length the filler cannot fill
        needle_cases(tok, filler, [2000], [0.5])
    assert filler.numel() in numbers(str(e.value))  # and the filler's length
    with pytest.raises(ConfigError, match="depth"):
        needle_cases(tok, filler, [300], [1.5])


def test_task_loops_run_through_a_cache_and_a_lossless_cache_changes_nothing():
    model, tok = build_tiny("llama"), ByteTokenizer()
    filler = torch.tensor(list(b"the grass is green. " * 40))
    cases = needle_cases(tok, filler, [280], [0.5], per_cell=2)
    full = needle_eval(model, tok, cases, None, chunk=64, progress=False)
    same = needle_eval(model, tok, cases, parse_cache("h2o@1000"), chunk=64, progress=False)
    assert full.n == 2 and full.cells.keys() == {"280/0.5"} and same.accuracy == full.accuracy
    passages = ["alpha beta gamma delta", "one two three four five"]
    a = lambada_eval(model, tok, passages, None, progress=False)
    b = lambada_eval(model, tok, passages, parse_cache("kivi8-w0-b4"), progress=False)
    assert a.n == 2 and b.kv_bytes > 0 and a.kv_bytes is None
