"""Budgeted allocation: budgets are met from below within 1%, the greedy follows sensitivity,
the search never ends worse than where it started, impossible budgets fail clearly."""

import json

import pytest
import torch

from lowbit.allocate import BudgetError, budget_bytes, greedy, layer_bytes
from lowbit.checkpoint import load_checkpoint
from lowbit.eval.size import quantized_size
from lowbit.models.load import LoadedModel, ModelSource
from lowbit.pipeline import quantize, save, target_layers
from lowbit.recipes import BudgetConfig, CalibrationConfig, ClipConfig, Recipe
from test_pipeline import ByteTokenizer, data_dir  # noqa: F401 (fixture)
from tiny_models import build_tiny


def test_greedy_meets_the_budget_and_spends_it_where_error_falls_most():
    # 4 layers, 3 levels (bytes 10/20/30); layer 0 is very sensitive, layer 3 not at all
    costs = torch.tensor([[10, 20, 30]] * 4)
    errors = torch.tensor([[100.0, 10, 1], [10, 5, 4], [10, 6, 5], [1, 0.9, 0.8]])
    choice = greedy(costs, errors, budget=80)
    assert sum(int(costs[i, k]) for i, k in enumerate(choice)) <= 80
    assert choice[0] == 2 and choice[3] == 0
    uniform = float(errors[:, 1].sum())  # 2nd level everywhere costs the same 80 bytes
    assert sum(float(errors[i, k]) for i, k in enumerate(choice)) < uniform


def test_greedy_never_picks_a_dominated_level():
    costs = torch.tensor([[10, 20, 30]])
    errors = torch.tensor([[5.0, 6.0, 1.0]])  # level 1 costs more and is worse than level 0
    assert greedy(costs, errors, budget=25) == [0]
    assert greedy(costs, errors, budget=30) == [2]


def test_greedy_refuses_a_budget_below_the_smallest_allocation():
    with pytest.raises(BudgetError, match="smallest allocation"):
        greedy(torch.tensor([[10, 20]] * 3), torch.ones(3, 2), budget=29)


def deep_tiny(seed=0):
    import transformers

    cfg = transformers.LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=6,
                                   num_attention_heads=4, num_key_value_heads=2, initializer_range=0.1)
    torch.manual_seed(seed)
    src = ModelSource(spec="tiny", kind="hf_folder", path=None, gguf_file=None, name="tiny", sha256=None)
    return LoadedModel(transformers.LlamaForCausalLM(cfg).eval(), ByteTokenizer(), src)


LEVELS = ("w2g16", "w2g32", "w3g16", "w3g32", "w4g16", "w4g32", "w5g32", "w6g32", "w8g32")
CALIB = CalibrationConfig(n_samples=8, seqlen=64)
FAST = dict(calibration=CALIB, clip=ClipConfig(grid=4))  # a coarse clip search keeps these tests quick


@pytest.mark.parametrize("method", ["rtn", "gptq"])
def test_target_bpw_is_met_within_one_percent(method, data_dir, tmp_path):  # noqa: F811
    lm = deep_tiny()
    budget = BudgetConfig(target_bpw=3.0, levels=LEVELS, generations=4, offspring=2, search_tokens=128)
    res = quantize(lm, Recipe(method=method, **FAST, budget=budget), data_dir=data_dir, progress=False)
    bpw = quantized_size(lm.model).bits_per_weight
    assert 0.99 * 3.0 <= bpw <= 3.0
    rep = res.extra["budget"]
    assert rep["bits_per_weight"] == pytest.approx(bpw)
    assert rep["final_kl"] <= rep["greedy_kl"]
    assert len(set(rep["choice"].values())) > 1  # not a uniform allocation
    # the checkpoint records each layer's resolved format and the budget report
    out = save(res, tmp_path / "ck")
    manifest = json.loads((out / "manifest.json").read_text())
    for name, lv in rep["choice"].items():
        layer = manifest["layers"][name]
        assert lv == f"w{layer['bits']}g{layer['group_size']}"
    assert manifest["budget"]["used_bytes"] == rep["used_bytes"]
    assert load_checkpoint(out).model is not None


def test_target_size_counts_the_dense_tensors(data_dir):  # noqa: F811
    lm = deep_tiny()
    names, _ = target_layers(lm.model, Recipe())
    costs = layer_bytes(lm.model, names, [(4, 32)], Recipe())
    dense = quantized_size(lm.model).model_bytes  # before quantization: everything at 16 bits
    target = int(0.3 * dense)
    budget = BudgetConfig(target_bytes=target, levels=LEVELS, generations=0)
    quantize(lm, Recipe(method="rtn", **FAST, budget=budget), data_dir=data_dir, progress=False)
    size = quantized_size(lm.model).model_bytes
    assert 0.99 * target <= size <= target
    assert int(costs.sum()) > 0


def test_impossible_budgets_name_the_fix(data_dir):  # noqa: F811
    lm = deep_tiny()
    names, _ = target_layers(lm.model, Recipe())
    with pytest.raises(BudgetError, match="below the .* stay at 16 bits"):
        budget_bytes(lm.model, names, BudgetConfig(target_bytes=1000))
    with pytest.raises(BudgetError, match="largest level"):
        quantize(lm, Recipe(method="rtn", **FAST, budget=BudgetConfig(target_bpw=12.0, levels=LEVELS)),
                 data_dir=data_dir, progress=False)
    with pytest.raises(BudgetError, match="smallest allocation"):
        quantize(lm, Recipe(method="rtn", **FAST, budget=BudgetConfig(target_bpw=1.5, levels=LEVELS)),
                 data_dir=data_dir, progress=False)
