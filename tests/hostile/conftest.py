"""Fixtures for the hostile-input suite: a tiny Hugging Face folder and a checkpoint made from it
through the CLI, plus helpers that run a lowbit command in-process and check how it failed."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
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


@pytest.fixture(scope="session")
def hostile_root(tmp_path_factory) -> Path:
    """A session folder holding the tiny model, its cache and data; tests copy from it."""
    root = tmp_path_factory.mktemp("hostile")
    save_tiny_folder(root / "tiny")
    save_tiny_folder(root / "tiny-tied", tie=True)
    (root / "text.txt").write_text(TEXT)
    return root


@pytest.fixture
def env(hostile_root, tmp_path, monkeypatch) -> Path:
    """A fresh work folder (the current directory) with a copy of the tiny model and the text;
    lowbit's cache and data dir point inside it."""
    shutil.copytree(hostile_root / "tiny", tmp_path / "tiny")
    shutil.copytree(hostile_root / "tiny-tied", tmp_path / "tiny-tied")
    shutil.copy(hostile_root / "text.txt", tmp_path / "text.txt")
    (tmp_path / "data").mkdir()
    monkeypatch.setenv("LOWBIT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("LOWBIT_DATA", str(tmp_path / "data"))
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.fixture(scope="session")
def session_checkpoint(hostile_root) -> Path:
    """An RTN checkpoint of the tiny model, made once through the CLI; copy it before changing it."""
    out = hostile_root / "ckpt"
    rc = main(["quantize", str(hostile_root / "tiny"), "--method", "rtn", "--bits", "4", "--group-size", "32",
               "-o", str(out), "-q", "--cache", str(hostile_root / "cache")])
    assert rc == 0
    return out


@pytest.fixture
def checkpoint(session_checkpoint, env) -> Path:
    """A private copy of the tiny checkpoint inside the work folder."""
    dst = env / "ckpt"
    shutil.copytree(session_checkpoint, dst)
    return dst
