"""What the benches share: the section writer keeps the rest of the file, the child runner turns a
process that dies into an error row."""

from lowbit.bench.common import run_in_child, section_markers, write_section


def test_section_is_replaced_in_place_and_the_rest_kept(tmp_path):
    f = tmp_path / "B.md"
    f.write_text("# title\n\nintro\n")
    write_section(f, "first")
    write_section(f, "second")
    text = f.read_text()
    begin, end = section_markers("accuracy")
    assert text.startswith("# title\n\nintro\n")
    assert "second" in text and "first" not in text
    assert text.count(begin) == 1 and text.count(end) == 1
    f.write_text(text + "\n## other section\n")
    write_section(f, "third")
    assert f.read_text().endswith("## other section\n") and "third" in f.read_text()


def _dies(spec, queue):
    import os

    os._exit(3)


def test_a_child_that_dies_without_reporting_gives_what_died_returns():
    assert run_in_child(_dies, {}, lambda code: {"error": code}) == {"error": 3}
