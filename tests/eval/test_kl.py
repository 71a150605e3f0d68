import copy
import math
import re

import pytest
import torch
from rendered import numbers

from lowbit.errors import ConfigError, DataNotFoundError
from lowbit.eval import ReferenceLogits, compare_to_reference, perplexity


@pytest.fixture(scope="module")
def perturbed(model):
    other = copy.deepcopy(model)
    torch.manual_seed(2)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(0.05 * p.std() * torch.randn_like(p))
    return other


def test_model_against_itself(model, tokens):
    r = compare_to_reference(model, model, tokens, 32, progress=False)
    assert r.kl_mean == 0.0 and r.kl_p99 == 0.0
    assert r.top1_agreement == 1.0
    assert r.ppl == r.ref_ppl
    assert (r.n_tokens_scored, r.seqlen) == (3 * 31, 32)


def test_perturbed_copy(model, perturbed, tokens):
    r = compare_to_reference(perturbed, model, tokens, 32, progress=False)
    assert r.kl_mean > 1e-3
    assert r.kl_p99 >= r.kl_mean
    assert r.top1_agreement < 1.0
    assert r.ref_ppl == pytest.approx(perplexity(model, tokens, 32, progress=False).ppl, rel=1e-6)
    assert r.ppl == pytest.approx(perplexity(perturbed, tokens, 32, progress=False).ppl, rel=1e-6)


def test_kl_matches_direct_formula(model, perturbed, tokens):
    """KL(ref || cand) from softmax probabilities over the same scored positions."""
    kls = []
    with torch.no_grad():
        for w in range(3):
            ids = tokens[:, w * 32 : (w + 1) * 32]
            p = model(ids).logits[0, :-1].double().softmax(-1)
            q = perturbed(ids).logits[0, :-1].double().softmax(-1)
            kls.append((p * (p.log() - q.log())).sum(-1))
    expected = torch.cat(kls).mean().item()
    r = compare_to_reference(perturbed, model, tokens, 32, progress=False)
    assert r.kl_mean == pytest.approx(expected, rel=1e-4)


def test_cache_matches_live_reference(model, perturbed, tokens, tmp_path):
    cache = ReferenceLogits.build(model, tokens, 32, tmp_path / "ref", progress=False)
    live = compare_to_reference(perturbed, model, tokens, 32, progress=False)
    cached = compare_to_reference(perturbed, cache, tokens, 32, progress=False)
    # fp16 rounding of the stored log-probs averages out: measured ~1e-7 relative
    assert cached.kl_mean == pytest.approx(live.kl_mean, rel=1e-3)
    assert cached.top1_agreement == live.top1_agreement
    assert cached.ref_ppl == pytest.approx(live.ref_ppl, rel=1e-9)
    assert cached.ppl == live.ppl

    reopened = ReferenceLogits.open(tmp_path / "ref")
    assert reopened == cache
    assert reopened.ppl == pytest.approx(live.ref_ppl, rel=1e-9)
    size = (tmp_path / "ref" / "logprobs.f16").stat().st_size
    assert size == ReferenceLogits.disk_bytes(100, 32, 128) == 3 * 31 * 128 * 2


def test_cache_against_its_own_model_is_near_zero(model, tokens, tmp_path):
    cache = ReferenceLogits.build(model, tokens, 32, tmp_path / "ref", progress=False)
    r = compare_to_reference(model, cache, tokens, 32, progress=False)
    assert abs(r.kl_mean) < 1e-5  # fp16 rounding of the stored log-probs only
    assert r.top1_agreement == 1.0


def test_cache_refuses_other_tokens(model, tokens, tmp_path):
    cache = ReferenceLogits.build(model, tokens, 32, tmp_path / "ref", progress=False)
    other = tokens.clone()
    other[0, 0] += 1
    for toks, seqlen in ((other, 32), (tokens, 16)):
        with pytest.raises(ConfigError, match=re.escape(str(tmp_path / "ref"))):  # names the cache it refuses
            compare_to_reference(model, cache, toks, seqlen, progress=False)


def test_open_missing_cache(tmp_path):
    with pytest.raises(DataNotFoundError, match=re.escape(str(tmp_path))):
        ReferenceLogits.open(tmp_path)


def test_too_few_tokens(model):
    short = torch.zeros(1, 31, dtype=torch.long)
    with pytest.raises(ConfigError, match="seqlen") as e:
        compare_to_reference(model, model, short, 32, progress=False)
    assert {31, 32} <= set(numbers(str(e.value)))  # the tokens given, the window asked for


def test_kl_is_finite_where_reference_gives_zero_probability(constant_logits):
    """-inf reference log-probs are p = 0 terms: they add 0, not nan."""
    ref = constant_logits(torch.tensor([0.0, 0.0, -math.inf]))  # p = [1/2, 1/2, 0]
    cand = constant_logits(torch.zeros(3))  # q = [1/3, 1/3, 1/3]
    r = compare_to_reference(cand, ref, torch.zeros(1, 4, dtype=torch.long), 4, progress=False)
    assert r.kl_mean == pytest.approx(math.log(1.5))  # 2 * 1/2 * log((1/2) / (1/3))
