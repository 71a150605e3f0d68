import json
import os
from pathlib import Path

import pytest
import torch
from rendered import numbers

from lowbit.data import (
    DATASETS,
    calibration_documents,
    calibration_samples,
    eval_text,
    eval_tokens,
    resolve_data_file,
)
from lowbit.errors import ConfigError, DataNotFoundError

EOS = 256


class ByteTokenizer:
    """A minimal tokenizer: one id per UTF-8 byte, EOS = 256. Records what it was asked."""

    name_or_path = "bytes"
    eos_token_id = EOS

    def __init__(self):
        self.calls: list[str] = []

    def __call__(self, text):
        self.calls.append(text)
        return {"input_ids": list(text.encode("utf-8"))}


class NoEosByteTokenizer(ByteTokenizer):
    eos_token_id = None


@pytest.fixture(autouse=True)
def hermetic(tmp_path, monkeypatch):
    """No stray data or cache: empty cwd, cache under tmp_path, no LOWBIT_DATA."""
    monkeypatch.delenv("LOWBIT_DATA", raising=False)
    monkeypatch.setenv("LOWBIT_CACHE", str(tmp_path / "cache"))
    work = tmp_path / "cwd"
    work.mkdir()
    monkeypatch.chdir(work)


def write_c4(directory: Path, n_docs: int = 2000) -> list[str]:
    directory.mkdir(parents=True, exist_ok=True)
    docs = [f"document {i} " + "x" * (i % 7) for i in range(n_docs)]
    with (directory / "c4-validation-2k.jsonl").open("w") as f:
        for d in docs:
            f.write(json.dumps({"text": d}) + "\n")
    return docs


# --- resolving files -----------------------------------------------------------------------


def test_explicit_dir_wins_over_env(tmp_path, monkeypatch):
    for name in ("flag", "env"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "wikitext2-test.txt").write_text(name)
    monkeypatch.setenv("LOWBIT_DATA", str(tmp_path / "env"))
    found = resolve_data_file("wikitext2-test.txt", tmp_path / "flag")
    assert found == tmp_path / "flag" / "wikitext2-test.txt"
    assert eval_text("wikitext2", tmp_path / "flag") == "flag"
    assert eval_text("wikitext2") == "env"


def test_env_then_cache_then_cwd(tmp_path, monkeypatch):
    (tmp_path / "cwd" / "data").mkdir()
    (tmp_path / "cwd" / "data" / "ptb-test.txt").write_text("cwd")
    assert eval_text("ptb") == "cwd"
    (tmp_path / "cache" / "data").mkdir(parents=True)
    (tmp_path / "cache" / "data" / "ptb-test.txt").write_text("cache")
    assert eval_text("ptb") == "cache"
    (tmp_path / "env").mkdir()
    (tmp_path / "env" / "ptb-test.txt").write_text("env")
    monkeypatch.setenv("LOWBIT_DATA", str(tmp_path / "env"))
    assert eval_text("ptb") == "env"


def test_missing_file_message_names_file_dirs_and_source(tmp_path, monkeypatch):
    monkeypatch.setenv("LOWBIT_DATA", str(tmp_path / "env"))
    with pytest.raises(DataNotFoundError) as info:
        eval_text("wikitext2")
    message = str(info.value)
    assert "wikitext2-test.txt" in message
    for d in (tmp_path / "env", tmp_path / "cache" / "data", tmp_path / "cwd" / "data"):
        assert str(d) in message
    assert "--data-dir" in message and "LOWBIT_DATA" in message
    assert "wikitext-2-raw-v1" in message  # where to get it


def test_missing_with_explicit_dir_searches_only_it(tmp_path):
    with pytest.raises(DataNotFoundError) as info:
        resolve_data_file("c4-validation-2k.jsonl", tmp_path / "nowhere")
    message = str(info.value)
    assert str(tmp_path / "nowhere") in message
    assert str(tmp_path / "cache") not in message
    assert "allenai/c4" in message


# --- text ------------------------------------------------------------------------------------


def test_c4_eval_and_calibration_are_disjoint(tmp_path):
    docs = write_c4(tmp_path / "d")
    calib = calibration_documents("c4", tmp_path / "d")
    assert calib == docs[:1000]
    assert eval_text("c4", tmp_path / "d") == "\n\n".join(docs[1000:])
    assert set(calib).isdisjoint(docs[1000:])


def test_truncated_c4_is_an_error(tmp_path):
    write_c4(tmp_path / "d", n_docs=1500)
    with pytest.raises(DataNotFoundError, match=r"c4-validation-2k\.jsonl.*1500") as e:
        eval_text("c4", tmp_path / "d")
    assert {1000, 2000} <= set(numbers(str(e.value)))  # the documents it needs


def test_wikitext2_has_no_calibration_split():
    with pytest.raises(ConfigError, match="'wikitext2'.*'c4'"):  # the dataset, and one that has the split
        calibration_documents("wikitext2")


def test_ptb_calibrates_on_valid(tmp_path):
    (tmp_path / "ptb-valid.txt").write_text(" a b \n c d \n")
    assert calibration_documents("ptb", tmp_path) == [" a b \n c d \n"]


def test_local_files(tmp_path):
    (tmp_path / "t.txt").write_text("hello\nworld\n")
    (tmp_path / "t.jsonl").write_text('{"text": "a"}\n\n{"text": "b", "id": 2}\n')
    assert eval_text(tmp_path / "t.txt") == "hello\nworld\n"
    assert calibration_documents(str(tmp_path / "t.txt")) == ["hello\nworld\n"]
    assert eval_text(tmp_path / "t.jsonl") == "a\n\nb"
    assert calibration_documents(tmp_path / "t.jsonl") == ["a", "b"]


def test_bad_local_inputs(tmp_path):
    (tmp_path / "bad.jsonl").write_text('{"text": "a"}\n{"body": "b"}\n')
    with pytest.raises(ConfigError, match=r"bad.jsonl:2: .*\"text\""):
        eval_text(tmp_path / "bad.jsonl")
    with pytest.raises(ConfigError, match="'wiki'.*c4"):  # the bad name, then the known ones
        eval_text("wiki")
    with pytest.raises(DataNotFoundError, match="absent.txt"):
        eval_text(tmp_path / "absent.txt")


def test_every_named_dataset_says_where_to_get_it():
    for name, spec in DATASETS.items():
        assert spec.name == name and spec.description and spec.source


# --- tokens ----------------------------------------------------------------------------------


def test_eval_tokens_shape_truncation_and_cache(tmp_path):
    (tmp_path / "wikitext2-test.txt").write_text("héllo world " * 50)
    tok = ByteTokenizer()
    ids = eval_tokens(tok, "wikitext2", data_dir=tmp_path)
    assert ids.dtype == torch.int64 and ids.shape == (1, len(("héllo world " * 50).encode()))
    assert ids[0, :2].tolist() == [ord("h"), 0xC3]

    cached = list((tmp_path / "cache" / "tokens").glob("*.npy"))
    assert len(cached) == 1
    again = ByteTokenizer()
    short = eval_tokens(again, "wikitext2", max_tokens=7, data_dir=tmp_path)
    assert torch.equal(short, ids[:, :7])
    assert all(len(text) < 100 for text in again.calls)  # only the probe, never the text


def test_token_cache_is_keyed_by_tokenizer(tmp_path):
    class Shifted(ByteTokenizer):
        def __call__(self, text):
            return {"input_ids": [i + 1 for i in text.encode("utf-8")]}

    (tmp_path / "wikitext2-test.txt").write_text("abc")
    assert eval_tokens(ByteTokenizer(), "wikitext2", data_dir=tmp_path).tolist() == [[97, 98, 99]]
    assert eval_tokens(Shifted(), "wikitext2", data_dir=tmp_path).tolist() == [[98, 99, 100]]


def test_eval_tokens_rejects_bad_max_tokens(tmp_path):
    (tmp_path / "wikitext2-test.txt").write_text("abc")
    with pytest.raises(ConfigError, match="max_tokens"):
        eval_tokens(ByteTokenizer(), "wikitext2", max_tokens=0, data_dir=tmp_path)


# --- calibration samples ---------------------------------------------------------------------


def write_docs(path: Path, docs: list[str]) -> Path:
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    return path


def contains(haystack: list[int], needle: list[int]) -> bool:
    n = len(needle)
    return any(haystack[i : i + n] == needle for i in range(len(haystack) - n + 1))


def test_samples_shape_and_reproducibility(tmp_path):
    pool = write_docs(tmp_path / "pool.jsonl", [f"doc{i} " * (10 + i) for i in range(20)])
    a = calibration_samples(ByteTokenizer(), pool, n_samples=5, seqlen=16, seed=0)
    b = calibration_samples(ByteTokenizer(), pool, n_samples=5, seqlen=16, seed=0)
    c = calibration_samples(ByteTokenizer(), pool, n_samples=5, seqlen=16, seed=1)
    assert a.shape == (5, 16) and a.dtype == torch.int64
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_enough_long_documents_gives_one_document_per_sample(tmp_path):
    docs = ["a" * 40 + "b" * 40, "c" * 80, "short"]  # 160 tokens in long docs >= 4 * 32
    pool = write_docs(tmp_path / "pool.jsonl", docs)
    samples = calibration_samples(ByteTokenizer(), pool, n_samples=4, seqlen=32, seed=3)
    for s in samples.tolist():
        assert EOS not in s
        assert any(contains(list(d.encode()), s) for d in docs[:2])


def test_too_few_long_documents_draws_from_the_concatenation(tmp_path):
    docs = [f"{i:02d}" * 5 for i in range(30)]  # 10 bytes each, shorter than seqlen
    pool = write_docs(tmp_path / "pool.jsonl", docs)
    stream: list[int] = []
    for d in docs:
        stream += list(d.encode()) + [EOS]
    samples = calibration_samples(ByteTokenizer(), pool, n_samples=8, seqlen=32, seed=0)
    for s in samples.tolist():
        assert s.count(EOS) >= 2 and contains(stream[:-1], s)

    no_eos = calibration_samples(NoEosByteTokenizer(), pool, n_samples=8, seqlen=32, seed=0)
    text = list("\n\n".join(docs).encode())
    assert all(contains(text, s) for s in no_eos.tolist())


def test_calibration_argument_errors(tmp_path):
    pool = write_docs(tmp_path / "pool.jsonl", ["tiny", "docs"])
    with pytest.raises(ConfigError, match="n_samples"):
        calibration_samples(ByteTokenizer(), pool, n_samples=0, seqlen=4)
    with pytest.raises(ConfigError, match="seqlen"):
        calibration_samples(ByteTokenizer(), pool, n_samples=1, seqlen=1)
    with pytest.raises(ConfigError, match="seqlen") as e:
        calibration_samples(ByteTokenizer(), pool, n_samples=1, seqlen=32)
    assert {9, 32} <= set(numbers(str(e.value)))  # the tokens there are, and the seqlen asked for


# --- the real files, when present ------------------------------------------------------------


REAL_DATA_CANDIDATES = (
    os.environ.get("LOWBIT_DATA"),  # read at import, before the hermetic fixture clears it
    Path(__file__).resolve().parents[2] / ".." / "shared" / "data",  # /work/main/../shared/data
)


def real_data_dir() -> Path:
    for candidate in REAL_DATA_CANDIDATES:
        if candidate and (Path(candidate) / "c4-validation-2k.jsonl").is_file():
            return Path(candidate).resolve()
    pytest.skip("real data (/work/shared/data) not present")


def test_real_c4_split():
    data = real_data_dir()
    lines = (data / "c4-validation-2k.jsonl").read_text(encoding="utf-8").splitlines()
    docs = [json.loads(line)["text"] for line in lines]
    calib = calibration_documents("c4", data)
    assert calib == docs[:1000]
    assert eval_text("c4", data) == "\n\n".join(docs[1000:])
    assert set(calib).isdisjoint(docs[1000:])


def test_real_wikitext2_is_the_published_file():
    import hashlib

    text = eval_text("wikitext2", real_data_dir())
    assert hashlib.sha256(text.encode("utf-8")).hexdigest().startswith("696cca6b65a171b0")


def test_real_c4_calibration_samples():
    data = real_data_dir()
    a = calibration_samples(ByteTokenizer(), "c4", n_samples=4, seqlen=512, seed=0, data_dir=data)
    b = calibration_samples(ByteTokenizer(), "c4", n_samples=4, seqlen=512, seed=0, data_dir=data)
    assert a.shape == (4, 512) and torch.equal(a, b)
