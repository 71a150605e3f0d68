"""Where lowbit keeps its cache and looks for data. Both are settable by the user."""

from __future__ import annotations

import os
from pathlib import Path

CACHE_ENV = "LOWBIT_CACHE"
DATA_ENV = "LOWBIT_DATA"


def cache_dir(override: str | os.PathLike | None = None) -> Path:
    """The cache root: `override`, else $LOWBIT_CACHE, else ~/.cache/lowbit."""
    if override is not None:
        return Path(override).expanduser()
    env = os.environ.get(CACHE_ENV)
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "lowbit"


def data_dirs(override: str | os.PathLike | None = None) -> list[Path]:
    """Directories searched for named datasets, in order.

    `override` (the --data-dir flag), else $LOWBIT_DATA, then <cache>/data and ./data.
    """
    dirs: list[Path] = []
    if override is not None:
        dirs.append(Path(override).expanduser())
    else:
        env = os.environ.get(DATA_ENV)
        if env:
            dirs.append(Path(env).expanduser())
        dirs.append(cache_dir() / "data")
        dirs.append(Path.cwd() / "data")
    return dirs
