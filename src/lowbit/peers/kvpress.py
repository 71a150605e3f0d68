"""NVIDIA's kvpress (PyPI) as the eviction peer, run on the same model and the same needle prompts.

kvpress 0.5.5 requires transformers < 5.3, older than lowbit's, so it cannot share lowbit's
environment. `ensure_kvpress` builds a separate virtual environment once, in

    <lowbit cache>/kvpress/venv   (torch pinned to lowbit's own version, transformers<5.3, kvpress==0.5.5)

and `kvpress_needle` runs peers/kvpress_worker.py there on the model's Hugging Face folder (the
same float32 reference lowbit evaluates), passing token ids in and generated ids out as JSON, so
lowbit scores the answers exactly as it scores its own.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from lowbit.errors import ConfigError, LowbitError
from lowbit.paths import cache_dir

KVPRESS_VERSION = "0.5.5"
PRESSES = ("streaming", "h2o", "snapkv")
STAMP = "lowbit-kvpress.json"


class PeerUnavailable(LowbitError, RuntimeError):
    """The peer could not be installed or run here."""


def venv_dir(cache: Path | None = None) -> Path:
    return cache_dir(cache) / "kvpress" / "venv"


def ensure_kvpress(cache: Path | None = None, progress: bool = True) -> Path:
    """The python of a virtual environment with kvpress installed (built on first use)."""
    venv = venv_dir(cache)
    python = venv / "bin" / "python"
    if (venv / STAMP).is_file() and python.is_file():
        return python
    torch_version = torch.__version__.split("+")[0]
    steps = [[sys.executable, "-m", "venv", str(venv)],
             [str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check", f"torch=={torch_version}",
              "transformers<5.3", f"kvpress=={KVPRESS_VERSION}"]]
    if progress:
        print(f"lowbit: installing kvpress {KVPRESS_VERSION} into {venv} (once; a few minutes)", file=sys.stderr)
    for cmd in steps:
        r = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if r.returncode:
            raise PeerUnavailable(f"installing kvpress failed ({' '.join(cmd[:4])} ...):\n{r.stderr[-2000:]}\n"
                                  "kvpress needs PyPI access and transformers<5.3; remove the folder and retry.")
    (venv / STAMP).write_text(json.dumps({"kvpress": KVPRESS_VERSION, "torch": torch_version}))
    return python


def kvpress_needle(model_folder: Path, prompts: list[list[int]], press: str, keep: float,
                   max_new_tokens: int = 8, cache: Path | None = None, progress: bool = True) -> dict:
    """Greedy answers (token ids per prompt) with kvpress's `press` keeping `keep` of each prompt."""
    if press not in PRESSES:
        raise ConfigError(f"kvpress peer {press!r}: use one of {', '.join(PRESSES)}")
    if not 0 < keep < 1:
        raise ConfigError(f"kvpress keeps a fraction of the prompt: give a budget in (0, 1), got {keep}")
    python = ensure_kvpress(cache, progress)
    worker = Path(__file__).with_name("kvpress_worker.py")
    with tempfile.TemporaryDirectory() as tmp:
        job, out = Path(tmp) / "job.json", Path(tmp) / "out.json"
        job.write_text(json.dumps({"model": str(model_folder), "press": press, "keep": keep, "prompts": prompts,
                                   "max_new_tokens": max_new_tokens}))
        r = subprocess.run([str(python), "-I", str(worker), str(job), str(out)], capture_output=True, text=True, check=False)
        if r.returncode:
            raise PeerUnavailable(f"kvpress {press} failed:\n{r.stderr[-3000:]}")
        return json.loads(out.read_text())
