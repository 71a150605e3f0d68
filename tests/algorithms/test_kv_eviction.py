"""Eviction policies keep exactly the tokens they name, on hand-built attention patterns."""

import pytest
import torch

from lowbit.algorithms import kv_eviction as ev
from lowbit.errors import ConfigError
from lowbit.runtime.kvcache.eviction import EvictingLayer
from lowbit.runtime.kvcache.spec import parse_policy


def test_attention_probs_is_causal_softmax_averaged_over_query_groups():
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(1, 4, 3, 8, generator=g), torch.randn(1, 2, 5, 8, generator=g)
    p = ev.attention_probs(q, k, 0.5)
    # slow reference: per query head, per query, softmax over the keys it may see
    want = torch.zeros(1, 2, 3, 5)
    for h in range(4):
        for i in range(3):
            seen = 5 - 3 + i + 1
            s = (q[0, h, i] @ k[0, h // 2, :seen].T * 0.5).softmax(-1)
            want[0, h // 2, i, :seen] += s / 2
    torch.testing.assert_close(p, want)


def test_streaming_keeps_the_sinks_and_the_most_recent_tokens():
    idx = ev.streaming_keep(1, 2, 20, 7, sinks=3)
    assert idx.shape == (1, 2, 7) and idx[0, 1].tolist() == [0, 1, 2, 16, 17, 18, 19]


def test_h2o_keeps_the_heavy_hitters_per_head_and_the_recent_window():
    acc = torch.zeros(1, 2, 12)
    acc[0, 0, [1, 4]] = 5.0       # head 0's heavy hitters
    acc[0, 1, [2, 7]] = 5.0       # head 1's
    acc[0, :, 11] = 100.0         # recent anyway
    idx = ev.h2o_keep(acc, 4, recent=2)
    assert idx[0, 0].tolist() == [1, 4, 10, 11] and idx[0, 1].tolist() == [2, 7, 10, 11]


def test_snapkv_keeps_the_window_and_what_it_votes_for_with_its_neighbours():
    probs = torch.zeros(1, 1, 2, 30)
    probs[0, 0, :, 10] = 1.0      # one strong vote: pooling spreads it to 9..11 first
    probs[0, 0, :, 25] = 0.1      # a weak vote
    idx = ev.snapkv_keep(probs, 5, window=2, kernel=3)
    assert idx[0, 0].tolist() == [9, 10, 11, 28, 29]
    no_pool = ev.snapkv_keep(probs, 5, window=2, kernel=1)
    assert {10, 25, 28, 29} <= set(no_pool[0, 0].tolist())


def test_impossible_budgets_are_refused_with_the_fix():
    with pytest.raises(ConfigError, match="at least one"):
        ev.streaming_keep(1, 1, 10, 0)
    with pytest.raises(ConfigError, match="cannot keep 11 tokens of a cache that holds 10"):
        ev.h2o_keep(torch.zeros(1, 1, 10), 11, 2)
    for bad in ("0", "-3", "2.5", "abc"):
        with pytest.raises(ConfigError, match="--kv-budget"):
            parse_policy("h2o", bad)
    with pytest.raises(ConfigError, match="needs --kv-budget"):
        parse_policy("snapkv", None)
    with pytest.raises(ConfigError, match="--kv-policy 'lru'"):
        parse_policy("lru", 0.2)


def _pattern(n, hot, d=8):
    """Keys: token t has key e_{t mod d} scaled, except the `hot` tokens share direction 0, which
    every query points at; values carry each token's index so kept tokens can be read back."""
    keys = torch.zeros(1, 1, n, d)
    keys[0, 0, torch.arange(n), 1 + torch.arange(n) % (d - 1)] = 1.0
    keys[0, 0, hot] = 0.0
    keys[0, 0, hot, 0] = 1.0
    values = torch.arange(n, dtype=torch.float32).reshape(1, 1, n, 1).expand(1, 1, n, d).clone()
    query = torch.zeros(1, 1, n, d)
    query[..., 0] = 10.0
    return keys, values, query


@pytest.mark.parametrize("policy", ["h2o", "snapkv"])
def test_a_layer_keeps_the_tokens_the_queries_attend_to(policy):
    keys, values, query = _pattern(40, hot=[3, 17, 22])
    layer = EvictingLayer(parse_policy(policy, 8, window=4, kernel=1))
    k, _ = layer.update(keys, values)
    layer.observe(query, k, 1.0)
    kept = layer.values[0, 0, :, 0].long().tolist()
    assert len(kept) == 8 and {3, 17, 22} <= set(kept)
    recent = 4
    assert kept[-recent:] == [36, 37, 38, 39]
    assert layer.get_seq_length() == 40 and layer.get_mask_sizes(5) == (13, 32)


def test_prompt_mode_keeps_everything_until_compressed_then_streams():
    keys, values, query = _pattern(40, hot=[5])
    layer = EvictingLayer(parse_policy("streaming", 0.25, sinks=2), mode="prompt")
    with pytest.raises(ConfigError, match="cache is empty"):
        layer.compress()
    layer.update(keys, values)
    layer.observe(query, keys, 1.0)
    assert layer.keys.shape[-2] == 40
    layer.compress()
    assert layer.values[0, 0, :, 0].long().tolist() == [0, 1] + list(range(32, 40))
    k1, v1, q1 = keys[..., :1, :], torch.full((1, 1, 1, 8), 40.0), query[..., :1, :]
    layer.update(k1, v1)
    layer.observe(q1, layer.keys, 1.0)  # streaming: evicts again at every step (41 * 0.25 -> 11)
    assert layer.values[0, 0, :, 0].long().tolist() == [0, 1] + list(range(32, 41))


def test_snapkv_without_the_queries_is_a_clear_error():
    keys, values, _ = _pattern(20, hot=[1])
    layer = EvictingLayer(parse_policy("snapkv", 5), mode="prompt")
    layer.update(keys, values)
    with pytest.raises(ConfigError, match="observing"):
        layer.compress()
