"""Helpers of the hostile-input suite: a tiny Hugging Face folder, and running a lowbit command
in-process with checks of how it failed. (A module of its own name: tests/eval has a conftest.py
too, so `from conftest import ...` would be ambiguous.)"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from lowbit.cli import main

WORDS = ["<unk>", "<s>", "</s>", *(f"w{i}" for i in range(61))]
TEXT = " ".join(f"w{(i * 7) % 61}" for i in range(3000))  # 3000 tokens of the tiny vocabulary


def save_tiny_folder(folder: Path, tie: bool = False, seed: int = 0) -> Path:
    """A complete Hugging Face folder: a 2-block Llama (hidden 64) and a word-level tokenizer."""
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(WORDS), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         tie_word_embeddings=tie, initializer_range=0.1)
    LlamaForCausalLM(config).eval().save_pretrained(folder)
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", bos_token="<s>",
                            eos_token="</s>").save_pretrained(folder)
    return folder


def tree(root: Path) -> dict[str, tuple[int, int]]:
    """Every path under `root` (folders included) -> (size, mtime_ns): what 'nothing written or
    deleted' compares."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            st = p.lstat()
            out[str(p.relative_to(root))] = (st.st_size if p.is_file() else 0, st.st_mtime_ns if p.is_file() else 0)
    return out


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of `lowbit ARGV` run in this process."""
    try:
        rc = main([str(a) for a in argv])
    except SystemExit as e:  # argparse usage errors
        rc = e.code if isinstance(e.code, int) else 2
    out, err = capsys.readouterr()
    return rc, out, err


def assert_clean_error(rc: int, err: str) -> str:
    """Exit code 2, no traceback, and exactly one 'lowbit: error:' line; returns that line."""
    assert rc == 2, err
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.startswith("lowbit: error:")]
    assert len(lines) == 1, err
    return lines[0]
