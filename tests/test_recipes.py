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
