"""lowbit's GGUF writer: names, layouts and metadata that transformers' (and llama.cpp's) GGUF
reader turns back into the same model."""

from __future__ import annotations

import pytest
import torch
from tiny_models import write_tiny_gguf_of

from lowbit.export.gguf import GGUFMetadata, read_types
from lowbit.models import load_model


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma3"])
def test_a_float_gguf_written_by_lowbit_loads_back_as_the_same_model(tmp_path, arch):
    model = write_tiny_gguf_of(tmp_path / "tiny.gguf", arch)
    loaded = load_model(str(tmp_path / "tiny.gguf"), cache=tmp_path / "cache", progress=False)
    want = dict(model.named_parameters())
    got = dict(loaded.model.named_parameters())
    assert want.keys() == got.keys()
    for name, p in want.items():
        if arch == "gemma3" and name.endswith("norm.weight"):  # stored plus one, read back minus one
            torch.testing.assert_close(got[name], p, rtol=0, atol=1e-6)
        else:
            assert torch.equal(got[name], p), name


def test_metadata_and_types_read_back(tmp_path):
    model = write_tiny_gguf_of(tmp_path / "tiny.gguf", "llama")
    meta = GGUFMetadata.from_file(tmp_path / "tiny.gguf")
    assert meta.arch == "llama"
    assert meta.fields["llama.block_count"][0] == model.config.num_hidden_layers
    types = read_types(tmp_path / "tiny.gguf")
    assert types["blk.0.attn_k.weight"] == ("F32", tuple(model.model.layers[0].self_attn.k_proj.weight.shape))
