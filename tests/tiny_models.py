"""Tiny random decoder models of each supported architecture, built in-process (no download)."""

import torch
from transformers import (
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    LlamaConfig,
    LlamaForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

TINY_VOCAB = 256

_COMMON = {"vocab_size": TINY_VOCAB, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
               "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 512}


def build_tiny(arch: str, seed: int = 0, tie: bool = True):
    torch.manual_seed(seed)
    if arch == "llama":
        model = LlamaForCausalLM(LlamaConfig(**_COMMON, tie_word_embeddings=tie, initializer_range=0.1))
    elif arch == "qwen2":
        model = Qwen2ForCausalLM(Qwen2Config(**_COMMON, tie_word_embeddings=tie, initializer_range=0.1))
    elif arch == "gemma3":
        cfg = Gemma3TextConfig(**_COMMON, head_dim=16, sliding_window=8, tie_word_embeddings=tie,
                               initializer_range=0.1, layer_types=["sliding_attention", "full_attention"])
        model = Gemma3ForCausalLM(cfg)
    else:
        raise ValueError(arch)
    return model.eval()


def records_of(model) -> dict:
    """{layer name: QuantizedWeight} of the QuantLinear modules a test swapped into `model`, for
    save_checkpoint (which takes records): tests build quantized models module by module."""
    from lowbit.runtime.qlinear import QuantLinear

    return {n: m.quantized_weight() for n, m in model.named_modules() if isinstance(m, QuantLinear)}
