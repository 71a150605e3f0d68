"""Memory is checked, not only estimated: the room under a cgroup limit is read from the system's
files, and a job that would not fit is refused before it starts."""

from pathlib import Path

import pytest

from lowbit import memory
from lowbit.errors import ResourceError


def _v1(tmp_path: Path, limit: int, used: int, parent_limit: int | None = None) -> tuple[Path, Path]:
    root = tmp_path / "cgroup"
    leaf = root / "memory" / "jobs" / "one"
    leaf.mkdir(parents=True)
    (leaf / "memory.limit_in_bytes").write_text(f"{limit}\n")
    (leaf / "memory.usage_in_bytes").write_text(f"{used}\n")
    if parent_limit is not None:
        (leaf.parent / "memory.limit_in_bytes").write_text(f"{parent_limit}\n")
        (leaf.parent / "memory.usage_in_bytes").write_text(f"{used}\n")
    self_cgroup = tmp_path / "self-cgroup"
    self_cgroup.write_text("5:devices:/\n4:memory:/jobs/one\n0::/\n")
    return root, self_cgroup


def test_v1_limit_is_read_and_the_tightest_ancestor_wins(tmp_path):
    root, me = _v1(tmp_path, limit=600 << 20, used=100 << 20)
    assert memory.cgroup_room_bytes(root, me) == 500 << 20
    root2, me2 = _v1(tmp_path / "b", limit=600 << 20, used=100 << 20, parent_limit=300 << 20)
    assert memory.cgroup_room_bytes(root2, me2) == 200 << 20


def test_v1_unlimited_and_v2_max_mean_no_limit(tmp_path):
    root, me = _v1(tmp_path, limit=9223372036854771712, used=100 << 20)
    assert memory.cgroup_room_bytes(root, me) is None
    v2 = tmp_path / "v2"
    (v2 / "user.slice").mkdir(parents=True)
    (v2 / "cgroup.controllers").write_text("memory\n")
    (v2 / "user.slice" / "memory.max").write_text("max\n")
    (v2 / "user.slice" / "memory.current").write_text("1000\n")
    me2 = tmp_path / "self2"
    me2.write_text("0::/user.slice\n")
    assert memory.cgroup_room_bytes(v2, me2) is None
    (v2 / "user.slice" / "memory.max").write_text(f"{1 << 30}\n")
    assert memory.cgroup_room_bytes(v2, me2) == (1 << 30) - 1000


def test_available_is_the_smaller_of_meminfo_and_the_cgroup_room(tmp_path):
    root, me = _v1(tmp_path, limit=600 << 20, used=100 << 20)
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal: 24000000 kB\nMemAvailable: 20000000 kB\n")
    assert memory.available_bytes(meminfo, root, me) == 500 << 20
    meminfo.write_text("MemAvailable: 1000 kB\n")
    assert memory.available_bytes(meminfo, root, me) == 1000 * 1024


def test_check_fits_refuses_what_does_not_fit_and_names_the_options():
    now = memory.rss_bytes()
    memory.check_fits(now + (10 << 20), "a job", ["fewer samples"], available=100 << 20)
    with pytest.raises(ResourceError, match="fewer samples"):
        memory.check_fits(now + (200 << 20), "a job", ["fewer samples"], available=100 << 20)
