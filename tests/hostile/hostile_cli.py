"""Helpers of the hostile-input suite: the text the tiny model reads, and running a lowbit command
in-process with checks of how it failed (the tiny folder itself comes from tiny_models). (A module
of its own name: tests/eval has a conftest.py too, so `from conftest import ...` would be
ambiguous.)"""

from __future__ import annotations

import os
from pathlib import Path

from rendered import error_line

from lowbit.cli import main

TEXT = " ".join(f"w{(i * 7) % 61}" for i in range(3000))  # 3000 tokens of tiny_models.WORDS


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
    return error_line(rc, err)
