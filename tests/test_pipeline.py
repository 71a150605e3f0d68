"""The quantize pipeline on tiny models: every decoder linear becomes a QuantLinear, GPTQ beats
RTN, skips are honoured, bad recipes fail before any work."""

import json

import pytest
import torch
from rendered import numbers
from tiny_models import TINY_VOCAB, ByteTokenizer, build_tiny, byte_c4_data, loaded_tiny

from lowbit.algorithms.rtn import rtn_quantize
from lowbit.data import eval_tokens
from lowbit.errors import ConfigError
from lowbit.loading import load_checkpoint
from lowbit.pipeline import _dense_twin, quantize, save, target_layers
from lowbit.qtensor import QuantFormat
from lowbit.recipes import CalibrationConfig, Recipe
from lowbit.runtime.qlinear import QuantLinear


@pytest.fixture
def data_dir(tmp_path):
    return byte_c4_data(tmp_path)


def _logit_err(model, ref, ids):
    with torch.inference_mode():
        return float((model(ids).logits - ref(ids).logits).pow(2).mean())


CALIB = CalibrationConfig(n_samples=16, seqlen=64)


def test_gptq_pipeline_quantizes_every_block_linear_and_beats_rtn(data_dir, arch):
    # held-out text of the calibration distribution (C4 eval documents never overlap calibration)
    ids = eval_tokens(ByteTokenizer(), "c4", 256, data_dir).reshape(4, 64)
    ref = build_tiny(arch)
    errs = {}
    for method in ("rtn", "gptq"):
        lm = loaded_tiny(arch)
        res = quantize(lm, Recipe(method=method, bits=3, group_size=32, calibration=CALIB), data_dir=data_dir,
                       progress=False)
        names, _ = target_layers(ref, Recipe())
        assert set(res.layers) == set(names) and len(names) == 14
        assert all(isinstance(lm.model.get_submodule(n), QuantLinear) for n in names)
        assert not any(type(m) is torch.nn.Linear and ".layers." in n for n, m in lm.model.named_modules())
        errs[method] = _logit_err(lm.model, ref, ids)
    assert errs["gptq"] < errs["rtn"]


def test_bfloat16_calibration_forwards_run_under_autocast_and_still_beat_rtn(data_dir, monkeypatch):
    """calibration.dtype bfloat16: the blocks run under CPU autocast while Hessians are collected
    (they stay float32), the weights stay float32, and GPTQ still beats RTN."""
    from lowbit.calibration import hessian

    seen = []
    add = hessian.HessianAccumulator.add
    def recording_add(self, x):
        add(self, x)
        seen.append((torch.is_autocast_enabled("cpu"), self.H.dtype))

    monkeypatch.setattr(hessian.HessianAccumulator, "add", recording_add)
    ids = eval_tokens(ByteTokenizer(), "c4", 256, data_dir).reshape(4, 64)
    ref = build_tiny("qwen2")
    errs = {}
    for method, dtype in (("rtn", "float32"), ("gptq", "bfloat16"), ("gptq", "float32")):
        lm = loaded_tiny("qwen2")
        seen.clear()
        calib = CalibrationConfig(n_samples=16, seqlen=64, dtype=dtype)
        res = quantize(lm, Recipe(method=method, bits=3, group_size=32, calibration=calib), data_dir=data_dir,
                       progress=False)
        if method == "gptq":
            assert seen and {on for on, _ in seen} == {dtype == "bfloat16"} and res.calibration["dtype"] == dtype
            assert {h for _, h in seen} == {torch.float32}
            assert all(p.dtype == torch.float32 for p in lm.model.parameters())
        errs[method, dtype] = _logit_err(lm.model, ref, ids)
    assert errs["gptq", "bfloat16"] < errs["rtn", "float32"]
    assert errs["gptq", "bfloat16"] != errs["gptq", "float32"]  # the option changes the calibration


def test_dense_twin_computes_exactly_what_quantlinear_computes():
    lin = torch.nn.Linear(64, 24, bias=True)
    qw = rtn_quantize(lin.weight.detach(), QuantFormat(3, 16, False))
    x = torch.randn(7, 64)
    assert torch.equal(_dense_twin(lin, qw, torch.float32)(x), QuantLinear.from_quantized(qw, lin.bias)(x))


def test_skip_patterns_keep_layers_dense(data_dir):
    lm = loaded_tiny()
    res = quantize(lm, Recipe(method="rtn", bits=4, group_size=32, skip=(r"mlp\.down_proj",)), progress=False)
    assert res.skipped == ["model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj"]
    assert type(lm.model.model.layers[0].mlp.down_proj) is torch.nn.Linear
    assert res.size.n_quantized_params == sum(
        m.in_features * m.out_features for m in lm.model.modules() if isinstance(m, QuantLinear))


def test_bits_per_weight_counts_scales_and_zeros():
    lm = loaded_tiny()
    res = quantize(lm, Recipe(method="rtn", bits=4, group_size=32), progress=False)
    # 4-bit codes + (16-bit scale + 4-bit zero) / 32 per weight; every width here divides by 8
    assert res.size.bits_per_weight == pytest.approx(4 + 20 / 32)


def test_group_size_not_dividing_the_width_uses_a_short_last_group(tmp_path):
    lm = loaded_tiny()
    res = quantize(lm, Recipe(method="rtn", bits=4, group_size=48), progress=False)
    q = lm.model.model.layers[0].mlp.down_proj  # in_features 128 -> groups of 48, 48, 32
    assert q.scales.shape == (64, 3)
    ids = torch.randint(1, TINY_VOCAB, (1, 16))
    loaded = load_checkpoint(save(res, tmp_path / "ck"))
    with torch.inference_mode():
        assert torch.equal(loaded.model(ids).logits, lm.model(ids).logits)


def test_skipping_everything_is_an_error():
    with pytest.raises(ConfigError, match="nothing to quantize"):
        quantize(loaded_tiny(), Recipe(method="rtn", skip=(".*",)), progress=False)


def test_save_writes_manifest_and_report(tmp_path, data_dir):
    lm = loaded_tiny()
    res = quantize(lm, Recipe(method="gptq", bits=4, group_size=32, calibration=CALIB), data_dir=data_dir,
                   progress=False)
    out = save(res, tmp_path / "ck")
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["recipe"]["method"] == "gptq"
    assert manifest["calibration"] == {"dataset": "c4", "n_samples": 16, "seqlen": 64, "seed": 0, "dtype": "float32",
                                      "n_tokens": 1024}
    assert len(manifest["layers"]) == 14
    items = [line[2:] for line in (out / "REPORT.md").read_text().splitlines() if line.startswith("- ")]
    cal = manifest["calibration"]  # the report's items carry the manifest's numbers
    assert [numbers(i)[-3:] for i in items if cal["dataset"] in i] == [[cal["n_samples"], cal["seqlen"], cal["seed"]]]
    assert any(round(manifest["stats"]["bits_per_weight"], 3) in numbers(i) for i in items)


def with_outlier_channels(model, boost=25.0):
    """Make a few hidden channels carry large activations into q/k/v and gate/up, as trained LLMs do."""
    from lowbit.models.arch import decoder_layers, smoothing_groups

    hot = torch.tensor([3, 17, 40])
    with torch.no_grad():
        for block in decoder_layers(model):
            for sg in smoothing_groups(block):
                prev = block.get_submodule(sg.prev)
                if not isinstance(prev, torch.nn.Linear):
                    prev.weight[hot] = boost
    return model


def test_awq_beats_rtn_and_awq_gptq_beats_gptq_with_outlier_channels(data_dir, arch):
    ids = eval_tokens(ByteTokenizer(), "c4", 256, data_dir).reshape(4, 64)
    ref = with_outlier_channels(build_tiny(arch))
    errs, results = {}, {}
    for method in ("rtn", "awq", "gptq", "awq-gptq"):
        lm = loaded_tiny(arch)
        with_outlier_channels(lm.model)
        results[method] = quantize(lm, Recipe(method=method, bits=3, group_size=32, calibration=CALIB),
                                   data_dir=data_dir, progress=False)
        assert all(isinstance(lm.model.get_submodule(n), QuantLinear) for n in results[method].layers)
        errs[method] = _logit_err(lm.model, ref, ids)
    assert errs["awq"] < errs["rtn"] and errs["awq-gptq"] < errs["gptq"], errs
    stats = results["awq"].manifest_info()["layer_stats"]
    qkv = stats["model.layers.0.self_attn.q_proj"]
    assert qkv["awq_alpha"] is not None and qkv["awq_loss"] < qkv["awq_loss_unsmoothed"]


def test_awq_checkpoint_keeps_the_smoothed_norms(data_dir, tmp_path):
    # smoothing edits layers that stay dense (norms); the checkpoint must carry them
    lm = loaded_tiny("gemma3")
    with_outlier_channels(lm.model)
    before = lm.model.model.layers[0].input_layernorm.weight.clone()
    res = quantize(lm, Recipe(method="awq", bits=4, group_size=32, calibration=CALIB), data_dir=data_dir,
                   progress=False)
    assert not torch.equal(lm.model.model.layers[0].input_layernorm.weight, before)
    ids = torch.randint(1, TINY_VOCAB, (1, 16))
    loaded = load_checkpoint(save(res, tmp_path / "ck"))
    assert json.loads((tmp_path / "ck" / "manifest.json").read_text())["recipe"]["method"] == "awq"
    with torch.inference_mode():
        assert torch.equal(loaded.model(ids).logits, lm.model(ids).logits)


def test_slim_pipeline_meets_the_average_and_round_trips(data_dir, tmp_path, capsys):
    lm = loaded_tiny("qwen2")
    res = quantize(lm, Recipe(method="slim", bits=2.5, group_size=16, calibration=CALIB), data_dir=data_dir,
                   progress=False)
    qmods = [m for m in lm.model.modules() if isinstance(m, QuantLinear)]
    assert len(qmods) == 14 and all(m.group_bits is not None for m in qmods)
    for m in qmods:
        assert m.quantized_weight().average_bits() == pytest.approx(2.5)
    for name, lr in res.layers.items():  # each layer says which measured candidate it kept
        assert lr.extra["slim_choice"].split(", ")[0] in ("table", "unmoved"), name
        assert lr.extra["slim_k"] == 0 or lr.extra["slim_choice"].startswith("table")
    out = save(res, tmp_path / "ck")
    manifest = json.loads((out / "manifest.json").read_text())
    layer = manifest["layers"]["model.layers.0.mlp.down_proj"]
    assert layer["average_bits"] == pytest.approx(2.5) and len(layer["group_bits"]) == 128 // 16
    from lowbit.cli import main

    assert main(["info", str(out), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["bits_per_weight"] == pytest.approx(res.size.bits_per_weight)
    assert info["per_layer"]["model.layers.0.mlp.down_proj"].startswith("w2.50g16-mixed")
    loaded = load_checkpoint(out)
    ids = torch.randint(1, TINY_VOCAB, (1, 16))
    with torch.inference_mode():
        assert torch.equal(loaded.model(ids).logits, lm.model(ids).logits)


def test_integer_scale_checkpoint_round_trips(data_dir, tmp_path):
    from lowbit.recipes import IntegerScaleConfig

    lm = loaded_tiny("llama")
    recipe = Recipe(method="gptq", bits=4, group_size=16, calibration=CALIB, integer_scale=IntegerScaleConfig(True))
    res = quantize(lm, recipe, data_dir=data_dir, progress=False)
    q = lm.model.model.layers[1].mlp.down_proj
    assert q.scales.dtype == torch.uint8 and q.scale_mult.shape == (64,)
    out = save(res, tmp_path / "ck")
    assert json.loads((out / "manifest.json").read_text())["layers"]["model.layers.1.mlp.down_proj"]["scale_bits"] == 8
    loaded = load_checkpoint(out)
    ids = torch.randint(1, TINY_VOCAB, (1, 16))
    with torch.inference_mode():
        assert torch.equal(loaded.model(ids).logits, lm.model(ids).logits)


def test_rules_give_layers_their_own_format(data_dir, tmp_path):
    from lowbit.recipes import Rule

    lm = loaded_tiny("qwen2")
    recipe = Recipe(method="gptq", bits=3, group_size=32, calibration=CALIB,
                    rules=(Rule(r"mlp\.down_proj", bits=5, group_size=16), Rule(r"self_attn\.o_proj", method="rtn")))
    res = quantize(lm, recipe, data_dir=data_dir, progress=False)
    down, o, q = (lm.model.model.layers[0].mlp.down_proj, lm.model.model.layers[0].self_attn.o_proj,
                  lm.model.model.layers[0].self_attn.q_proj)
    assert (down.fmt.bits, down.fmt.group_size) == (5, 16) and (q.fmt.bits, q.fmt.group_size) == (3, 32)
    assert res.layers["model.layers.0.self_attn.o_proj"].loss is None        # round-to-nearest: no GPTQ loss
    assert res.layers["model.layers.0.self_attn.q_proj"].loss is not None
    assert o.fmt.bits == 3
    report = (save(res, tmp_path / "ck") / "REPORT.md").read_text()
    assert "w5g16" in report and "w3g32" in report


def test_time_estimate_orders_the_methods_by_their_work():
    from lowbit.pipeline import estimate
    from lowbit.recipes import BudgetConfig

    model = build_tiny("llama")
    secs = {m: estimate(model, Recipe(method=m))["seconds"] for m in ("rtn", "gptq", "awq-gptq")}
    budget = estimate(model, Recipe(method="gptq", budget=BudgetConfig(target_bpw=3.0)))["seconds"]
    assert secs["rtn"] < secs["gptq"] < secs["awq-gptq"] and secs["gptq"] < budget


def test_head_bits_rounds_an_untied_head_and_it_survives_a_checkpoint(tmp_path):
    lm = loaded_tiny(tie=False)
    dense_head = lm.model.lm_head.weight.detach().clone()
    res = quantize(lm, Recipe(method="rtn", bits=4, group_size=32, head_bits=8, head_group_size=64), progress=False)
    head = lm.model.lm_head
    assert isinstance(head, QuantLinear) and head.fmt.bits == 8 and head.fmt.group_size == 64
    assert "lm_head" in res.layers
    assert torch.equal(head.dequantized_weight(torch.float32), rtn_quantize(dense_head, QuantFormat(8, 64, False)).dequantize())
    save(res, tmp_path / "ck")
    back = load_checkpoint(tmp_path / "ck").model
    ids = torch.randint(0, 200, (1, 16), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        assert torch.equal(back(ids).logits, lm.model(ids).logits)


def test_by_default_an_untied_head_is_8_bit_and_a_tied_one_stays_dense():
    untied = loaded_tiny(tie=False)
    res = quantize(untied, Recipe(method="rtn", bits=4, group_size=32), progress=False)
    assert res.recipe.head_bits == 8 and res.weights["lm_head"].fmt.bits == 8
    explicit = quantize(loaded_tiny(tie=False),
                        Recipe(method="rtn", bits=4, group_size=32, head_bits=8), progress=False)
    assert all(torch.equal(getattr(explicit.weights["lm_head"], t), getattr(res.weights["lm_head"], t))
               for t in ("codes", "scales", "zeros"))  # the default is what --head-bits 8 gave
    assert res.manifest_info()["recipe"]["head_bits"] == 8  # the manifest says what ran
    # the rate is the blocks' (a recipe's width and group); the head's record counts in the bytes
    blocks = [w for n, w in res.weights.items() if n != "lm_head"]
    assert res.size.bits_per_weight == pytest.approx(8 * sum(w.nbytes() for w in blocks)
                                                     / sum(w.shape[0] * w.shape[1] for w in blocks))
    dense_head = quantize(loaded_tiny(tie=False),
                          Recipe(method="rtn", bits=4, group_size=32, head_bits=0), progress=False)
    assert "lm_head" not in dense_head.weights and dense_head.recipe.head_bits == 0
    assert res.size.bits_per_weight == dense_head.size.bits_per_weight
    assert res.size.model_bytes < dense_head.size.model_bytes
    tied = quantize(loaded_tiny(), Recipe(method="rtn", bits=4, group_size=32), progress=False)
    assert "lm_head" not in tied.weights and tied.recipe.head_bits == 0
    # skipping the head by name keeps it dense
    skipped = quantize(loaded_tiny(tie=False),
                       Recipe(method="rtn", bits=4, group_size=32, skip=("lm_head",)), progress=False)
    assert "lm_head" not in skipped.weights


def test_head_bits_refuses_a_head_tied_to_the_embeddings():
    lm = loaded_tiny()  # tied
    assert lm.model.lm_head.weight is lm.model.get_input_embeddings().weight
    with pytest.raises(ConfigError, match="tied"):
        quantize(lm, Recipe(method="rtn", bits=4, group_size=32, head_bits=8), progress=False)
    with pytest.raises(ConfigError, match="head_bits"):
        Recipe(head_bits=9)


@pytest.mark.parametrize("arch_name", ["llama", "qwen2"])
def test_awq_slim_beats_slim_with_outlier_channels(data_dir, arch_name):
    """Smoothing before SliM-LLM pays where a few input channels carry large activations."""
    ids = eval_tokens(ByteTokenizer(), "c4", 256, data_dir).reshape(4, 64)
    ref = with_outlier_channels(build_tiny(arch_name))
    errs = {}
    for method in ("slim", "awq-slim"):
        lm = loaded_tiny(arch_name)
        with_outlier_channels(lm.model)
        res = quantize(lm, Recipe(method=method, bits=3, group_size=16, calibration=CALIB), data_dir=data_dir,
                       progress=False)
        errs[method] = _logit_err(lm.model, ref, ids)
        for name, lr in res.layers.items():
            assert lr.extra["average_bits"] == pytest.approx(3) and "slim_choice" in lr.extra, name
        assert ("awq_alpha" in res.layers["model.layers.0.self_attn.q_proj"].extra) == (method == "awq-slim")
    assert errs["awq-slim"] < errs["slim"], errs
