"""The KL scorer: measured against the unquantized model, the same under bfloat16 autocast, the
probe's block replay equal to a full forward, and the paired test that confirms a search."""

import pytest
import torch
from budget_models import FAST, LEVELS, deep_tiny, held_out_kl
from test_pipeline import data_dir  # noqa: F401 (fixture)

import lowbit.budget.plan
import lowbit.budget.scorer
from lowbit.algorithms.rtn import rtn_quantize
from lowbit.budget.plan import held_out_ids
from lowbit.budget.scorer import clearly_better
from lowbit.pipeline import quantize, target_layers
from lowbit.qtensor import QuantFormat
from lowbit.recipes import BudgetConfig, CalibrationConfig, ClipConfig, Recipe


def test_clearly_better_is_a_paired_test_over_windows():
    old = [1.0, 2.0, 3.0, 4.0]
    assert clearly_better([x - 0.1 for x in old], old)            # lower on every window by the same amount
    assert not clearly_better(old, old)
    assert not clearly_better([x + 0.1 for x in old], old)
    # lower on average, but by less than the spread of the per-window differences
    assert not clearly_better([0.5, 2.4, 2.5, 4.4], old)


def test_bfloat16_scoring_ranks_the_starts_as_float32_does(data_dir):  # noqa: F811
    """--calib-dtype bfloat16 also runs the probe and the KL scoring under autocast: the scores
    stay within a few percent of float32's and pick the same start."""
    reps = {}
    for dtype in ("float32", "bfloat16"):
        lm = deep_tiny()
        calib = CalibrationConfig(n_samples=8, seqlen=64, dtype=dtype)
        budget = BudgetConfig(target_bpw=3.0, levels=LEVELS, generations=1, offspring=1, search_tokens=128)
        res = quantize(lm, Recipe(method="rtn", calibration=calib, clip=ClipConfig(grid=4), budget=budget),
                       data_dir=data_dir, progress=False)
        reps[dtype] = res.extra["budget"]
    f32, bf16 = reps["float32"], reps["bfloat16"]
    assert f32["starts"].keys() == bf16["starts"].keys() and f32["start"] == bf16["start"]
    for k, v in f32["starts"].items():
        assert bf16["starts"][k] == pytest.approx(v, rel=0.05)
    assert f32["starts"] != bf16["starts"]  # autocast really ran


def test_the_scorer_measures_against_the_unquantized_model_whenever_a_set_is_first_used(data_dir):  # noqa: F811
    """The reference log-probabilities of a window set are computed on first use, possibly while
    layers are fake-quantized: they must still be the unquantized model's; a dropped set comes
    back the same; scoring leaves the original weights untouched."""
    from lowbit.budget.scorer import Scorer

    lm = deep_tiny()
    ref = deep_tiny().model
    recipe = Recipe(method="rtn", **FAST, budget=BudgetConfig(target_bpw=3.0, levels=LEVELS, search_tokens=128))
    names, _ = target_layers(lm.model, recipe)
    levels = recipe.budget.parsed_levels()
    search, confirm = held_out_ids(lm, recipe, data_dir, 1), held_out_ids(lm, recipe, data_dir, 2)
    score = Scorer(lm.model, names, levels, recipe, search=search, confirm=confirm)
    low = [0] * len(names)
    first = score(low)  # the search reference is built first, then every layer goes to w2g16
    kls = score.windows(low, "confirm")  # built while every layer is at w2g16
    score.restore()
    by_hand = [  # the model at w2g16, built independently
        rtn_quantize(lm.model.get_submodule(n).weight.detach(), QuantFormat(2, 16, False), FAST["clip"]).dequantize()
        for n in names]
    quantized = deep_tiny().model
    for n, q in zip(names, by_hand):
        quantized.get_submodule(n).weight.data = q
    assert sum(kls) / len(kls) == pytest.approx(held_out_kl(ref, quantized, confirm), rel=1e-4)
    assert first == pytest.approx(held_out_kl(ref, quantized, search), rel=1e-4)
    score.drop("search")
    assert score(low) == pytest.approx(first, rel=1e-6)
    score.restore()
    for n in names:
        assert torch.equal(lm.model.get_submodule(n).weight, ref.get_submodule(n).weight)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_the_probe_from_the_changed_block_on_measures_what_a_full_forward_does(arch, dtype, data_dir,  # noqa: F811
                                                                              monkeypatch):
    from lowbit.budget.scorer import Scorer

    lm = deep_tiny(arch=arch, layers=4)
    calib = CalibrationConfig(n_samples=8, seqlen=64, dtype=dtype)
    recipe = Recipe(method="rtn", calibration=calib, clip=ClipConfig(grid=4),
                    budget=BudgetConfig(target_bpw=3.0, levels=LEVELS, search_tokens=128))
    names, _ = target_layers(lm.model, recipe)
    score = Scorer(lm.model, names, recipe.budget.parsed_levels(), recipe,
                    search=held_out_ids(lm, recipe, data_dir, 1), confirm=held_out_ids(lm, recipe, data_dir, 2))
    slow = score.probe(0, 128, progress=False, reuse_prefix=False)

    def no_full_forward(*args, **kwargs):
        raise AssertionError("the probe ran the whole model")

    monkeypatch.setattr(lowbit.budget.scorer, "_window_kls", no_full_forward)
    fast = score.probe(0, 128, progress=False)
    score.restore()
    assert slow.max() > 1e-3  # (bfloat16 noise can put a harmless layer slightly below 0)
    assert torch.allclose(fast, slow, rtol=1e-5, atol=1e-9), (fast - slow).abs().max()
