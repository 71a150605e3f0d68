"""How much memory this process uses and how much it may still take, read from the system.

The memory a job may use is the smaller of what the kernel says is available (MemAvailable in
/proc/meminfo) and what is left under the process's control group limit (cgroup v2 memory.max,
or v1 memory.limit_in_bytes, the tightest one on the way up the hierarchy). A job whose estimate
does not fit is refused before it starts instead of being killed by the kernel later.
"""

from __future__ import annotations

import ctypes
import resource
from pathlib import Path

from lowbit.errors import ResourceError

_CGROUP_ROOT = Path("/sys/fs/cgroup")
_NO_LIMIT = 1 << 60  # cgroup v1 reports "no limit" as a huge page-aligned number


def rss_bytes() -> int:
    """The process's resident set size now."""
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
    except (OSError, ValueError, IndexError):
        return peak_rss_bytes()
    return pages * resource.getpagesize()


def peak_rss_bytes() -> int:
    """The process's largest resident set size so far (Linux reports kilobytes)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _read_int(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    if text == "max":
        return None
    try:
        return int(text)
    except ValueError:
        return None


def _cgroup_dirs(root: Path = _CGROUP_ROOT, self_cgroup: Path = Path("/proc/self/cgroup")) -> list[tuple[Path, str]]:
    """(folder, version) of the process's memory cgroup and of each ancestor, innermost first."""
    try:
        lines = self_cgroup.read_text().splitlines()
    except OSError:
        return []
    found: list[tuple[Path, str]] = []
    for line in lines:
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        _, controllers, rel = parts
        if controllers == "" and (root / "cgroup.controllers").exists():
            base, version = root, "v2"
        elif "memory" in controllers.split(","):
            base, version = root / "memory", "v1"
        else:
            continue
        rel_parts = [p for p in rel.split("/") if p]
        for depth in range(len(rel_parts), -1, -1):
            folder = base.joinpath(*rel_parts[:depth])
            if folder.is_dir():
                found.append((folder, version))
    return found


def cgroup_room_bytes(root: Path = _CGROUP_ROOT, self_cgroup: Path = Path("/proc/self/cgroup")) -> int | None:
    """Bytes left under the tightest memory limit of this process's control groups, or None."""
    room = None
    for folder, version in _cgroup_dirs(root, self_cgroup):
        if version == "v2":
            limit, used = _read_int(folder / "memory.max"), _read_int(folder / "memory.current")
        else:
            limit, used = _read_int(folder / "memory.limit_in_bytes"), _read_int(folder / "memory.usage_in_bytes")
        if limit is None or limit >= _NO_LIMIT:
            continue
        left = max(0, limit - (used or 0))
        room = left if room is None else min(room, left)
    return room


def available_bytes(meminfo: Path = Path("/proc/meminfo"), root: Path = _CGROUP_ROOT,
                    self_cgroup: Path = Path("/proc/self/cgroup")) -> int | None:
    """Memory this process may still take: min(MemAvailable, room under the cgroup limit), or
    None where neither can be read."""
    avail = None
    try:
        for line in meminfo.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                avail = int(line.split()[1]) * 1024
                break
    except (OSError, ValueError, IndexError):
        pass
    room = cgroup_room_bytes(root, self_cgroup)
    values = [v for v in (avail, room) if v is not None]
    return min(values) if values else None


def check_fits(need_bytes: float, what: str, options: list[str], available: int | None = None) -> None:
    """Refuse, naming `options` that would need less, when `need_bytes` more than this process
    holds now does not fit in the memory it may still take."""
    available = available_bytes() if available is None else available
    if available is None:
        return
    extra = need_bytes - rss_bytes()
    if extra <= available:
        return
    hint = "; ".join(options) if options else "use a machine with more memory"
    raise ResourceError(
        f"{what} needs about {need_bytes / 1e9:.2f} GB at its peak, but this process holds "
        f"{rss_bytes() / 1e9:.2f} GB and only {available / 1e9:.2f} GB more is available (cgroup limit "
        f"included); it would be killed part way. To need less: {hint}"
    )


def release_freed_memory() -> None:
    """Hand memory that loading freed (read buffers, conversion slices, pre-fusion copies) back
    to the system: glibc keeps freed heap blocks mapped, which otherwise stay in the resident
    size for the life of the process. A no-op where the C library has no malloc_trim."""
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):
        pass
