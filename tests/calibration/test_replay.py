"""Replaying the block children that no longer change (calibration/replay.py): the records are bit
for bit those of a job that runs every pass in full, and the attention really runs fewer times."""

import functools

import pytest
import torch
from tiny_models import byte_c4_data, loaded_tiny

import lowbit.blockwise
from lowbit.calibration.sequential import BlockSteps
from lowbit.pipeline import quantize
from lowbit.recipes import CalibrationConfig, GPTQConfig, Recipe


@pytest.fixture
def data_dir(tmp_path):
    return byte_c4_data(tmp_path, seed=1)


def _quantize(arch, data_dir, monkeypatch, recipe: Recipe, **steps):
    """Records of `recipe` on a tiny model, and how many times its attention and MLP modules ran
    (BlockSteps set by `steps`)."""
    monkeypatch.setattr(lowbit.blockwise, "BlockSteps", functools.partial(BlockSteps, **steps))
    lm = loaded_tiny(arch)
    calls = {"self_attn": 0, "mlp": 0}
    for child in calls:
        cls = type(lm.model.model.layers[0].get_submodule(child))

        def counted(self, *args, _original=cls.forward, _child=child, **kwargs):
            calls[_child] += 1
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(cls, "forward", counted)
    res = quantize(lm, recipe, data_dir=data_dir, progress=False)
    monkeypatch.undo()
    return res.weights, calls


@pytest.mark.parametrize("gptq", [GPTQConfig(), GPTQConfig(act_order=True, static_groups=True)])
@pytest.mark.parametrize("tails", [True, False])
def test_replay_gives_the_records_of_full_passes_with_fewer_runs(arch, data_dir, monkeypatch, gptq, tails):
    recipe = Recipe(method="gptq", bits=3, group_size=16, gptq=gptq,
                    calibration=CalibrationConfig(n_samples=20, seqlen=32))  # 3 batches, the last one short
    fast, fast_calls = _quantize(arch, data_dir, monkeypatch, recipe, tail_bytes=2**30 if tails else 0)
    full, full_calls = _quantize(arch, data_dir, monkeypatch, recipe, replay=False)
    assert set(fast) == set(full) and len(fast) == 14
    for name, qw in full.items():
        for key, t in qw.packed().items():
            assert torch.equal(fast[name].packed()[key], t), (name, key)
    # per block (2) and batch (3), attention is entered by the passes for the q/k/v Hessian (which
    # stops at q_proj), the o, gate/up and down Hessians and the final forward: 5; with replay the
    # last two take its kept output, and with tails the gate/up pass runs it on the first batch
    # only (o_proj runs alone on the kept inputs of the others). The MLP is entered by the gate/up
    # and down passes and the final forward; with tails that one runs it on the first batch only.
    assert full_calls == {"self_attn": 2 * 3 * 5, "mlp": 2 * 3 * 3}
    if tails:
        assert fast_calls == {"self_attn": 2 * (3 + 3 + 1), "mlp": 2 * (3 + 3 + 1)}
    else:
        assert fast_calls == {"self_attn": 2 * 3 * 3, "mlp": 2 * 3 * 3}


def test_tails_stay_within_their_bytes(data_dir, monkeypatch):
    """A tail that does not fit is not kept (the pass runs the child in full); records unchanged."""
    recipe = Recipe(method="gptq", bits=4, group_size=16, calibration=CalibrationConfig(n_samples=16, seqlen=32))
    # the attention's o_proj inputs take 16 x 32 x 64 float32 = 128 KiB; the MLP's down_proj ones more
    small, small_calls = _quantize("llama", data_dir, monkeypatch, recipe, tail_bytes=200 * 1024)
    full, _ = _quantize("llama", data_dir, monkeypatch, recipe, replay=False)
    assert all(torch.equal(small[n].dequantize(torch.float32), full[n].dequantize(torch.float32)) for n in full)
    assert small_calls == {"self_attn": 2 * (2 + 2 + 1), "mlp": 2 * 2 * 3}


def test_replay_changes_nothing_without_true_sequential(data_dir, monkeypatch):
    recipe = Recipe(method="gptq", bits=4, group_size=16, gptq=GPTQConfig(true_sequential=False),
                    calibration=CalibrationConfig(n_samples=8, seqlen=32))
    fast, fast_calls = _quantize("llama", data_dir, monkeypatch, recipe)
    full, full_calls = _quantize("llama", data_dir, monkeypatch, recipe, replay=False)
    assert all(torch.equal(fast[n].dequantize(torch.float32), full[n].dequantize(torch.float32)) for n in full)
    # the one Hessian pass and the final forward, per block
    assert fast_calls == full_calls == {"self_attn": 2 * 1 * 2, "mlp": 2 * 1 * 2}


def test_lean_replay_keeps_the_tail_instead_of_the_output_as_well(data_dir, monkeypatch):
    """Lean (the streamed job's setting): the same records and the same runs of the attention (o_proj
    runs alone on its kept inputs instead of the kept output being replayed), with less held at once."""
    from lowbit.calibration.replay import ChildReplay

    held = {True: 0, False: 0}
    start = ChildReplay.start

    def watched(self, batch):
        outputs = sum(o[0].nbytes if isinstance(o, tuple) else o.nbytes for d in self.outputs.values()
                      for o in d.values())
        tails = sum(t.nbytes for _, kept in self.tails.values() for t in kept.values())
        held[self.lean] = max(held[self.lean], outputs + tails)
        start(self, batch)

    recipe = Recipe(method="gptq", bits=3, group_size=16, calibration=CalibrationConfig(n_samples=24, seqlen=32))
    results, block_inputs = {}, 24 * 32 * 64 * 4  # n_samples x seqlen x hidden, float32
    for lean in (True, False):
        monkeypatch.setattr(ChildReplay, "start", watched)
        # tails up to the block inputs' size, as the streamed job sets them: o_proj's inputs fit, down_proj's not
        results[lean] = _quantize("llama", data_dir, monkeypatch, recipe, tail_bytes=block_inputs, lean=lean)
    (lean_w, lean_calls), (w, calls) = results[True], results[False]
    assert all(torch.equal(lean_w[n].dequantize(torch.float32), w[n].dequantize(torch.float32)) for n in w)
    assert lean_calls == calls == {"self_attn": 2 * (3 + 3 + 1), "mlp": 2 * 3 * 3}
    # lean holds o_proj's kept inputs and nothing else; otherwise the attention's outputs pile up beside them
    assert held[True] == block_inputs < held[False]
