"""Streamed quantization (lowbit.streaming): the checkpoint is bit-identical to the in-memory job's,
only one block's weights are ever in memory, and what cannot be streamed is refused up front."""

from __future__ import annotations

import json

import pytest
import torch
from stream_helpers import (
    CALIB,
    differing_tensors,
    own_cache,  # noqa: F401 - the module's own lowbit cache
    tiny_folder,
    word_data,
)

from lowbit import streaming
from lowbit.errors import ConfigError
from lowbit.models import load_model
from lowbit.pipeline import quantize, save
from lowbit.recipes import BudgetConfig, IntegerScaleConfig, Recipe
from lowbit.streaming import quantize_streamed

# what differs between two runs of one job: when and how long it ran
_RUN_STATS = ("seconds", "peak_rss_bytes")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return word_data(tmp_path_factory.mktemp("data"))


def _manifest(path):
    m = json.loads((path / "manifest.json").read_text())
    m.pop("created")
    for k in _RUN_STATS:
        m["stats"].pop(k)
    return m


@pytest.mark.parametrize(("method", "arch", "tie", "dtype"), [
    ("rtn", "llama", True, torch.float32), ("gptq", "llama", False, torch.float32),
    ("awq-gptq", "llama", False, torch.float32), ("gptq", "qwen2", False, torch.float32),
    ("awq-gptq", "qwen2", False, torch.float32), ("gptq", "gemma3", False, torch.float32),
    ("gptq", "llama", False, torch.bfloat16)])
def test_the_streamed_checkpoint_is_bit_identical_to_the_in_memory_one(tmp_path, data, method, arch, tie, dtype):
    """Every tensor of both folders, and every manifest entry but the run's time and memory."""
    folder = tiny_folder(tmp_path / "model", arch, tie)
    recipe = Recipe(method=method, bits=3, group_size=32, calibration=CALIB)
    whole = save(quantize(load_model(str(folder), dtype), recipe, data_dir=str(data), progress=False),
                 tmp_path / "whole")
    streamed = quantize_streamed(str(folder), recipe, tmp_path / "streamed", dtype=dtype, data_dir=str(data),
                                 progress=False)
    assert streamed.path == (tmp_path / "streamed").resolve()
    assert differing_tensors(whole, streamed.path) == []
    assert _manifest(whole) == _manifest(streamed.path)
    assert sorted(p.name for p in whole.iterdir()) == sorted(p.name for p in streamed.path.iterdir())


@pytest.mark.parametrize("recipe", [
    Recipe(method="gptq", bits=4, group_size=32, calibration=CALIB, skip=(r"mlp\.down_proj",), head_bits=0),
    Recipe(method="slim", bits=2.5, group_size=32, calibration=CALIB),
    Recipe(method="awq", bits=3, group_size=32, calibration=CALIB, integer_scale=IntegerScaleConfig(enabled=True))])
def test_skips_a_dense_head_mixed_widths_and_integer_scales_stream_bit_identically(tmp_path, data, recipe):
    folder = tiny_folder(tmp_path / "model", "llama", tie=False, layers=2)
    whole = save(quantize(load_model(str(folder)), recipe, data_dir=str(data), progress=False), tmp_path / "whole")
    streamed = quantize_streamed(str(folder), recipe, tmp_path / "streamed", data_dir=str(data), progress=False)
    assert differing_tensors(whole, streamed.path) == []
    assert _manifest(whole) == _manifest(streamed.path)


def test_only_one_block_is_in_memory_while_a_block_is_calibrated(tmp_path, data, monkeypatch):
    """At each block step, the decoder blocks with real (not meta) parameters are that block alone,
    and the model's real parameters are the final norm and that block."""
    folder = tiny_folder(tmp_path / "model", "llama", tie=False, layers=5)
    seen = []
    stack = []
    capture, calibrate = streaming.capture_block_inputs, streaming.calibrate_block

    def capturing(model, blocks, ids):
        stack.append((model, blocks))
        return capture(model, blocks, ids)

    def watching(i, block, *args):
        model, blocks = stack[0]
        real = [j for j, b in enumerate(blocks) if any(p.device.type != "meta" for p in b.parameters())]
        outside = {n for n, p in model.named_parameters() if p.device.type != "meta" and ".layers." not in n}
        seen.append((i, real, outside))
        return calibrate(i, block, *args)

    monkeypatch.setattr(streaming, "capture_block_inputs", capturing)
    monkeypatch.setattr(streaming, "calibrate_block", watching)
    quantize_streamed(str(folder), Recipe(method="gptq", bits=4, group_size=32, calibration=CALIB),
                      tmp_path / "out", data_dir=str(data), progress=False)
    assert [i for i, _, _ in seen] == list(range(5))
    assert all(real == [i] for i, real, _ in seen)
    # the embeddings are read for the first block's inputs and again at the end, not held meanwhile
    assert all(outside == {"model.norm.weight"} for _, _, outside in seen)


def test_a_data_free_job_holds_one_block_at_a_time_too(tmp_path, monkeypatch):
    folder = tiny_folder(tmp_path / "model", "llama", tie=True, layers=3)
    seen = []
    quantize_layers = streaming.quantize_data_free

    def watching(layers, names, progress):
        blocks = layers.model.model.layers
        seen.append([j for j, b in enumerate(blocks) if any(p.device.type != "meta" for p in b.parameters())])
        return quantize_layers(layers, names, progress)

    monkeypatch.setattr(streaming, "quantize_data_free", watching)
    quantize_streamed(str(folder), Recipe(method="rtn", bits=4, group_size=32), tmp_path / "out", progress=False)
    assert seen == [[0], [1], [2]]


def test_a_budget_is_refused_before_anything_is_written(tmp_path, data):
    folder = tiny_folder(tmp_path / "model")
    recipe = Recipe(method="gptq", group_size=32, calibration=CALIB, budget=BudgetConfig(target_bpw=3.5))
    with pytest.raises(ConfigError, match="--target-bpw"):
        quantize_streamed(str(folder), recipe, tmp_path / "out", data_dir=str(data), progress=False)
    assert not (tmp_path / "out").exists()


def test_a_model_whose_files_lack_a_tensor_is_refused_naming_it(tmp_path):
    """A folder whose safetensors file does not hold every tensor its config needs."""
    from safetensors.torch import load_file, save_file

    folder = tiny_folder(tmp_path / "model", "llama", tie=True, layers=2)
    tensors = load_file(folder / "model.safetensors")
    del tensors["model.layers.1.mlp.down_proj.weight"]
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ConfigError, match=r"model\.layers\.1\.mlp\.down_proj\.weight"):
        quantize_streamed(str(folder), Recipe(method="rtn", bits=4, group_size=32), tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_the_memory_estimate_of_a_streamed_job_is_smaller_and_holds_one_block(tmp_path):
    """With --stream the model's place in the estimate is one block and the tensors around them:
    a deeper model of the same width costs more whole but about the same streamed."""
    from lowbit.models.skeleton import load_skeleton
    from lowbit.pipeline import estimate

    recipe = Recipe(method="gptq", group_size=32, calibration=CALIB)
    peaks = {}
    for layers in (2, 8):
        model = load_skeleton(str(tiny_folder(tmp_path / f"m{layers}", layers=layers))).model
        peaks[layers] = {s: estimate(model, recipe, baseline_bytes=0, stream=s)["peak_bytes"] for s in (False, True)}
    assert peaks[8][True] < peaks[8][False]
    assert peaks[8][False] - peaks[2][False] > 2 * (peaks[8][True] - peaks[2][True])
