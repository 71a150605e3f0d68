"""kvpress peer: argument checks happen before any install; the worker imports no lowbit code."""

import ast
from pathlib import Path

import pytest

from lowbit.errors import ConfigError
from lowbit.peers import kvpress


def test_bad_press_or_budget_is_refused_before_installing(tmp_path):
    with pytest.raises(ConfigError, match="'lru'.*snapkv"):  # the bad press, then the known ones
        kvpress.kvpress_needle(tmp_path, [[1, 2]], "lru", 0.2, cache=tmp_path)
    with pytest.raises(ConfigError, match="512"):
        kvpress.kvpress_needle(tmp_path, [[1, 2]], "snapkv", 512, cache=tmp_path)
    assert not (tmp_path / "kvpress").exists()


def test_the_worker_runs_without_lowbit():
    src = Path(kvpress.__file__).with_name("kvpress_worker.py").read_text()
    imported = {n.names[0].name.split(".")[0] for n in ast.walk(ast.parse(src)) if isinstance(n, ast.Import)}
    imported |= {n.module.split(".")[0] for n in ast.walk(ast.parse(src)) if isinstance(n, ast.ImportFrom)}
    assert "lowbit" not in imported and {"kvpress", "transformers", "torch"} <= imported
