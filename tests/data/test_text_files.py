"""Local data files that are not UTF-8 text are refused naming the file, before any tokenizing."""

import pytest

from lowbit.data import calibration_documents, eval_text, read_text_file
from lowbit.errors import ConfigError


@pytest.mark.parametrize("content,match", [
    (b"w1 w2 \x00\x01\x02", "NUL"),
    (b"caf\xe9", "is 0xe9"),
    (b"\xff\xfe", "not UTF-8"),
])
def test_binary_and_invalid_utf8_are_refused(tmp_path, content, match):
    for name in ("d.txt", "d.jsonl"):
        path = tmp_path / name
        path.write_bytes(content if name.endswith(".txt") else b'{"text": "a"}\n' + content)
        for read in (eval_text, calibration_documents):
            with pytest.raises(ConfigError, match=match) as e:
                read(str(path))
            assert name in str(e.value)


def test_a_nul_byte_past_the_first_block_is_still_refused(tmp_path):
    path = tmp_path / "d.txt"
    path.write_bytes(b"a" * 100_000 + b"\xff")
    with pytest.raises(ConfigError, match="not UTF-8"):
        read_text_file(path)


def test_empty_files_are_refused(tmp_path):
    (tmp_path / "e.txt").write_text(" \n")
    (tmp_path / "e.jsonl").write_text('{"text": ""}\n\n')
    for name in ("e.txt", "e.jsonl"):
        with pytest.raises(ConfigError, match="no"):
            eval_text(str(tmp_path / name))


def test_jsonl_keeps_a_line_separator_inside_a_string(tmp_path):
    (tmp_path / "d.jsonl").write_text('{"text": "one\u2028two"}\n{"text": "three"}\n', encoding="utf-8")
    assert calibration_documents(str(tmp_path / "d.jsonl")) == ["one\u2028two", "three"]


def test_deeply_nested_json_is_a_config_error(tmp_path):
    (tmp_path / "d.jsonl").write_text("[" * 100_000 + "\n")
    with pytest.raises(ConfigError, match="d.jsonl:1"):
        calibration_documents(str(tmp_path / "d.jsonl"))
