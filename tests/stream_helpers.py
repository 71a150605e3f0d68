"""Shared pieces of the streaming tests: a tiny model folder, calibration text it tokenizes, and
the comparison of two checkpoint folders tensor by tensor."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from tiny_models import CHAT_WORDS, FOLDER_POSITIONS, build_tiny, save_tiny_folder

from lowbit.recipes import CalibrationConfig

CALIB = CalibrationConfig(n_samples=8, seqlen=32)
BLOCKS = 4


@pytest.fixture(autouse=True, scope="module")
def own_cache(tmp_path_factory):
    """lowbit's cache (hash stamps, tokenized text) in a folder of the test module's own."""
    with pytest.MonkeyPatch.context() as m:
        m.setenv("LOWBIT_CACHE", str(tmp_path_factory.mktemp("cache")))
        yield


def tiny_folder(path: Path, arch: str = "llama", tie: bool = False, layers: int = BLOCKS) -> Path:
    """A Hugging Face folder of a tiny `arch` model with `layers` blocks and a word tokenizer.
    (Under transformers 5 a qwen2 folder's tokenizer loads as Qwen2Tokenizer, which splits these
    words into nothing: its calibration samples are all end-of-text tokens. The qwen2 cases are
    there for the q/k/v biases.)"""
    model = build_tiny(arch, 0, tie, layers=layers, vocab=len(CHAT_WORDS), max_positions=FOLDER_POSITIONS)
    return save_tiny_folder(path, model=model)


def word_data(path: Path) -> Path:
    """A c4 calibration file of the folder tokenizer's words (2000 documents, seeded)."""
    path.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(0)
    words = [w for w in CHAT_WORDS if not w.startswith("<")]
    docs = [" ".join(words[int(i)] for i in torch.randint(0, len(words), (200,), generator=g)) for _ in range(2000)]
    (path / "c4-validation-2k.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    return path


def tensors_of(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint folder's safetensors files, keyed by file and name."""
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(f, "pt") as st:
            out.update({f"{f.name}:{k}": st.get_tensor(k) for k in st.keys()})  # noqa: SIM118 - not a dict
    return out


def differing_tensors(a: Path, b: Path) -> list[str]:
    """The tensors (file:name) that are not bit-identical between two checkpoint folders, or that
    only one of them holds."""
    ta, tb = tensors_of(a), tensors_of(b)
    differ = sorted(set(ta) ^ set(tb))
    for k in set(ta) & set(tb):
        x, y = ta[k], tb[k]
        if x.dtype != y.dtype or x.shape != y.shape or not torch.equal(_bytes(x), _bytes(y)):
            differ.append(k)
    return differ


def _bytes(t: torch.Tensor) -> torch.Tensor:
    """The tensor's bytes (a NaN equals itself, -0.0 differs from 0.0)."""
    return t.contiguous().reshape(-1).view(torch.uint8)
