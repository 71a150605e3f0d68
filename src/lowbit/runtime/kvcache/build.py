"""A cache choice (a CacheSpec) -> the transformers Cache that holds it (kv_cache_for), and the
prompt-then-evict step (compress)."""

from __future__ import annotations

from transformers.cache_utils import Cache

from lowbit.errors import ConfigError
from lowbit.runtime.kvcache.eviction import EvictingLayer
from lowbit.runtime.kvcache.layers import GearLayer, KIVILayer, ZipLayer
from lowbit.runtime.kvcache.spec import (
    CacheSpec,
    EvictSpec,
    GearSpec,
    HFQuantizedSpec,
    ZipSpec,
    parse_cache,
)


def kv_cache_for(config, name: CacheSpec | str | None = None, policy: EvictSpec | None = None,
                 mode: str = "stream") -> Cache | None:
    """A Cache for `config`'s decoder: a CacheSpec (what lowbit's own callers pass, parsed once at
    their boundary), or for convenience a --kv name or "<policy>@<budget>" label, parsed here; an
    eviction policy; or neither (None: the model's default cache). Combining a low-bit cache with
    eviction is refused for now."""
    if isinstance(name, str) and name not in ("none", "full") and policy is not None:
        raise ConfigError(f"{name!r} already names an eviction policy" if "@" in name else
                          "--kv and --kv-policy together are not supported yet: pick a low-bit cache or an eviction "
                          "policy")
    spec = parse_cache(name)
    if spec is not None and spec.evict is not None:
        if policy is not None:
            raise ConfigError(f"{spec.label!r} already names an eviction policy")
        spec, policy = None, spec.evict
    if spec is None and policy is None:
        return None
    if spec is not None and policy is not None:
        raise ConfigError("--kv and --kv-policy together are not supported yet: pick a low-bit cache or an eviction policy")
    cfg = config.get_text_config() if hasattr(config, "get_text_config") else config
    n = cfg.num_hidden_layers
    if policy is not None:
        return Cache(layers=[EvictingLayer(policy, mode) for _ in range(n)])
    lowbit = spec.lowbit
    if isinstance(lowbit, HFQuantizedSpec):
        from transformers.cache_utils import QuantizedCache

        try:
            return QuantizedCache("hqq", config, nbits=lowbit.bits, axis_key=1, axis_value=1,
                                  q_group_size=lowbit.group_size, residual_length=lowbit.residual)
        except ImportError as e:
            raise ConfigError(f"--kv {spec.label}: {e}") from None
    if isinstance(lowbit, ZipSpec):
        return Cache(layers=[ZipLayer(lowbit, seed=i) for i in range(n)])
    if isinstance(lowbit, GearSpec):
        return Cache(layers=[GearLayer(lowbit) for _ in range(n)])
    return Cache(layers=[KIVILayer(lowbit) for _ in range(n)])


def compress(cache: Cache | None) -> None:
    """After a prompt's prefill: evict every prompt-mode layer down to its budget."""
    if cache is None:
        return
    for layer in cache.layers:
        if isinstance(layer, EvictingLayer):
            layer.compress()
