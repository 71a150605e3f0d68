import pytest

from lowbit.errors import ConfigError
from lowbit.recipes import Recipe


def test_dict_round_trip():
    r = Recipe(method="rtn", bits=3, group_size=64, skip=("lm_head",))
    assert Recipe.from_dict(r.to_dict()) == r


def test_slim_takes_a_fractional_average():
    assert Recipe(method="slim", bits=2.5).bits == 2.5
    assert Recipe(method="awq-slim", bits=2.5).bits == 2.5  # smoothing composes with SliM-LLM
    with pytest.raises(ConfigError, match="need method 'slim' or 'awq-slim'"):
        Recipe(method="awq-gptq", bits=2.5)
    assert Recipe.from_dict({"method": "awq-gptq", "bits": 3, "awq": {"grid": 10}}).awq.grid == 10


def test_toml_and_yaml_files(tmp_path):
    (tmp_path / "r.toml").write_text('method = "gptq"\nbits = 3\n[gptq]\nact_order = true\n[calibration]\nn_samples = 32\n')
    (tmp_path / "r.yaml").write_text("method: gptq\nbits: 3\ngptq: {act_order: true}\ncalibration: {n_samples: 32}\n")
    a, b = Recipe.from_file(tmp_path / "r.toml"), Recipe.from_file(tmp_path / "r.yaml")
    assert a == b and a.gptq.act_order and a.calibration.n_samples == 32 and a.gptq.damp == 0.01


@pytest.mark.parametrize("data,field", [
    ({"method": "smoothquant"}, "method"),
    ({"bits": 2.5}, "bits"),
    ({"method": "slim", "bits": 9}, "bits"),
    ({"awq": {"grid": 0}}, "awq.grid"),
    ({"slim": {"spread": 3}}, "slim.spread"),
    ({"slim": {"salience_clip": 1}}, "slim.salience_clip"),
    ({"method": "slim", "bits": 3, "gptq": {"act_order": True}}, "gptq.static_groups"),
    ({"method": "awq-slim", "bits": 1}, "bits"),
    ({"bits": 1}, "bits"),
    ({"bits": "4"}, "bits"),
    ({"colour": 1}, "colour"),
    ({"gptq": {"damp": 0}}, "gptq.damp"),
    ({"gptq": {"blocksize": 3}}, "gptq.blocksize"),
    ({"calibration": {"n_samples": 0}}, "calibration.n_samples"),
    ({"calibration": {"dtype": "float16"}}, "calibration.dtype"),
    ({"clip": {"max_shrink": 1.5}}, "clip.max_shrink"),
    ({"skip": "lm_head"}, "skip"),
    ({"skip": ["(unclosed"]}, "skip"),
    ({"gptq": 5}, "gptq"),
])
def test_validation_names_the_field(data, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        Recipe.from_dict(data)


def test_missing_or_unknown_recipe_file(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        Recipe.from_file(tmp_path / "nope.toml")
    (tmp_path / "r.json").write_text("{}")
    with pytest.raises(ConfigError, match=".toml"):
        Recipe.from_file(tmp_path / "r.json")


def test_every_preset_loads_and_unknown_names_list_them():
    from lowbit.recipes import presets

    names = presets()
    assert {"w4g128-gptq", "w3g64-awq-gptq", "w2.5-slim", "budget-3bpw"} <= set(names)
    for name in names:
        r = Recipe.load(name)
        assert Recipe.from_dict(r.to_dict()) == r
    assert Recipe.load("w2.5-slim").bits == 2.5 and Recipe.load("budget-3bpw").budget.target_bpw == 3.0
    with pytest.raises(ConfigError, match="w4g128-gptq"):
        Recipe.load("w9-nonsense")


def test_rules_route_modules_to_their_settings(tmp_path):
    (tmp_path / "r.yaml").write_text(
        "method: gptq\nbits: 3\nrules:\n  - {pattern: 'mlp\\.down_proj', bits: 4, group_size: 64}\n"
        "  - {pattern: 'self_attn\\.[qk]_proj', method: rtn}\n")
    r = Recipe.from_file(tmp_path / "r.yaml")
    down = r.for_layer("model.layers.3.mlp.down_proj")
    assert (down.bits, down.group_size, down.method) == (4, 64, "gptq")
    assert r.for_layer("model.layers.0.self_attn.k_proj").method == "rtn"
    assert r.for_layer("model.layers.0.self_attn.v_proj") == r
    with pytest.raises(ConfigError, match="rules.method"):
        Recipe.from_dict({"method": "gptq", "rules": [{"pattern": "x", "method": "awq"}]})
    with pytest.raises(ConfigError, match="rules.pattern"):
        Recipe.from_dict({"rules": [{"pattern": "(", "bits": 4}]})
    with pytest.raises(ConfigError, match="budget"):
        Recipe.from_dict({"budget": {"target_bpw": 3, "target_bytes": 10}})
    with pytest.raises(ConfigError, match="budget.levels"):
        Recipe.from_dict({"budget": {"target_bpw": 3, "levels": ["w3x64", "w4g64"]}})


@pytest.mark.parametrize("group_size", [0, -2, 7, 100, 100001])
def test_group_sizes_the_kernels_cannot_run_are_refused(group_size):
    with pytest.raises(ConfigError, match="group_size"):
        Recipe(group_size=group_size)
    with pytest.raises(ConfigError, match="rules.group_size"):
        Recipe.from_dict({"rules": [{"pattern": "x", "group_size": group_size}]})
    with pytest.raises(ConfigError, match="budget.levels"):
        Recipe.from_dict({"budget": {"target_bpw": 3, "levels": [f"w3g{group_size}", "w4g64"]}})


@pytest.mark.parametrize("group_size", [-1, 8, 32, 48, 128, 4096])
def test_per_channel_and_multiples_of_8_are_accepted(group_size):
    assert Recipe(group_size=group_size).group_size == group_size


@pytest.mark.parametrize("method,absent,present", [
    ("rtn", {"calibration", "gptq", "awq", "slim", "integer_scale", "head_group_size"}, {"clip"}),
    ("gptq", {"awq", "slim"}, {"calibration", "gptq"}),
    ("awq", {"gptq", "slim"}, {"calibration", "awq"}),
    ("awq-gptq", {"slim"}, {"calibration", "gptq", "awq"}),
    ("slim", {"awq"}, {"calibration", "gptq", "slim"}),
])
def test_used_dict_leaves_out_what_the_method_does_not_run(method, absent, present):
    r = Recipe(method=method, bits=3, group_size=64)
    used = r.used_dict()
    assert not absent & set(used) and present <= set(used)
    back = Recipe.from_dict(used)
    assert back.used_dict() == used and (back.method, back.bits, back.group_size) == (method, 3, 64)
    assert Recipe.from_dict(r.to_dict()) == r  # the full form still round-trips


def test_used_dict_keeps_what_a_budget_or_options_use():
    from lowbit.recipes import BudgetConfig, IntegerScaleConfig

    used = Recipe(method="rtn", budget=BudgetConfig(target_bpw=3.0)).used_dict()
    assert "calibration" in used and "budget" in used and "gptq" not in used
    used = Recipe(method="rtn", head_bits=8, integer_scale=IntegerScaleConfig(enabled=True)).used_dict()
    assert used["head_group_size"] == 128 and used["integer_scale"]["enabled"]


@pytest.mark.parametrize("name,text,match", [
    ("r.toml", "method = [unclosed\n", "not valid TOML"),
    ("r.yaml", "method: [unclosed\n", "not valid YAML"),
    ("r.yaml", "method: !!python/object/apply:os.getcwd []\n", "not valid YAML"),
    ("r.yaml", "- 1\n- 2\n", "mapping"),
    ("r.yaml", "rules: [{bits: 4}]\n", "rules.pattern"),
    ("r.yaml", "budget: {target_bpw: '3'}\n", "budget.target_bpw"),
    ("r.yaml", "1: 2\n", "unknown field"),
])
def test_malformed_recipe_files_are_config_errors(tmp_path, name, text, match):
    (tmp_path / name).write_text(text)
    with pytest.raises(ConfigError, match=match):
        Recipe.from_file(tmp_path / name)


def test_binary_recipe_file_is_a_config_error(tmp_path):
    (tmp_path / "r.toml").write_bytes(b"\xff\xfe\x00\x01method")
    with pytest.raises(ConfigError, match="r.toml"):
        Recipe.from_file(tmp_path / "r.toml")


@pytest.mark.parametrize("native", [True, False])
def test_auto_calibration_dtype_is_bf16_only_where_the_cpu_has_it(monkeypatch, native):
    import lowbit.recipe_sections as sections
    from lowbit.recipes import CalibrationConfig

    monkeypatch.setattr(sections, "cpu_has_fast_bf16", lambda: native)
    assert CalibrationConfig().dtype == ("bfloat16" if native else "float32")
    assert Recipe(method="gptq").calibration.dtype == ("bfloat16" if native else "float32")
    assert CalibrationConfig(dtype="float32").dtype == "float32"
    assert CalibrationConfig(dtype="bfloat16").dtype == "bfloat16"
