"""The --kv grammar: names parse to their settings once, labels round-trip, bad names are refused
naming the option."""

import pytest
from tiny_models import build_tiny

from lowbit.errors import ConfigError
from lowbit.runtime.kvcache.build import kv_cache_for
from lowbit.runtime.kvcache.spec import (
    CacheSpec,
    EvictSpec,
    GearSpec,
    KVSpec,
    ZipSpec,
    cache_choice,
    parse_cache,
    parse_kv,
)


def test_bad_names():
    assert KVSpec.parse("kivi2-b64") == KVSpec(2, 64) and KVSpec.parse("int4-w0").window == 0
    assert kv_cache_for(build_tiny("llama").config, "none") is None
    assert KVSpec.parse("kivi3").bits == 3
    assert KVSpec.parse("kivi2-c1-a4") == KVSpec(bits=2, clip=1, sinks=4)
    for bad in ("int5", "fp8", "kivi2-b0", "kivi2-x3", "zipcache-h2-l4", "gear2-b48", "zipcache-r1.5", "kivi2-c2"):
        with pytest.raises(ConfigError, match="--kv"):
            KVSpec.parse(bad)


def test_names_parse_to_their_settings():
    assert parse_kv("zipcache-h8-l2-r0.5") == ZipSpec(hi=8, lo=2, salient=0.5)
    assert parse_kv("gear2-r4-s0.02") == GearSpec(2, rank=4, outliers=0.02)
    assert cache_choice(None, "snapkv", "0.2") == CacheSpec("snapkv@0.2", evict=EvictSpec("snapkv", 0.2))
    assert cache_choice("kivi2") == CacheSpec("kivi2", lowbit=KVSpec(2)) and str(cache_choice("kivi2")) == "kivi2"
    assert cache_choice("full") is None
    with pytest.raises(ConfigError, match="together"):
        cache_choice("kivi2", "h2o", 0.2)
    with pytest.raises(ConfigError, match="needs --kv-policy"):
        cache_choice(None, None, 0.2)


def test_a_cache_choice_is_parsed_once_into_its_spec():
    assert parse_cache("full") is None and parse_cache(None) is None
    assert parse_cache("kivi2-b64") == CacheSpec("kivi2-b64", lowbit=KVSpec(2, 64))
    assert parse_cache("snapkv@0.2") == CacheSpec("snapkv@0.2", evict=EvictSpec("snapkv", 0.2))
    config = build_tiny("llama").config
    by_spec = kv_cache_for(config, parse_cache("gear2-r4"))
    by_name = kv_cache_for(config, "gear2-r4")
    assert [layer.spec for layer in by_spec.layers] == [layer.spec for layer in by_name.layers]
    with pytest.raises(ConfigError, match="already names an eviction policy"):
        kv_cache_for(config, parse_cache("h2o@8"), policy=EvictSpec("h2o", 8))
