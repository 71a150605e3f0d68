"""llama.cpp's named quantization mixes ("Q4_K_M" ...) as data: which block type each tensor gets.

A mix is not one block type: llama-quantize starts every 2-D weight at the mix's default type,
then moves some tensors up or down by their role (attn_v, ffn_down ...), their layer and the
model's shape (grouped-query attention, tied output), and finally falls back to a 32-block type
when a row cannot be cut into the type's 256-weight super-blocks. This module states those rules
for dense llama / qwen2 / gemma3 models (no experts), as llama.cpp's quantizer (vendored in the
pinned llama-cpp-python sdist, src/llama-quant.cpp) applies them; tests/formats/test_ggml_mixes.py
checks them against llama-quantize itself.

Layers: llama.cpp counts attn_v, ffn_down ... tensors in the order it visits them, which for a
dense model is layer order, so "layer i of n" below is the block index in the tensor's name.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from lowbit.errors import ConfigError

# weights per block of the types a mix can pick (ggml's block sizes); float types are one weight
BLOCK = {
    **dict.fromkeys(("F32", "F16", "BF16"), 1),
    **dict.fromkeys(("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "IQ4_NL"), 32),
    **dict.fromkeys(("Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "IQ2_XXS", "IQ2_XS", "IQ2_S",
                     "IQ3_XXS", "IQ3_S", "IQ4_XS"), 256),
}

# what a type becomes when a row is not a multiple of its block: a 32-block type of about as
# many bits (a 32-block type itself has nothing smaller to go to: F16)
_FALLBACK = {
    **dict.fromkeys(("IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ3_XXS", "IQ3_S", "IQ4_XS"), "IQ4_NL"),
    "Q2_K": "Q4_0", "Q3_K": "Q4_0", "Q4_K": "Q5_0", "Q5_K": "Q5_1", "Q6_K": "Q8_0",
}

# mix -> the block type of every weight no rule moves
DEFAULT_TYPE = {
    "Q4_0": "Q4_0", "Q4_1": "Q4_1", "Q5_0": "Q5_0", "Q5_1": "Q5_1", "Q8_0": "Q8_0",
    "Q2_K": "Q2_K", "Q2_K_S": "Q2_K", "Q3_K_S": "Q3_K", "Q3_K_M": "Q3_K", "Q3_K_L": "Q3_K",
    "Q4_K_S": "Q4_K", "Q4_K_M": "Q4_K", "Q5_K_S": "Q5_K", "Q5_K_M": "Q5_K", "Q6_K": "Q6_K",
    "IQ2_XXS": "IQ2_XXS", "IQ2_XS": "IQ2_XS", "IQ2_S": "IQ2_XS", "IQ2_M": "IQ2_S",
    "IQ3_XXS": "IQ3_XXS", "IQ3_XS": "IQ3_S", "IQ3_S": "IQ3_S", "IQ3_M": "IQ3_S",
    "IQ4_NL": "IQ4_NL", "IQ4_XS": "IQ4_XS",
}
MIXES = tuple(DEFAULT_TYPE)

_IQ2 = ("IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ2_M")  # one rule set of their own
_IQ2_SM = ("IQ2_S", "IQ2_M")
# the output head (and a tied embedding): Q6_K, Q5_K for the smallest i-quants, Q8_0 stays
_OUTPUT = {**dict.fromkeys(MIXES, "Q6_K"), **dict.fromkeys((*_IQ2, "IQ3_XXS"), "Q5_K"), "Q8_0": "Q8_0"}
# an untied token embedding: the default type, but never a 2-bit i-quant
_TOKEN_EMBD = {"IQ2_XXS": "Q2_K", "IQ2_XS": "Q2_K", "IQ2_S": "IQ3_S", "IQ2_M": "IQ3_S", "IQ3_XXS": "IQ3_S"}
# attn_output, by mix (the IQ2 mixes have their own)
_ATTN_OUTPUT = {"Q2_K": "Q3_K", "IQ3_XXS": "IQ3_S", "Q3_K_M": "Q4_K", "Q3_K_L": "Q5_K", "IQ3_M": "Q4_K"}
# attn_q and attn_k, by mix
_ATTN_QK = {"IQ3_XS": "IQ3_XXS", "IQ3_XXS": "IQ2_S"}

# a tensor name's role, tested in this order (llama.cpp matches substrings, e.g. ffn_down_exps)
_ROLES = (("attn_qkv.weight", "attn_v"), ("attn_v.weight", "attn_v"), ("attn_k.weight", "attn_k"),
          ("attn_q.weight", "attn_q"), ("attn_output.weight", "attn_output"), ("ffn_up", "ffn_up"),
          ("ffn_gate", "ffn_gate"), ("ffn_down", "ffn_down"))
_LAYER = re.compile(r"^blk\.(\d+)\.")


@dataclass(frozen=True)
class _Where:
    """What the rules look at besides the mix: layer i of n, the model's shape, the imatrix."""

    i: int
    n: int
    gqa: int           # attention heads per KV head
    has_imatrix: bool
    is_70b: bool       # llama.cpp's "70B" model type: attn_v gets more bits


def _more_bits(i: int, n: int) -> bool:
    """The layers llama.cpp gives more bits in Q4_K_M / Q5_K_M: the first and last eighth, and
    every third layer in between."""
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


def _iq2(mix: str, role: str, w: _Where) -> str | None:
    """The IQ2_* mixes' rules (they replace the others)."""
    small = "IQ3_S" if mix in _IQ2_SM else "Q2_K"
    if role == "attn_v":
        return "Q4_K" if w.gqa >= 4 else small
    if role == "ffn_down":
        return small if w.i < w.n // 8 else None
    if role == "attn_output" and mix in _IQ2_SM:
        return "IQ3_S"
    return None


def _attn_v(mix: str, w: _Where) -> str | None:
    """attn_v (and a fused attn_qkv): more bits than the rest, more still with grouped-query
    attention, where attn_v is a small tensor shared by several heads."""
    gqa4 = w.gqa >= 4
    rule = {
        "Q2_K": "Q4_K" if gqa4 else "Q3_K",
        "Q2_K_S": "Q4_K" if gqa4 else None,
        "IQ3_XXS": "Q4_K" if gqa4 else ("IQ3_XXS" if w.has_imatrix else "IQ3_S"),
        "IQ3_XS": "Q4_K" if gqa4 else None,
        "IQ3_S": "Q4_K" if gqa4 else None,
        "IQ3_M": "Q4_K",
        "Q3_K_M": "Q5_K" if w.i < 2 else "Q4_K",
        "Q3_K_L": "Q5_K",
        "IQ4_NL": "Q5_K" if gqa4 else None,
        "IQ4_XS": "Q5_K" if gqa4 else None,
        "Q4_K_M": "Q6_K" if _more_bits(w.i, w.n) else None,
        "Q5_K_M": "Q6_K" if _more_bits(w.i, w.n) else None,
        "Q4_K_S": "Q5_K" if w.i < 4 else None,
    }.get(mix)
    chosen = rule or DEFAULT_TYPE[mix]
    if w.is_70b and chosen in ("Q3_K", "Q4_K"):
        return "Q5_K"
    return rule


def _ffn_down(mix: str, w: _Where) -> str | None:
    """ffn_down: more bits in the first layers (all mixes of 3 to 5 bits), and in Q4_K_M / Q5_K_M
    in the same layers as attn_v."""
    first8, first16 = w.i < w.n // 8, w.i < w.n // 16
    return {
        "Q2_K": "Q3_K",
        "Q2_K_S": "Q4_K" if first8 else None,
        "IQ3_XXS": None if w.has_imatrix else ("Q4_K" if first8 else "Q3_K"),
        "Q3_K_M": "Q5_K" if first16 else "Q4_K",
        "IQ3_M": "Q4_K" if first8 else None,
        "Q3_K_L": "Q5_K",
        "Q4_K_M": "Q6_K" if _more_bits(w.i, w.n) else None,
        "IQ4_NL": "Q5_K" if first8 and not w.has_imatrix else None,
        "IQ4_XS": "Q5_K" if first8 and not w.has_imatrix else None,
        "Q5_K_M": "Q6_K" if _more_bits(w.i, w.n) else None,
        "Q4_K_S": "Q5_K" if first8 else None,
        "Q4_0": "Q4_1" if first8 and w.has_imatrix else None,
        "Q5_0": "Q5_1" if first8 and w.has_imatrix else None,
    }.get(mix)


def _block_rule(mix: str, role: str, w: _Where) -> str | None:
    """The type a decoder-block weight's role moves it to under `mix`, or None (the default)."""
    if mix in _IQ2:
        return _iq2(mix, role, w)
    if role == "attn_v":
        return _attn_v(mix, w)
    if role in ("attn_q", "attn_k"):
        return _ATTN_QK.get(mix)
    if role == "attn_output":
        return _ATTN_OUTPUT.get(mix)
    if role == "ffn_down":
        return _ffn_down(mix, w)
    if role in ("ffn_gate", "ffn_up") and mix == "IQ3_XS" and w.n // 8 <= w.i < 7 * w.n // 8:
        return "IQ3_XXS"
    return None


def is_70b(arch: str, n_layer: int, n_gqa: int) -> bool:
    """Whether llama.cpp classes the model as its "70B" type (80 layers; for llama, with GQA)."""
    return n_layer == 80 and (arch == "qwen2" or (arch == "llama" and n_gqa > 1))


def quantized(name: str) -> bool:
    """Whether llama-quantize quantizes a 2-D tensor of this name (norms it leaves as they are)."""
    return name.endswith("weight") and "_norm.weight" not in name


def check_mix(mix: str) -> str:
    """`mix` in llama.cpp's spelling (upper case); ConfigError naming the known mixes if unknown."""
    name = mix.strip().upper() if isinstance(mix, str) else mix
    if name not in DEFAULT_TYPE:
        raise ConfigError(f"unknown llama.cpp mix {mix!r}; choose one of {', '.join(MIXES)}")
    return name


def tensor_type(
    mix: str, name: str, n_layer: int, *, n_gqa: int = 1, tied_output: bool = False,
    has_imatrix: bool = False, row_width: int | None = None, arch: str = "llama",
) -> str:  # fmt: skip
    """The block type llama-quantize gives the 2-D GGUF weight `name` under `mix`.

    n_layer: the model's decoder blocks; n_gqa: attention heads per KV head; tied_output: the
    model has no output.weight (token_embd.weight is also the head, and gets the head's type);
    has_imatrix: an importance matrix was given (it changes a few choices); row_width: the
    tensor's input features (ne[0]); None means a multiple of 256, so no fallback applies.
    ConfigError for an unknown mix or a name llama.cpp does not quantize (norms).
    """
    mix = check_mix(mix)
    if not quantized(name):
        raise ConfigError(f"llama.cpp does not quantize {name!r}: it keeps its source type")
    default = DEFAULT_TYPE[mix]
    if name == "output.weight" or (tied_output and name == "token_embd.weight"):
        if row_width is not None and row_width % BLOCK[default]:
            chosen = "Q8_0"
        else:
            chosen = _OUTPUT[mix]
    elif name == "token_embd.weight":
        chosen = _TOKEN_EMBD.get(mix, default)
    else:
        role = next((r for key, r in _ROLES if key in name), None)
        layer = _LAYER.match(name)
        if role is not None and layer is None and role in ("attn_v", "ffn_down", "ffn_gate", "ffn_up"):
            raise ConfigError(f"{name!r}: a {role} weight needs its layer, blk.N.{role}.weight")
        i = int(layer.group(1)) if layer else 0
        if layer and not 0 <= i < n_layer:
            raise ConfigError(f"{name!r}: layer {i} is outside the model's {n_layer} layers")
        where = _Where(i, n_layer, n_gqa, has_imatrix, is_70b(arch, n_layer, n_gqa))
        chosen = (_block_rule(mix, role, where) if role else None) or default
    return chosen if row_width is None else fallback_type(chosen, row_width)


def fallback_type(type_name: str, row_width: int | None = None) -> str:
    """The type llama.cpp stores a tensor in when its rows do not fit `type_name`'s blocks.

    Without `row_width`: the replacement for a row that is not a multiple of the type's block
    (Q4_K -> Q5_0, Q6_K -> Q8_0, IQ4_XS -> IQ4_NL ...; a 32-block type -> F16), assuming the row
    is a multiple of 32. With it: the type actually used for rows of that width (`type_name`
    itself when they fit, F16 when not even the 32-block replacement does).
    """
    name = type_name.strip().upper() if isinstance(type_name, str) else type_name
    if name not in BLOCK:
        raise ConfigError(f"unknown ggml type {type_name!r}; choose one of {', '.join(BLOCK)}")
    if row_width is not None and row_width % BLOCK[name] == 0:
        return name
    replacement = _FALLBACK.get(name, "F16")
    if row_width is not None and row_width % BLOCK[replacement]:
        return "F16"
    return replacement
