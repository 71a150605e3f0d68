"""Level: "w3g128" parsed once, with a clear error naming the bad string and the form."""

import pytest

from lowbit.errors import ConfigError
from lowbit.levels import Level
from lowbit.recipes import BudgetConfig, Recipe


@pytest.mark.parametrize("text,level", [("w3g128", Level(3, 128)), ("w2g-1", Level(2, -1)), ("w8g32", Level(8, 32))])
def test_parse_and_str_round_trip(text, level):
    assert Level.parse(text) == level and str(level) == text


@pytest.mark.parametrize("text,why", [("w3x64", "w<bits>g<group>"), ("3g64", "w<bits>g<group>"), (None, "w<bits>g<group>"),
                                      ("w9g64", "bits must be an integer from 2 to 8"),
                                      ("w3g12", "not a multiple of 8")])
def test_bad_levels_name_the_string_and_the_form(text, why):
    with pytest.raises(ConfigError, match=why) as e:
        Level.parse(text)
    assert str(text)[:4] in str(e.value)


def test_a_budget_holds_levels_and_records_strings():
    b = BudgetConfig(target_bpw=3.0, levels=("w2g64", "w4g128"))
    assert b.levels == (Level(2, 64), Level(4, 128)) and b.parsed_levels() == [Level(2, 64), Level(4, 128)]
    d = Recipe(budget=b).to_dict()
    assert d["budget"]["levels"] == ["w2g64", "w4g128"] and Recipe.from_dict(d).budget == b


def test_an_allocation_overrides_rules_by_exact_name():
    from lowbit.recipes import Rule

    r = Recipe(method="gptq", bits=3, group_size=32, rules=(Rule("down_proj", bits=5, method="rtn"),))
    alloc = {"model.layers.0.mlp.down_proj": Level(2, 64)}
    spec = r.layer_spec("model.layers.0.mlp.down_proj", 128, alloc)
    assert (spec.method.name, spec.fmt.bits, spec.fmt.group_size) == ("gptq", 2, 64)
    other = r.layer_spec("model.layers.1.mlp.down_proj", 128, alloc)
    assert (other.method.name, other.fmt.bits, other.fmt.group_size) == ("rtn", 5, 32)
    assert r.used_dict(alloc)["rules"][0] == {"pattern": r"^model\.layers\.0\.mlp\.down_proj$", "bits": 2,
                                              "group_size": 64}
