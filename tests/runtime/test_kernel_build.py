"""The kernel builder's lock: a lock left by a killed build is cleared, a fresh one is kept."""

import os
import time

from lowbit.kernels import STALE_LOCK_SECONDS, _clear_stale_lock


def test_a_stale_build_lock_is_removed_and_a_fresh_one_kept(tmp_path):
    lock = tmp_path / "lock"
    assert not _clear_stale_lock(tmp_path)  # no lock: nothing to do
    lock.write_text("")
    assert not _clear_stale_lock(tmp_path) and lock.exists()  # a build may be running right now
    old = time.time() - STALE_LOCK_SECONDS - 5
    os.utime(lock, (old, old))
    assert _clear_stale_lock(tmp_path) and not lock.exists()
