"""Architecture helpers for block-by-block calibration: where the decoder blocks are, and in
which order a block's linear layers can be quantized.

Supported layouts are data (LAYOUTS): a new architecture whose block uses other module names is
one more entry, not a new branch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from lowbit.errors import ConfigError

# Linear layers of one decoder block, grouped in the order they can be quantized sequentially:
# the layers of a group read the same input, and each group's input depends on the groups before.
LAYOUTS: dict[str, tuple[tuple[str, ...], ...]] = {
    # Llama, Qwen2, Gemma3 (Gemma3's q_norm / k_norm are norms, not linears)
    "llama-style": (
        ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
        ("self_attn.o_proj",),
        ("mlp.gate_proj", "mlp.up_proj"),
        ("mlp.down_proj",),
    ),
}

# Activation-aware smoothing (AWQ): the op whose output feeds each group of linear layers, so a
# per-input-channel scale can be folded into it. The first name present in the block wins
# (Gemma3 feeds its MLP from pre_feedforward_layernorm; its post_attention_layernorm normalizes
# the attention output before the residual add). v_proj -> o_proj only folds when v's output
# channels are o's input channels (no grouped-query attention).
SMOOTH_PAIRS: tuple[tuple[tuple[str, ...], tuple[str, ...]], ...] = (
    (("input_layernorm",), ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
    (("self_attn.v_proj",), ("self_attn.o_proj",)),
    (("pre_feedforward_layernorm", "post_attention_layernorm"), ("mlp.gate_proj", "mlp.up_proj")),
    (("mlp.up_proj",), ("mlp.down_proj",)),
)

# Norms that multiply by (offset + weight) instead of weight.
NORM_WEIGHT_OFFSET: dict[str, float] = {"Gemma3RMSNorm": 1.0, "GemmaRMSNorm": 1.0, "Gemma2RMSNorm": 1.0}


@dataclass(frozen=True)
class SmoothGroup:
    prev: str                   # module (a norm or a linear) whose output channels are the inputs
    linears: tuple[str, ...]    # the linear layers reading that output


def smoothing_groups(block: nn.Module) -> list[SmoothGroup]:
    """Where per-input-channel scales can be folded in this block (see SMOOTH_PAIRS)."""
    groups = []
    for prevs, linears in SMOOTH_PAIRS:
        prev = next((p for p in prevs if _get(block, p) is not None), None)
        if prev is None or any(_get(block, n) is None for n in linears):
            continue
        src = _get(block, prev)
        width = src.out_features if isinstance(src, nn.Linear) else getattr(src, "weight", torch.empty(0)).numel()
        if all(_get(block, n).in_features == width for n in linears):
            groups.append(SmoothGroup(prev, linears))
    return groups


def norm_weight_offset(norm: nn.Module) -> float:
    return NORM_WEIGHT_OFFSET.get(type(norm).__name__, 0.0)


# Where the decoder blocks of a causal LM live, relative to the model (first match wins).
_LAYER_PATHS = ("model.layers", "layers")


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The model's decoder blocks in order (`model.model.layers` for Llama, Qwen2, Gemma3)."""
    for path in _LAYER_PATHS:
        layers = _get(model, path)
        if isinstance(layers, nn.ModuleList):
            return layers
    raise ConfigError(
        f"unsupported architecture {_model_type(model)}: no decoder blocks at "
        f"{' or '.join(_LAYER_PATHS)}"
    )


def linear_layers(block: nn.Module) -> dict[str, nn.Linear]:
    """The block's nn.Linear modules by name relative to the block, in module order."""
    return {name: m for name, m in block.named_modules() if isinstance(m, nn.Linear)}


def sequential_linear_groups(block: nn.Module) -> list[list[str]]:
    """Names of the block's linear layers, grouped in sequential-quantization order.

    The block's linear layers must be exactly those of one entry in LAYOUTS; otherwise a
    ConfigError names the model type and the unexpected or missing layers.
    """
    found = set(linear_layers(block))
    for groups in LAYOUTS.values():
        if found == {name for group in groups for name in group}:
            return [list(group) for group in groups]
    expected = {name for groups in LAYOUTS.values() for group in groups for name in group}
    raise ConfigError(
        f"unsupported architecture {_model_type(block)} ({type(block).__name__}): its linear "
        f"layers {sorted(found)} match no supported layout; unexpected: "
        f"{sorted(found - expected)}, missing: {sorted(expected - found)}"
    )


def _get(module: nn.Module, dotted: str) -> object | None:
    """The attribute at a dotted path, or None."""
    obj: object | None = module
    for part in dotted.split("."):
        obj = getattr(obj, part, None)
    return obj


def _model_type(module: nn.Module) -> str:
    """The transformers model_type of a model or block, found on any submodule's config."""
    for m in module.modules():
        model_type = getattr(getattr(m, "config", None), "model_type", None)
        if isinstance(model_type, str):
            return repr(model_type)
    return f"(model_type unknown, module {type(module).__name__})"
