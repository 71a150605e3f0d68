"""Fixtures for the hostile-input suite: a tiny Hugging Face folder (tiny_models) and a checkpoint
made from it through the CLI (helpers in hostile_cli.py)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from hostile_cli import TEXT
from tiny_models import WORDS, save_tiny_folder

from lowbit.cli import main


@pytest.fixture(scope="session")
def hostile_root(tmp_path_factory) -> Path:
    """A session folder holding the tiny model, its cache and data; tests copy from it."""
    root = tmp_path_factory.mktemp("hostile")
    save_tiny_folder(root / "tiny", words=WORDS)
    save_tiny_folder(root / "tiny-tied", words=WORDS, tie=True)
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
