"""What the benches share: the machine they ran on, a job in a fresh child process, and the
marked section of BENCHMARKS.md each one rewrites. (Peak RSS: lowbit.memory.peak_rss_bytes.)"""

from __future__ import annotations

import multiprocessing as mp
import platform
from collections.abc import Callable
from pathlib import Path
from queue import Empty
from typing import Any


def machine() -> str:
    """CPU model, core count, torch version and the CPU capability torch dispatches to."""
    import os

    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return (f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__}, "
            f"CPU capability {torch.backends.cpu.get_cpu_capability()}")


def run_in_child(target: Callable, spec: dict[str, Any], died: Callable[[int | None], dict[str, Any]]) -> dict[str, Any]:
    """target(spec, queue) in a fresh spawned process; what it puts on the queue, or died(exit code)
    when the process ends without reporting (killed for memory, a crash in native code): an error
    row, never a hung bench."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=target, args=(spec, queue))
    proc.start()
    while True:
        try:
            result = queue.get(timeout=5)
            break
        except Empty:
            if not proc.is_alive():
                return died(proc.exitcode)
    proc.join()
    return result


def section_markers(name: str) -> tuple[str, str]:
    """The comments that open and close the `name` section of a benchmarks file."""
    return f"<!-- bench:{name}:begin -->", f"<!-- bench:{name}:end -->"


def write_section(path: Path, section: str, name: str = "accuracy") -> None:
    """Replace the `name` section of the file (between its markers), keeping everything else."""
    begin, end = section_markers(name)
    block = f"{begin}\n{section}\n{end}\n"
    text = path.read_text() if path.exists() else "# lowbit benchmarks\n\n"
    if begin in text and end in text:
        a = text.index(begin)
        b = text.index(end) + len(end) + 1
        text = text[:a] + block + text[b:]
    else:
        text = text.rstrip("\n") + "\n\n" + block
    path.write_text(text)
