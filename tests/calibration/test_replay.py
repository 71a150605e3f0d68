"""Replaying the block children that no longer change (calibration/replay.py): the records are bit
for bit those of a job that runs every pass in full, and the attention really runs fewer times."""

import functools
import json

import pytest
import torch
from tiny_models import loaded_tiny

import lowbit.blockwise
from lowbit.calibration.sequential import BlockSteps
from lowbit.pipeline import quantize
from lowbit.recipes import CalibrationConfig, GPTQConfig, Recipe


@pytest.fixture
def data_dir(tmp_path):
    g = torch.Generator().manual_seed(1)
    words = ["alpha", "beta", "gamma", "delta", "quant", "model", "token", "lowbit"]
    docs = [" ".join(words[int(i)] for i in torch.randint(0, 8, (300,), generator=g)) for _ in range(2000)]
    (tmp_path / "c4-validation-2k.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    return tmp_path


def _quantize(arch, data_dir, monkeypatch, replay: bool, recipe: Recipe):
    """Records of `recipe` on a tiny model, and how many times its attention modules ran."""
    monkeypatch.setattr(lowbit.blockwise, "BlockSteps", functools.partial(BlockSteps, replay=replay))
    lm = loaded_tiny(arch)
    attn_cls = type(lm.model.model.layers[0].self_attn)
    calls = []
    original = attn_cls.forward

    def counted(self, *args, **kwargs):
        calls.append(1)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(attn_cls, "forward", counted)
    res = quantize(lm, recipe, data_dir=data_dir, progress=False)
    monkeypatch.setattr(attn_cls, "forward", original)
    return res.weights, len(calls)


@pytest.mark.parametrize("gptq", [GPTQConfig(), GPTQConfig(act_order=True, static_groups=True)])
def test_replay_gives_the_records_of_full_passes_with_fewer_attention_runs(arch, data_dir, monkeypatch, gptq):
    recipe = Recipe(method="gptq", bits=3, group_size=16, gptq=gptq,
                    calibration=CalibrationConfig(n_samples=20, seqlen=32))  # 3 batches, the last one short
    fast, fast_calls = _quantize(arch, data_dir, monkeypatch, True, recipe)
    full, full_calls = _quantize(arch, data_dir, monkeypatch, False, recipe)
    assert set(fast) == set(full) and len(fast) == 14
    for name, qw in full.items():
        for key, t in qw.packed().items():
            assert torch.equal(fast[name].packed()[key], t), (name, key)
    # per block and batch, attention is entered by the passes for the q/k/v Hessian (which stops at
    # q_proj), the o, gate/up and down Hessians and the final forward: 5; with replay the last two
    # take its kept output
    assert full_calls == 2 * 3 * 5 and fast_calls == 2 * 3 * 3


def test_replay_changes_nothing_without_true_sequential(data_dir, monkeypatch):
    recipe = Recipe(method="gptq", bits=4, group_size=16, gptq=GPTQConfig(true_sequential=False),
                    calibration=CalibrationConfig(n_samples=8, seqlen=32))
    fast, fast_calls = _quantize("llama", data_dir, monkeypatch, True, recipe)
    full, full_calls = _quantize("llama", data_dir, monkeypatch, False, recipe)
    assert all(torch.equal(fast[n].dequantize(torch.float32), full[n].dequantize(torch.float32)) for n in full)
    assert fast_calls == full_calls == 2 * 1 * 2  # the one Hessian pass and the final forward, per block
