import pytest

from lowbit.bench.accuracy import MARK_BEGIN, MARK_END, Setting, _write_section
from lowbit.errors import ConfigError


def test_setting_parse():
    assert Setting.parse("w3g64") == Setting(3, 64)
    assert str(Setting.parse("W4G128")) == "w4g128"
    with pytest.raises(ConfigError, match="w<bits>g<group>"):
        Setting.parse("4bit")


def test_section_is_replaced_in_place_and_the_rest_kept(tmp_path):
    f = tmp_path / "B.md"
    f.write_text("# title\n\nintro\n")
    _write_section(f, "first")
    _write_section(f, "second")
    text = f.read_text()
    assert text.startswith("# title\n\nintro\n")
    assert "second" in text and "first" not in text
    assert text.count(MARK_BEGIN) == 1 and text.count(MARK_END) == 1
    f.write_text(text + "\n## other section\n")
    _write_section(f, "third")
    assert f.read_text().endswith("## other section\n") and "third" in f.read_text()
