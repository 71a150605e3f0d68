"""A model without its weights (models/skeleton.py) filled from its safetensors folder one tensor at
a time (models/weights.py): the same model load_model gives, and a missing or truncated shard
refused by name before any work."""

from __future__ import annotations

import json

import pytest
import torch
from stream_helpers import own_cache  # noqa: F401 - the module's own lowbit cache
from tiny_models import CHAT_WORDS, FOLDER_POSITIONS, build_tiny, save_tiny_folder

from lowbit.errors import ConfigError
from lowbit.models import load_model
from lowbit.models.skeleton import load_skeleton, materialize, parameters_under, release
from lowbit.recipes import Recipe
from lowbit.streaming import quantize_streamed


def _sharded(path, arch="qwen2", tie=False):
    """A tiny model saved in several shards with an index."""
    model = build_tiny(arch, 0, tie, layers=3, vocab=len(CHAT_WORDS), max_positions=FOLDER_POSITIONS)
    save_tiny_folder(path, model=model)
    for f in path.glob("model*.safetensors*"):
        f.unlink()
    model.save_pretrained(path, max_shard_size="40KB")
    shards = sorted(path.glob("model-*.safetensors"))
    assert len(shards) > 2 and (path / "model.safetensors.index.json").is_file()
    return path, shards


@pytest.mark.parametrize("tie", [False, True])
def test_a_filled_skeleton_is_the_model_load_model_gives(tmp_path, tie):
    folder, _ = _sharded(tmp_path / "m", tie=tie)
    sk = load_skeleton(str(folder))
    assert all(p.device.type == "meta" for p in sk.model.parameters())
    materialize(sk.model, parameters_under(sk.model, ""), sk.weights, torch.float32)
    whole = load_model(str(folder)).model
    assert sk.model.state_dict().keys() == whole.state_dict().keys()
    assert all(torch.equal(a, b) for a, b in zip(sk.model.state_dict().values(), whole.state_dict().values()))
    assert (sk.model.lm_head.weight is sk.model.model.embed_tokens.weight) == tie
    ids = torch.arange(1, 20).unsqueeze(0)
    with torch.inference_mode():
        assert torch.equal(sk.model(ids).logits, whole(ids).logits)
    block = parameters_under(sk.model, "model.layers.1")
    release(sk.model, block)
    assert {n for n, p in sk.model.named_parameters() if p.device.type == "meta"} == set(block)


def test_a_missing_shard_is_refused_by_name_before_anything_is_written(tmp_path):
    folder, shards = _sharded(tmp_path / "m")
    shards[1].unlink()
    with pytest.raises(ConfigError, match=shards[1].name):
        quantize_streamed(str(folder), Recipe(method="rtn", bits=4, group_size=32), tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_a_truncated_shard_is_refused_by_name_before_anything_is_written(tmp_path):
    folder, shards = _sharded(tmp_path / "m")
    raw = shards[-1].read_bytes()
    shards[-1].write_bytes(raw[: len(raw) - 1000])
    with pytest.raises(ConfigError, match=shards[-1].name):
        quantize_streamed(str(folder), Recipe(method="rtn", bits=4, group_size=32), tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_an_index_that_puts_a_tensor_in_the_wrong_shard_is_refused(tmp_path):
    folder, shards = _sharded(tmp_path / "m")
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    name = next(n for n, f in index["weight_map"].items() if f == shards[0].name)
    index["weight_map"][name] = shards[1].name
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ConfigError, match=shards[1].name):
        load_skeleton(str(folder))
