"""The kernel builder's lock: a lock left by a killed build is cleared, a fresh one is kept."""

import os
import time
from pathlib import Path

from lowbit.kernels import STALE_LOCK_SECONDS, _clear_stale_lock


def test_a_stale_build_lock_is_removed_and_a_fresh_one_kept(tmp_path):
    lock = tmp_path / "lock"
    assert not _clear_stale_lock(tmp_path)  # no lock: nothing to do
    lock.write_text("")
    assert not _clear_stale_lock(tmp_path) and lock.exists()  # a build may be running right now
    old = time.time() - STALE_LOCK_SECONDS - 5
    os.utime(lock, (old, old))
    assert _clear_stale_lock(tmp_path) and not lock.exists()


def test_a_build_is_announced_on_stderr_and_a_cached_one_is_not(tmp_path, monkeypatch, capsys):
    import types

    import torch.utils.cpp_extension

    from lowbit import kernels

    builds = []

    def fake_build(name, sources, build_directory, **kw):  # writes the shared object a real build would
        builds.append(name)
        (Path(build_directory) / f"{name}.so").write_bytes(b"")
        return types.ModuleType(name)

    monkeypatch.delenv(kernels.DISABLE_ENV, raising=False)
    monkeypatch.setattr(torch.utils.cpp_extension, "load", fake_build)
    monkeypatch.setattr(kernels, "_loaded", {})
    kernels.load("qgemv", cache=tmp_path)
    first = capsys.readouterr().err
    monkeypatch.setattr(kernels, "_loaded", {})  # a later process: the build is in the cache
    kernels.load("qgemv", cache=tmp_path)
    second = capsys.readouterr().err
    assert len(builds) == 2  # torch's builder is called both times (it checks the build is current)
    assert "qgemv" in first and len(first.strip().splitlines()) == 1
    assert second == ""
