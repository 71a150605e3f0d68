"""Never destroy what lowbit did not write: where `quantize -o` may write, what --force may
replace, and how a checkpoint is put in place (lowbit/outputs.py, checkpoint.save_checkpoint)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from hostile_cli import assert_clean_error, run_cli, tree
from rendered import markdown_table, number

from lowbit import outputs
from lowbit.checkpoint import MANIFEST, Manifest, read_manifest, verify_files
from lowbit.errors import CheckpointError, ConfigError
from lowbit.loading import load_checkpoint

RTN = ("--method", "rtn", "--bits", "4", "--group-size", "32", "-q")


def quantize(capsys, model, out, *extra):
    return run_cli(capsys, "quantize", model, "-o", out, *RTN, *extra)


def dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def hidden(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if ".lowbit-" in p.name)


# ---------------------------------------------------------------- what --force may replace
def test_force_never_empties_the_current_directory(env, capsys):
    before = tree(env)
    rc, _, err = quantize(capsys, "tiny", ".", "--force")
    assert_clean_error(rc, err)
    assert tree(env) == before


def test_force_never_replaces_a_parent_of_the_current_directory(env, capsys, monkeypatch):
    (env / "sub").mkdir()
    monkeypatch.chdir(env / "sub")
    before = tree(env)
    for out in ("..", str(env), "../sub/.."):
        rc, _, err = quantize(capsys, "../tiny", out, "--force")
        line = assert_clean_error(rc, err)
        assert str(env) in line
        assert tree(env) == before


def test_force_never_replaces_an_unrelated_folder(env, capsys):
    (env / "photos").mkdir()
    (env / "photos" / "cat.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    before = tree(env)
    rc, _, err = quantize(capsys, "tiny", "photos", "--force")
    assert "photos" in assert_clean_error(rc, err)
    assert tree(env) == before


def test_force_never_replaces_the_input_model(env, capsys):
    # make the input look like lowbit's, so only the input rule stands between it and --force
    cfg = json.loads((env / "tiny" / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "lowbit", "format_version": 2}
    (env / "tiny" / "config.json").write_text(json.dumps(cfg))
    (env / "link").symlink_to(env / "tiny")
    before = tree(env)
    for model, out in (("tiny", "tiny"), ("tiny", "link"), ("link", "tiny"), (str(env / "tiny"), "./tiny/")):
        rc, _, err = quantize(capsys, model, out, "--force")
        assert "tiny" in assert_clean_error(rc, err)
        assert tree(env) == before


def test_input_checkpoint_is_protected_in_the_library_too(checkpoint):
    with pytest.raises(ConfigError):
        outputs.check_output(checkpoint, force=True, inputs=[checkpoint])
    with pytest.raises(ConfigError):  # the input inside the output
        outputs.check_output(checkpoint, force=True, inputs=[checkpoint / "config.json"])
    assert outputs.check_output(checkpoint, force=True, inputs=[]) == checkpoint.resolve()


def test_force_never_replaces_home_or_root(env, monkeypatch):
    home = env / "home"
    home.mkdir()
    (home / "manifest.json").write_text(json.dumps({"format": "lowbit-checkpoint"}))  # looks like ours
    monkeypatch.setenv("HOME", str(home))
    with pytest.raises(ConfigError, match=re.escape(str(home))):
        outputs.check_output(home, force=True)
    with pytest.raises(ConfigError):
        outputs.check_output("/", force=True)


def test_force_replaces_an_earlier_checkpoint_atomically(env, capsys, checkpoint):
    old = Manifest.read(checkpoint)
    assert old.recipe["bits"] == 4
    rc, _, err = run_cli(capsys, "quantize", "tiny", "-o", "ckpt", "--method", "rtn", "--bits", "3",
                         "--group-size", "32", "-q", "--force")
    assert rc == 0, err
    new = Manifest.read(checkpoint)
    assert new.recipe["bits"] == 3
    verify_files(checkpoint, new)
    assert hidden(env) == []  # neither the staging folder nor the old checkpoint is left


def test_force_replaces_a_damaged_checkpoint_but_not_a_lookalike(env, capsys, checkpoint):
    (checkpoint / MANIFEST).unlink()  # damaged: quantized.safetensors and config.json still say lowbit
    rc, _, err = quantize(capsys, "tiny", "ckpt", "--force")
    assert rc == 0, err
    (env / "other").mkdir()
    (env / "other" / "manifest.json").write_text(json.dumps({"format": "something-else"}))
    before = tree(env)
    rc, _, err = quantize(capsys, "tiny", "other", "--force")
    assert_clean_error(rc, err)
    assert tree(env) == before


# ---------------------------------------------------------------- checks before any work
def test_output_that_is_a_file_is_refused(env, capsys):
    (env / "notes.txt").write_text("mine")
    (env / "sub").mkdir()
    before = tree(env)
    for out, force in (("notes.txt", ()), ("notes.txt", ("--force",)), ("notes.txt/ck", ()),
                       ("sub/../notes.txt/deeper/ck", ())):
        rc, _, err = quantize(capsys, "tiny", out, *force)
        assert "notes.txt" in assert_clean_error(rc, err)
        assert tree(env) == before


def test_existing_output_without_force_is_refused_before_loading(env, capsys, checkpoint, monkeypatch):
    import lowbit.models

    monkeypatch.setattr(lowbit.models, "load_model", lambda *a, **k: pytest.fail("loaded the model"))
    before = tree(env)
    rc, _, err = quantize(capsys, "tiny", "ckpt")
    assert "--force" in assert_clean_error(rc, err)
    assert tree(env) == before


def test_unwritable_parent_is_refused_before_loading(env, capsys, monkeypatch):
    locked = env / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        os.mkdir(locked / "probe")
        os.rmdir(locked / "probe")
        root_writes = True
    except PermissionError:
        root_writes = False
    if root_writes:  # root ignores the mode: make mkdir under `locked` fail as it would for a user
        real_mkdir = os.mkdir

        def mkdir(path, *args, **kwargs):
            if Path(path).resolve().is_relative_to(locked):
                raise PermissionError(13, "Permission denied", str(path))
            return real_mkdir(path, *args, **kwargs)

        monkeypatch.setattr(os, "mkdir", mkdir)
    before = tree(env)
    try:
        for out in ("locked/ck", "locked/a/b/ck"):
            rc, _, err = quantize(capsys, "tiny", out)
            assert "locked" in assert_clean_error(rc, err)
            assert tree(env) == before
    finally:
        locked.chmod(0o755)


def test_missing_parents_are_created_only_when_saving(env, capsys):
    rc, _, err = quantize(capsys, "tiny", "a/b/ck")
    assert rc == 0, err
    read_manifest(env / "a" / "b" / "ck")


@pytest.mark.parametrize("flags", [("--max-tokens", "0"), ("--max-tokens", "-5"),
                                   ("--max-tokens", "100", "--seqlen", "200"), ("--seqlen", "1")])
def test_eval_flags_that_cannot_work_are_refused_before_loading(env, capsys, monkeypatch, flags):
    import lowbit.models

    monkeypatch.setattr(lowbit.models, "load_model", lambda *a, **k: pytest.fail("loaded the model"))
    before = tree(env)
    rc, _, err = quantize(capsys, "tiny", "ck", "--eval", "text.txt", *flags)
    assert_clean_error(rc, err)
    assert tree(env) == before


def test_eval_shorter_than_the_default_window_is_refused_before_quantizing(env, capsys, monkeypatch):
    import lowbit.pipeline

    monkeypatch.setattr(lowbit.pipeline, "quantize", lambda *a, **k: pytest.fail("quantized"))
    before = {k: v for k, v in tree(env).items() if not k.startswith("cache")}
    # the tiny model's context is 256, so the default window is 256 tokens
    rc, _, err = quantize(capsys, "tiny", "ck", "--eval", "text.txt", "--max-tokens", "100")
    assert "--max-tokens" in assert_clean_error(rc, err)
    assert {k: v for k, v in tree(env).items() if not k.startswith("cache")} == before


def test_head_bits_on_a_tied_model_is_refused_before_quantizing(env, capsys, monkeypatch):
    import lowbit.pipeline

    monkeypatch.setattr(lowbit.pipeline, "quantize", lambda *a, **k: pytest.fail("quantized"))
    before = {k: v for k, v in tree(env).items() if not k.startswith("cache")}
    rc, _, err = quantize(capsys, "tiny-tied", "ck", "--head-bits", "8")
    assert_clean_error(rc, err)
    assert {k: v for k, v in tree(env).items() if not k.startswith("cache")} == before


# ---------------------------------------------------------------- save first, then evaluate
def test_a_failing_evaluation_keeps_the_saved_checkpoint(env, capsys, monkeypatch):
    import lowbit.eval.evaluate

    def broken(*a, **k):
        raise ConfigError("the evaluation broke")

    monkeypatch.setattr(lowbit.eval.evaluate, "evaluate", broken)
    rc, _, err = quantize(capsys, "tiny", "ck", "--eval", "text.txt", "--max-tokens", "512")
    assert str(env / "ck") in assert_clean_error(rc, err)
    manifest = Manifest.read(env / "ck")
    assert manifest.evaluation == []
    verify_files(env / "ck", manifest)
    load_checkpoint(env / "ck")


def test_evaluation_is_recorded_after_saving_without_changing_hashed_files(env, capsys):
    rc, _, err = quantize(capsys, "tiny", "ck", "--eval", "text.txt", "--max-tokens", "512")
    assert rc == 0, err
    manifest = Manifest.read(env / "ck")
    assert manifest.evaluation[0]["model"] == "reference"
    assert manifest.evaluation[1]["datasets"]
    verify_files(env / "ck", manifest)
    report = (env / "ck" / "REPORT.md").read_text()
    evaluated = [(e["model"], d) for e in manifest.evaluation for d in e["datasets"].values()]
    table = markdown_table(report, "model")  # one row per (model, dataset), the manifest's numbers
    assert [(r["model"], r["dataset"]) for r in table] == [(m, d["dataset"]) for m, d in evaluated]
    for row, (_, d) in zip(table, evaluated, strict=True):
        assert number(row["ppl"]) == pytest.approx(d["ppl"], abs=5e-4)
        assert number(row["tokens"]) == d["n_tokens_scored"]
    assert hidden(env / "ck") == [] and hidden(env) == []


# ---------------------------------------------------------------- two jobs, one -o
def _staged(parent: Path, name: str, note: str) -> Path:
    s = outputs.make_staging(parent / name)
    (s / "manifest.json").write_text(json.dumps({"format": "lowbit-checkpoint", "note": note}))
    return s


def test_publish_never_replaces_a_destination_that_appeared(tmp_path):
    first, second = _staged(tmp_path, "ck", "first"), _staged(tmp_path, "ck", "second")
    outputs.publish(first, tmp_path / "ck")
    with pytest.raises(CheckpointError) as refused:
        outputs.publish(second, tmp_path / "ck")
    assert json.loads((tmp_path / "ck" / "manifest.json").read_text())["note"] == "first"
    kept = [p for p in tmp_path.iterdir() if p.name.startswith("ck.lowbit-")]
    assert len(kept) == 1 and json.loads((kept[0] / "manifest.json").read_text())["note"] == "second"
    assert str(kept[0]) in str(refused.value)  # says where the work was kept
    assert not (kept[0] / outputs.STAGING_MARKER).exists()


def test_publish_without_renameat2_is_still_no_replace(tmp_path, monkeypatch):
    monkeypatch.setattr(outputs, "_renameat2", lambda *a: False)
    (tmp_path / "ck").mkdir()
    (tmp_path / "ck" / "theirs").write_text("x")
    s = _staged(tmp_path, "ck", "mine")
    with pytest.raises(CheckpointError):
        outputs.publish(s, tmp_path / "ck")
    assert sorted(p.name for p in (tmp_path / "ck").iterdir()) == ["theirs"]


def test_an_output_created_during_the_work_is_left_alone(env, capsys, monkeypatch):
    import lowbit.pipeline

    real = lowbit.pipeline.quantize

    def racing(*a, **k):  # another job (or a person) makes the folder while we quantize
        (env / "ck").mkdir()
        (env / "ck" / "theirs.txt").write_text("not yours")
        return real(*a, **k)

    monkeypatch.setattr(lowbit.pipeline, "quantize", racing)
    rc, _, err = quantize(capsys, "tiny", "ck")
    assert assert_clean_error(rc, err)
    assert sorted(p.name for p in (env / "ck").iterdir()) == ["theirs.txt"]
    kept = [p for p in env.iterdir() if p.name.startswith("ck.lowbit-")]
    assert len(kept) == 1 and str(kept[0]) in err  # the work is kept, and the message says where
    verify_files(kept[0], Manifest.read(kept[0]))


def test_replace_keeps_something_in_place_when_the_swap_fails(tmp_path, monkeypatch):
    old = tmp_path / "ck"
    old.mkdir()
    (old / "manifest.json").write_text(json.dumps({"format": "lowbit-checkpoint", "note": "old"}))
    new = _staged(tmp_path, "ck", "new")
    monkeypatch.setattr(outputs, "_renameat2", lambda *a: False)  # the fallback: two renames

    def fail(*a):
        raise OSError(5, "I/O error")

    monkeypatch.setattr(outputs, "rename_noreplace", fail)
    with pytest.raises(OSError):
        outputs.replace_atomically(new, old)
    assert json.loads((old / "manifest.json").read_text())["note"] == "old"
    outputs.remove_tree(new)  # what save_checkpoint does with its staging folder on failure
    monkeypatch.undo()
    for exchange in (True, False):
        if not exchange:
            monkeypatch.setattr(outputs, "_renameat2", lambda *a: False)
        new = _staged(tmp_path, "ck", f"new-{exchange}")
        outputs.replace_atomically(new, old)
        assert json.loads((old / "manifest.json").read_text())["note"] == f"new-{exchange}"
        assert hidden(tmp_path) == []


# ---------------------------------------------------------------- leftovers of killed runs
def test_stale_staging_of_a_dead_run_is_cleaned_and_a_live_one_kept(env, capsys):
    dead = dead_pid()
    stale = env / f".ck.lowbit-staging-{dead}-0badc0de"
    stale.mkdir()
    (stale / outputs.STAGING_MARKER).write_text(json.dumps({"pid": dead, "host": os.uname().nodename}))
    (stale / "quantized.safetensors").write_bytes(b"\0" * 1000)
    live = env / f".ck.lowbit-staging-{os.getpid()}-0badc0de"
    live.mkdir()
    (live / outputs.STAGING_MARKER).write_text("{}")
    foreign = env / f".ck.lowbit-staging-{dead}-feedbeef"  # our name pattern, but not lowbit's content
    foreign.mkdir()
    (foreign / "diary.txt").write_text("dear diary")
    rc, _, err = quantize(capsys, "tiny", "ck")
    assert rc == 0, err
    assert not stale.exists()
    assert live.is_dir() and foreign.is_dir() and (foreign / "diary.txt").read_text() == "dear diary"


def test_an_interrupted_replace_is_undone_by_the_next_run(tmp_path):
    aside = tmp_path / f".ck.lowbit-replaced-{dead_pid()}-12345678"
    aside.mkdir()
    (aside / "manifest.json").write_text(json.dumps({"format": "lowbit-checkpoint", "note": "old"}))
    outputs.clean_stale(tmp_path)
    assert json.loads((tmp_path / "ck" / "manifest.json").read_text())["note"] == "old"
    assert hidden(tmp_path) == []


def test_a_failed_save_leaves_nothing(env, capsys, monkeypatch):
    import lowbit.checkpoint.write

    def disk_full(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(lowbit.checkpoint.write, "write_tensors", disk_full)
    before = {k: v for k, v in tree(env).items() if not k.startswith("cache")}
    try:
        rc = quantize(capsys, "tiny", "ck")[0]
    except OSError:  # main() may let an unexpected error through or report it
        rc = None
    assert rc != 0
    assert {k: v for k, v in tree(env).items() if not k.startswith("cache")} == before


# ---------------------------------------------------------------- what is written
@pytest.mark.parametrize("mask", [0o022, 0o027, 0o002])
def test_checkpoint_modes_follow_the_umask(env, capsys, mask):
    old = os.umask(mask)
    try:
        rc, _, err = quantize(capsys, "tiny", "ck")
    finally:
        os.umask(old)
    assert rc == 0, err
    ck = env / "ck"
    assert ck.stat().st_mode & 0o777 == 0o777 & ~mask
    for f in ck.iterdir():
        assert f.stat().st_mode & 0o777 == 0o666 & ~mask, f.name


def test_manifest_lists_every_file_and_transformers_refuses_the_folder(checkpoint):
    from transformers import AutoModelForCausalLM

    manifest = read_manifest(checkpoint)
    assert manifest["format_version"] == 2
    on_disk = {p.name for p in checkpoint.iterdir()} - {MANIFEST, "REPORT.md"}
    assert set(manifest["files"]) == on_disk
    assert all("/" not in name and ".." not in name for name in manifest["files"])
    assert {"config.json", "tokenizer.json", "quantized.safetensors"} <= on_disk
    config = json.loads((checkpoint / "config.json").read_text())
    assert config["quantization_config"] == {"quant_method": "lowbit", "format_version": 2}
    assert manifest["stats"]["disk_bytes"] == sum(m["bytes"] for m in manifest["files"].values())
    assert "on disk" in (checkpoint / "REPORT.md").read_text()
    with pytest.raises(Exception):  # noqa: B017 - any refusal will do; loading random weights will not
        AutoModelForCausalLM.from_pretrained(checkpoint)
