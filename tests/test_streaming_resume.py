"""Resuming a streamed job (checkpoint/partial.py, lowbit.streaming): a run killed at any point and
resumed gives the checkpoint an uninterrupted run gives, bit for bit; damaged blocks are redone;
another job's folder is refused; an unfinished folder is refused by every reader."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from stream_helpers import (
    CALIB,
    differing_tensors,
    own_cache,  # noqa: F401 - the module's own lowbit cache
    tiny_folder,
    word_data,
)

from lowbit import streaming
from lowbit.checkpoint import partial as partial_module
from lowbit.checkpoint import verify_checkpoint
from lowbit.cli import main
from lowbit.errors import CheckpointError, ConfigError, ResourceError
from lowbit.marks import PARTIAL_RECORD
from lowbit.recipes import GPTQConfig, Recipe
from lowbit.streaming import quantize_streamed

# act-order: the finished blocks rebuilt on a resume carry each record's column permutation
RECIPE = Recipe(method="gptq", bits=3, group_size=32, calibration=CALIB, gptq=GPTQConfig(act_order=True))


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """The model folder, its data, and the checkpoint of an uninterrupted streamed run."""
    root = tmp_path_factory.mktemp("resume")
    folder = tiny_folder(root / "model", "llama", tie=False, layers=4)
    data = word_data(root / "data")
    whole = quantize_streamed(str(folder), RECIPE, root / "whole", data_dir=str(data), progress=False).path
    return folder, data, whole


class _Stop(Exception):
    pass


def _interrupted(folder, data, out, monkeypatch, after: int) -> None:
    """A run stopped (by an exception) once block `after` is written: a folder with after + 1 blocks."""
    write = partial_module.PartialCheckpoint.write_block

    def stopping(self, i, *args):
        write(self, i, *args)
        if i == after:
            raise _Stop

    with monkeypatch.context() as m:
        m.setattr(partial_module.PartialCheckpoint, "write_block", stopping)
        with pytest.raises(_Stop):
            quantize_streamed(str(folder), RECIPE, out, data_dir=str(data), progress=False)


def _blocks(out: Path) -> int:
    return len(json.loads((out / PARTIAL_RECORD).read_text())["blocks"])


_KILLER = textwrap.dedent("""
    import os, signal, sys
    from lowbit.checkpoint import partial
    kill_at, where = int(sys.argv[1]), sys.argv[2]
    if where == "after":  # right after block kill_at is recorded
        write = partial.PartialCheckpoint.write_block
        def dying(self, i, *a):
            write(self, i, *a)
            if i == kill_at:
                os.kill(os.getpid(), signal.SIGKILL)
        partial.PartialCheckpoint.write_block = dying
    else:  # while block kill_at is being written: its file is on disk under its temporary name
        save = partial.save_file
        def dying(tensors, path, metadata=None):
            save(tensors, path, metadata=metadata)
            if metadata and metadata.get("block") == str(kill_at):
                os.kill(os.getpid(), signal.SIGKILL)
        partial.save_file = dying
    from lowbit.cli import main
    sys.exit(main(sys.argv[3:]))
""")


@pytest.mark.parametrize("where", ["after", "during"])
def test_a_run_killed_with_sigkill_resumes_to_the_uninterrupted_checkpoint(setup, tmp_path, capsys, where):
    folder, data, whole = setup
    out = tmp_path / "out"
    argv = ["quantize", str(folder), "-o", str(out), "--method", "gptq", "--bits", "3", "--group-size", "32",
            "--act-order", "--calib-samples", str(CALIB.n_samples), "--calib-seqlen", str(CALIB.seqlen),
            "--data-dir", str(data), "--stream", "-q"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    killed = subprocess.run([sys.executable, "-c", _KILLER, "1", where, *argv], env=env, capture_output=True, text=True,
                            timeout=600, check=False)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert _blocks(out) == (2 if where == "after" else 1)
    assert not (out / "manifest.json").exists()
    assert main([*argv, "--resume"]) == 0
    assert differing_tensors(whole, out) == []
    assert not (out / PARTIAL_RECORD).exists()
    verify_checkpoint(out)


@pytest.mark.parametrize("damage", ["truncate", "flip"])
def test_a_damaged_block_file_is_redone_with_the_blocks_after_it(setup, tmp_path, monkeypatch, damage):
    folder, data, whole = setup
    out = tmp_path / "out"
    _interrupted(folder, data, out, monkeypatch, after=2)
    f = out / "block-00001.safetensors"
    raw = bytearray(f.read_bytes())
    if damage == "truncate":
        raw = raw[: len(raw) // 2]
    else:
        raw[-1] ^= 0xFF  # the last byte of the last tensor's data: the header still parses
    f.write_bytes(bytes(raw))
    calibrated = []
    calibrate = streaming.calibrate_block
    monkeypatch.setattr(streaming, "calibrate_block", lambda i, *a: (calibrated.append(i), calibrate(i, *a)))
    quantize_streamed(str(folder), RECIPE, out, data_dir=str(data), progress=False, resume=True)
    assert calibrated == [1, 2, 3]
    assert differing_tensors(whole, out) == []


def test_resuming_with_another_recipe_or_model_is_refused(setup, tmp_path, monkeypatch):
    folder, data, _ = setup
    out = tmp_path / "out"
    _interrupted(folder, data, out, monkeypatch, after=1)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    other = Recipe(method="gptq", bits=4, group_size=32, calibration=CALIB)
    with pytest.raises(ConfigError, match="bits"):
        quantize_streamed(str(folder), other, out, data_dir=str(data), progress=False, resume=True)
    other_model = tiny_folder(tmp_path / "other", "llama", tie=False, layers=4)
    with pytest.raises(ConfigError, match="sha256"):
        quantize_streamed(str(_changed_copy(other_model)), RECIPE, out, data_dir=str(data), progress=False,
                          resume=True)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def _changed_copy(folder: Path) -> Path:
    """The same model with one weight changed (another sha256)."""
    from safetensors.torch import load_file, save_file

    tensors = load_file(folder / "model.safetensors")
    tensors["model.norm.weight"] = tensors["model.norm.weight"] * 2
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    return folder


def test_an_unfinished_folder_is_refused_by_eval_info_and_verify_saying_how_to_resume(setup, tmp_path, capsys,
                                                                                     monkeypatch):
    folder, data, _ = setup
    out = tmp_path / "out"
    argv = ["quantize", str(folder), "-o", str(out), "--method", "gptq", "--bits", "3", "--group-size", "32",
            "--act-order", "--calib-samples", str(CALIB.n_samples), "--calib-seqlen", str(CALIB.seqlen),
            "--data-dir", str(data), "--stream", "-q"]
    write = partial_module.PartialCheckpoint.write_block

    def stopping(self, i, *args):
        write(self, i, *args)
        if i == 1:
            raise KeyboardInterrupt

    monkeypatch.setattr(partial_module.PartialCheckpoint, "write_block", stopping)
    assert main(argv) == 130
    monkeypatch.undo()
    capsys.readouterr()
    for command in (["info", str(out)], ["info", "--verify", str(out)], ["eval", str(out), "--data", "c4", "--data-dir", str(data)]):
        assert main(command) == 2
        err = capsys.readouterr().err
        assert "--resume" in err and str(out) in err, command
    with pytest.raises(CheckpointError):
        verify_checkpoint(out)
    assert main(argv) == 2  # the same command without --resume does not start over
    assert _blocks(out) == 2
    assert main([*argv, "--resume"]) == 0
    assert main(["info", str(out)]) == 0


def test_a_disk_that_fills_up_keeps_the_finished_blocks_and_resumes(setup, tmp_path, monkeypatch):
    folder, data, whole = setup
    out = tmp_path / "out"
    save = partial_module.save_file

    def filling(tensors, path, metadata=None):
        if metadata and metadata.get("block") == "2":
            Path(path).write_bytes(b"\0" * 100)  # part of it was written
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        save(tensors, path, metadata=metadata)

    with monkeypatch.context() as m:
        m.setattr(partial_module, "save_file", filling)
        with pytest.raises(ResourceError, match="--resume"):
            quantize_streamed(str(folder), RECIPE, out, data_dir=str(data), progress=False)
    assert sorted(p.name for p in out.iterdir()) == [".lowbit-lock", "block-00000.safetensors",
                                                    "block-00001.safetensors", PARTIAL_RECORD]
    quantize_streamed(str(folder), RECIPE, out, data_dir=str(data), progress=False, resume=True)
    assert differing_tensors(whole, out) == []


def test_a_disk_that_fills_up_while_the_checkpoint_is_joined_leaves_the_unfinished_folder(setup, tmp_path,
                                                                                         monkeypatch):
    from lowbit.checkpoint import write

    folder, data, whole = setup
    out = tmp_path / "out"

    def full(*a, **k):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "quantized.safetensors")

    with monkeypatch.context() as m:
        m.setattr(write, "write_tensors", full)
        with pytest.raises(ResourceError):
            quantize_streamed(str(folder), RECIPE, out, data_dir=str(data), progress=False)
    assert _blocks(out) == 4 and not (out / "manifest.json").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no staging folder left
    calibrated = []
    monkeypatch.setattr(streaming, "calibrate_block", lambda *a: calibrated.append(a[0]))
    quantize_streamed(str(folder), RECIPE, out, data_dir=str(data), progress=False, resume=True)
    assert calibrated == [] and differing_tensors(whole, out) == []


def test_a_folder_another_process_is_writing_is_neither_resumed_nor_started_over(setup, tmp_path, monkeypatch):
    """While a run holds the folder's lock, a second --resume or --force run changes nothing."""
    from lowbit.checkpoint.partial import folder_lock

    folder, data, _ = setup
    out = tmp_path / "out"
    _interrupted(folder, data, out, monkeypatch, after=1)
    (out / ".block-00002.safetensors.tmp-1").write_bytes(b"being written")
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with folder_lock(out):
        for kw in ({"resume": True}, {"force": True}):
            with pytest.raises(ConfigError, match="another lowbit process"):
                quantize_streamed(str(folder), RECIPE, out, data_dir=str(data), progress=False, **kw)
            assert {p.name: p.read_bytes() for p in out.iterdir()} == before


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a small tmpfs needs root")
def test_a_really_full_disk_keeps_the_finished_blocks_and_resumes_once_there_is_room(setup, tmp_path):
    """-o on a 64 KiB tmpfs (room for about two blocks): the job stops with a ResourceError, no
    temporary file is left, and once the file system is enlarged the same job resumes to the
    uninterrupted checkpoint."""
    folder, data, whole = setup
    mnt = tmp_path / "small"
    mnt.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mnt)], capture_output=True,
                             check=False)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        out = mnt / "out"
        with pytest.raises(ResourceError, match="--resume"):
            quantize_streamed(str(folder), RECIPE, out, data_dir=str(data), progress=False)
        assert _blocks(out) < 4 and not (out / "manifest.json").exists()
        assert [p.name for p in out.iterdir() if ".tmp" in p.name] == []
        subprocess.run(["mount", "-o", "remount,size=4m", str(mnt)], check=True)
        quantize_streamed(str(folder), RECIPE, out, data_dir=str(data), progress=False, resume=True)
        assert differing_tensors(whole, out) == []
    finally:
        subprocess.run(["umount", str(mnt)], check=False)
