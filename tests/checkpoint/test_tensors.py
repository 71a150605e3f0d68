"""write_tensors (checkpoint/tensors.py) writes, one tensor at a time, the very bytes safetensors'
save_file writes, and reads each tensor only when it writes it."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

from lowbit.checkpoint.tensors import write_tensors

DTYPES = (torch.bool, torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64, torch.float16, torch.bfloat16,
          torch.float32, torch.float64)


def _tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    out = {}
    for i, dtype in enumerate(DTYPES):
        for j, shape in enumerate([(3, 5), (7,), (), (0, 4), (2, 3, 1)]):
            t = torch.randint(0, 2 if dtype is torch.bool else 100, shape, generator=g).to(dtype)
            out[f"layer.{(i * 7 + j) % 11}.{dtype}".replace("torch.", "") + f".{j}"] = t
    out["non-contiguous"] = torch.arange(24, dtype=torch.float32).reshape(4, 6).t()
    out["naïve.ü"] = torch.ones(2, dtype=torch.float16)
    return out


@pytest.mark.parametrize("metadata", [None, {"format": "lowbit-checkpoint"}])
def test_the_file_is_byte_identical_to_save_files(tmp_path, metadata):
    tensors = _tensors()
    save_file({k: t.contiguous() for k, t in tensors.items()}, tmp_path / "a.safetensors", metadata=metadata)
    layout = {k: torch.empty(t.shape, dtype=t.dtype, device="meta") for k, t in tensors.items()}
    write_tensors(tmp_path / "b.safetensors", layout, tensors.__getitem__, metadata)
    assert (tmp_path / "b.safetensors").read_bytes() == (tmp_path / "a.safetensors").read_bytes()
    back = load_file(tmp_path / "b.safetensors")
    assert all(torch.equal(back[k], t) for k, t in tensors.items())


def test_each_tensor_is_read_once_when_it_is_written(tmp_path):
    tensors = _tensors()
    asked = []

    def read(name):
        asked.append(name)
        return tensors[name]

    write_tensors(tmp_path / "c.safetensors", {k: t for k, t in tensors.items()}, read)
    assert sorted(asked) == sorted(tensors) and len(asked) == len(set(asked))


def test_a_tensor_that_does_not_match_its_layout_is_refused(tmp_path):
    layout = {"w": torch.empty(2, 3, device="meta")}
    with pytest.raises(ValueError, match="w"):
        write_tensors(tmp_path / "d.safetensors", layout, lambda name: torch.zeros(3, 2))
