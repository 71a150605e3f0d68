"""The one factory of tiny models for the tests: random decoders of each architecture family built
in-process (no download), the tokenizers that go with them, and a complete Hugging Face folder on
disk. Every test that needs a tiny model takes it from here.

Defaults are the suite's standard tiny model: 2 blocks, hidden 64, MLP 128, 4 query and 2 KV heads,
vocabulary 256, a tied head, initializer range 0.1 (peaked enough that a perturbed copy has a clear
KL), float32, weights drawn after `torch.manual_seed(seed)`."""

from __future__ import annotations

import json
from pathlib import Path

import torch

TINY_VOCAB = 256
FOLDER_POSITIONS = 256  # max_position_embeddings of the models written to disk

ARCHS = ("llama", "qwen2", "gemma3")  # the families lowbit supports; "gpt2" is a family it refuses


def tiny_config(arch: str = "llama", *, layers: int = 2, hidden: int = 64, vocab: int = TINY_VOCAB,
                tie: bool = True, max_positions: int = 512, **overrides):
    """The transformers config of a tiny `arch` model; `overrides` are passed on to the config
    (e.g. sliding-window settings)."""
    import transformers

    if arch == "gpt2":
        return transformers.GPT2Config(n_embd=hidden, n_layer=layers, n_head=4, vocab_size=vocab,
                                       n_positions=max_positions, tie_word_embeddings=tie,
                                       initializer_range=0.1, **overrides)
    common = {"vocab_size": vocab, "hidden_size": hidden, "intermediate_size": 2 * hidden,
              "num_hidden_layers": layers, "num_attention_heads": 4, "num_key_value_heads": 2,
              "max_position_embeddings": max_positions, "tie_word_embeddings": tie, "initializer_range": 0.1}
    if arch == "llama":
        return transformers.LlamaConfig(**common, **overrides)
    if arch == "qwen2":
        return transformers.Qwen2Config(**common, **overrides)
    if arch == "gemma3":
        gemma = {"head_dim": hidden // 4, "sliding_window": 8,
                 "layer_types": ["full_attention" if i % 2 else "sliding_attention" for i in range(layers)]}
        return transformers.Gemma3TextConfig(**common, **{**gemma, **overrides})
    raise ValueError(f"no tiny model of architecture {arch!r}")


def build_tiny(arch: str = "llama", seed: int = 0, tie: bool = True, *, layers: int = 2, hidden: int = 64,
               vocab: int = TINY_VOCAB, dtype: torch.dtype = torch.float32, max_positions: int = 512,
               **overrides) -> torch.nn.Module:
    """A tiny random `arch` causal LM in eval mode (see the module docstring for the defaults)."""
    import transformers

    cls = {"llama": transformers.LlamaForCausalLM, "qwen2": transformers.Qwen2ForCausalLM,
           "gemma3": transformers.Gemma3ForCausalLM, "gpt2": transformers.GPT2LMHeadModel}
    config = tiny_config(arch, layers=layers, hidden=hidden, vocab=vocab, tie=tie, max_positions=max_positions,
                         **overrides)
    torch.manual_seed(seed)
    return cls[arch](config).to(dtype).eval()


def tiny_llama(seed: int = 0, **kw):
    return build_tiny("llama", seed, **kw)


def tiny_qwen2(seed: int = 0, **kw):
    return build_tiny("qwen2", seed, **kw)


def tiny_gemma3(seed: int = 0, **kw):
    return build_tiny("gemma3", seed, **kw)


def tiny_gpt2(seed: int = 0, **kw):
    """GPT-2: an architecture lowbit does not support (for the refusal tests)."""
    return build_tiny("gpt2", seed, **kw)


# --- tokenizers -----------------------------------------------------------------------------------

class ByteTokenizer:
    """In-process stand-in for a tokenizer of a TINY_VOCAB model: one id per UTF-8 byte, folded into
    1..TINY_VOCAB-1 (id 0 is EOS)."""

    eos_token_id = 0

    def __call__(self, text):
        return {"input_ids": [1 + b % (TINY_VOCAB - 1) for b in text.encode()]}

    def save_pretrained(self, path):
        pass


def loaded_tiny(arch: str = "llama", seed: int = 0, **kw):
    """build_tiny(arch, seed, **kw) with a ByteTokenizer, as the LoadedModel that quantize() takes."""
    from lowbit.models.load import LoadedModel, ModelSource

    src = ModelSource(spec="tiny", kind="hf_folder", path=None, gguf_file=None, name="tiny", sha256=None)
    return LoadedModel(build_tiny(arch, seed, **kw), ByteTokenizer(), src)


# word-level vocabularies of the folders on disk: ids are list positions
WORDS = ["<unk>", "<s>", "</s>", *(f"w{i}" for i in range(61))]
CHAT_WORDS = ["<unk>", "<s>", "</s>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>",
              *(f"w{i}" for i in range(57))]
# one turn: "<|role|> content <|end|>"; the assistant's turn is opened for generation
CHAT_TEMPLATE = ("{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} <|end|> "
                 "{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}")


def word_tokenizer(words: list[str] = CHAT_WORDS, chat_template: str | None = None):
    """A word-level fast tokenizer over `words`: whitespace-split, every word in angle brackets but
    <unk> a special token, <unk>/<s>/</s> as unk/bos/eos."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.add_special_tokens([w for w in words if w.startswith("<") and w != "<unk>"])
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    if chat_template is not None:
        tok.chat_template = chat_template
    return tok


def save_tiny_folder(folder, chat_template: str | None = None, seed: int = 0, *, model=None,
                     words: list[str] = CHAT_WORDS, tie: bool = False, arch: str = "llama") -> Path:
    """A complete Hugging Face folder: `model` (default: a tiny `arch` with vocabulary len(words),
    max positions FOLDER_POSITIONS, untied head unless `tie`) and word_tokenizer(words, chat_template).
    Returns the folder."""
    if model is None:
        model = build_tiny(arch, seed, tie, vocab=len(words), max_positions=FOLDER_POSITIONS)
    model.save_pretrained(folder)
    word_tokenizer(words, chat_template).save_pretrained(folder)
    return Path(folder)


def records_of(model) -> dict:
    """{layer name: QuantizedWeight} of the QuantLinear modules a test swapped into `model`, for
    save_checkpoint (which takes records): tests build quantized models module by module."""
    from lowbit.runtime.qlinear import QuantLinear

    return {n: m.quantized_weight() for n, m in model.named_modules() if isinstance(m, QuantLinear)}


def quantize_all(model, bits=3, group_size=16, act_order_every=3):
    """Swap every decoder linear for a QuantLinear; some with GPTQ act-order (a stored perm)."""
    from lowbit.algorithms.gptq import gptq_quantize
    from lowbit.algorithms.rtn import rtn_quantize
    from lowbit.qtensor import QuantFormat
    from lowbit.recipes import GPTQConfig
    from lowbit.runtime.qlinear import QuantLinear

    names = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and ".layers." in n]
    for k, name in enumerate(names):
        lin = model.get_submodule(name)
        w = lin.weight.detach()
        fmt = QuantFormat.resolved(w.shape[1], bits, group_size, False)
        if k % act_order_every == 0:
            x = torch.randn(64, w.shape[1], generator=torch.Generator().manual_seed(k))
            qw = gptq_quantize(w, 2 * x.T @ x / 64, fmt, config=GPTQConfig(act_order=True)).qweight
        else:
            qw = rtn_quantize(w, QuantFormat.resolved(w.shape[1], bits, group_size, k % 2 == 1))
        model.set_submodule(name, QuantLinear.from_quantized(qw, lin.bias))
    return names


# A sentencepiece vocabulary of single characters (a space is "\u2581"), so any text of words like
# "w12 w3" tokenizes without merges.
GGUF_PIECES = ["<unk>", "<s>", "</s>", "\u2581", "w", *"0123456789", *(f"x{i}" for i in range(49))]


def tiny_gguf_metadata(model, arch: str):
    """The GGUF keys llama.cpp and transformers need for a tiny `arch` model with the GGUF_PIECES vocabulary."""
    import gguf

    from lowbit.export.gguf import GGUFMetadata

    c = model.config
    V = gguf.GGUFValueType
    fields = {
        f"{arch}.block_count": (c.num_hidden_layers, V.UINT32, None),
        f"{arch}.context_length": (c.max_position_embeddings, V.UINT32, None),
        f"{arch}.embedding_length": (c.hidden_size, V.UINT32, None),
        f"{arch}.feed_forward_length": (c.intermediate_size, V.UINT32, None),
        f"{arch}.attention.head_count": (c.num_attention_heads, V.UINT32, None),
        f"{arch}.attention.head_count_kv": (c.num_key_value_heads, V.UINT32, None),
        f"{arch}.attention.layer_norm_rms_epsilon": (float(c.rms_norm_eps), V.FLOAT32, None),
        f"{arch}.rope.freq_base": (10000.0, V.FLOAT32, None),
        f"{arch}.vocab_size": (c.vocab_size, V.UINT32, None),
        "tokenizer.ggml.model": ("llama", V.STRING, None),
        "tokenizer.ggml.tokens": (GGUF_PIECES, V.ARRAY, V.STRING),
        "tokenizer.ggml.scores": ([0.0] * len(GGUF_PIECES), V.ARRAY, V.FLOAT32),
        "tokenizer.ggml.token_type": ([2, 3, 3] + [1] * (len(GGUF_PIECES) - 3), V.ARRAY, V.INT32),
        "tokenizer.ggml.bos_token_id": (1, V.UINT32, None),
        "tokenizer.ggml.eos_token_id": (2, V.UINT32, None),
        "tokenizer.ggml.unknown_token_id": (0, V.UINT32, None),
    }
    if arch == "gemma3":
        fields[f"{arch}.attention.key_length"] = (c.head_dim, V.UINT32, None)
        fields[f"{arch}.attention.value_length"] = (c.head_dim, V.UINT32, None)
        fields[f"{arch}.attention.sliding_window"] = (c.sliding_window, V.UINT32, None)
    return GGUFMetadata(arch, fields)


def write_tiny_gguf_of(path, arch: str = "llama", *, hidden: int = 256, tie: bool = False, seed: int = 0):
    """A float32 GGUF of a tiny `arch` model (rows wide enough for the K types' 256-weight blocks),
    written with lowbit's own writer; returns the transformers model it holds."""
    from lowbit.export.gguf import gguf_names, to_gguf_layout, write_gguf

    model = build_tiny(arch, seed=seed, tie=tie, hidden=hidden, vocab=len(GGUF_PIECES), max_positions=FOLDER_POSITIONS)
    names = gguf_names(model, arch)
    tensors = {names[n]: to_gguf_layout(arch, names[n], p.detach(), model.config) for n, p in model.named_parameters()}
    write_gguf(path, tensors, tiny_gguf_metadata(model, arch))
    return model


def byte_c4_data(folder, seed: int = 0) -> Path:
    """A c4 calibration file for the ByteTokenizer models: 2000 seeded documents of 300 English words."""
    g = torch.Generator().manual_seed(seed)
    words = ["alpha", "beta", "gamma", "delta", "quant", "model", "token", "lowbit"]
    docs = [" ".join(words[int(i)] for i in torch.randint(0, 8, (300,), generator=g)) for _ in range(2000)]
    (Path(folder) / "c4-validation-2k.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    return Path(folder)
