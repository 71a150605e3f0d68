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


CHAT_WORDS = ["<unk>", "<s>", "</s>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>",
              *(f"w{i}" for i in range(57))]
# one turn: "<|role|> content <|end|>"; the assistant's turn is opened for generation
CHAT_TEMPLATE = ("{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} <|end|> "
                 "{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}")


def save_tiny_folder(folder, chat_template: str | None = None, seed: int = 0):
    """A complete Hugging Face folder: a 2-block Llama (hidden 64) and a word-level tokenizer over
    CHAT_WORDS (the role markers are special tokens), with `chat_template` if given."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    torch.manual_seed(seed)
    config = LlamaConfig(**{**_COMMON, "vocab_size": len(CHAT_WORDS), "max_position_embeddings": 256},
                         tie_word_embeddings=False, initializer_range=0.1)
    LlamaForCausalLM(config).eval().save_pretrained(folder)
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(CHAT_WORDS)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.add_special_tokens(CHAT_WORDS[1:7])
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    if chat_template is not None:
        tok.chat_template = chat_template
    tok.save_pretrained(folder)
    return folder


def records_of(model) -> dict:
    """{layer name: QuantizedWeight} of the QuantLinear modules a test swapped into `model`, for
    save_checkpoint (which takes records): tests build quantized models module by module."""
    from lowbit.runtime.qlinear import QuantLinear

    return {n: m.quantized_weight() for n, m in model.named_modules() if isinstance(m, QuantLinear)}
