"""Memory is checked, not only estimated: the room under a cgroup limit is read from the system's
files, and a job that would not fit is refused before it starts."""

from pathlib import Path

import pytest

from lowbit import memory
from lowbit.errors import ResourceError


def _v1(tmp_path: Path, limit: int, used: int, parent_limit: int | None = None) -> tuple[Path, Path]:
    root = tmp_path / "cgroup"
    leaf = root / "memory" / "jobs" / "one"
    leaf.mkdir(parents=True)
    (leaf / "memory.limit_in_bytes").write_text(f"{limit}\n")
    (leaf / "memory.usage_in_bytes").write_text(f"{used}\n")
    if parent_limit is not None:
        (leaf.parent / "memory.limit_in_bytes").write_text(f"{parent_limit}\n")
        (leaf.parent / "memory.usage_in_bytes").write_text(f"{used}\n")
    self_cgroup = tmp_path / "self-cgroup"
    self_cgroup.write_text("5:devices:/\n4:memory:/jobs/one\n0::/\n")
    return root, self_cgroup


def test_v1_limit_is_read_and_the_tightest_ancestor_wins(tmp_path):
    root, me = _v1(tmp_path, limit=600 << 20, used=100 << 20)
    assert memory.cgroup_room_bytes(root, me) == 500 << 20
    root2, me2 = _v1(tmp_path / "b", limit=600 << 20, used=100 << 20, parent_limit=300 << 20)
    assert memory.cgroup_room_bytes(root2, me2) == 200 << 20


def test_v1_unlimited_and_v2_max_mean_no_limit(tmp_path):
    root, me = _v1(tmp_path, limit=9223372036854771712, used=100 << 20)
    assert memory.cgroup_room_bytes(root, me) is None
    v2 = tmp_path / "v2"
    (v2 / "user.slice").mkdir(parents=True)
    (v2 / "cgroup.controllers").write_text("memory\n")
    (v2 / "user.slice" / "memory.max").write_text("max\n")
    (v2 / "user.slice" / "memory.current").write_text("1000\n")
    me2 = tmp_path / "self2"
    me2.write_text("0::/user.slice\n")
    assert memory.cgroup_room_bytes(v2, me2) is None
    (v2 / "user.slice" / "memory.max").write_text(f"{1 << 30}\n")
    assert memory.cgroup_room_bytes(v2, me2) == (1 << 30) - 1000


def test_available_is_the_smaller_of_meminfo_and_the_cgroup_room(tmp_path):
    root, me = _v1(tmp_path, limit=600 << 20, used=100 << 20)
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal: 24000000 kB\nMemAvailable: 20000000 kB\n")
    assert memory.available_bytes(meminfo, root, me) == 500 << 20
    meminfo.write_text("MemAvailable: 1000 kB\n")
    assert memory.available_bytes(meminfo, root, me) == 1000 * 1024


def test_check_fits_refuses_what_does_not_fit_and_names_the_options():
    now = memory.rss_bytes()
    memory.check_fits(now + (10 << 20), "a job", ["fewer samples"], available=100 << 20)
    with pytest.raises(ResourceError, match="fewer samples"):
        memory.check_fits(now + (200 << 20), "a job", ["fewer samples"], available=100 << 20)


def test_quantize_is_refused_before_any_work_when_the_estimate_does_not_fit(env, capsys, monkeypatch):
    """As in a 600 MB container: the job stops with one line naming options, nothing written."""
    from hostile_cli import assert_clean_error, run_cli, tree

    from lowbit import blockwise, pipeline

    # a tiny model's whole job fits in the noise of this process's size, so the estimate is made
    # large: what is tested is that the CLI checks it before any work, and what it does then
    monkeypatch.setattr(pipeline, "peak_bytes", lambda *a, **k: float(memory.rss_bytes() + (64 << 30)))
    monkeypatch.setattr(memory, "available_bytes", lambda *a, **k: 1 << 30)
    worked = []
    monkeypatch.setattr(blockwise, "run_sequential", lambda *a, **k: worked.append(1))
    before = tree(env)
    rc, _, err = run_cli(capsys, "quantize", "tiny", "-o", "out", "--method", "gptq", "--group-size", "32",
                         "--calib-data", "text.txt",
                         "--calib-samples", "4", "--calib-seqlen", "64", "-q")
    line = assert_clean_error(rc, err)
    assert "--calib-samples" in line and not worked
    assert {k: v for k, v in tree(env).items() if not k.startswith("cache")} == \
        {k: v for k, v in before.items() if not k.startswith("cache")}


def test_the_estimate_grows_with_what_the_job_holds(env):
    """More calibration tokens, a budget and an evaluation each raise the estimated peak."""
    from transformers import AutoModelForCausalLM

    from lowbit.pipeline import estimate
    from lowbit.recipes import BudgetConfig, CalibrationConfig, Recipe

    model = AutoModelForCausalLM.from_pretrained(env / "tiny")

    def peak(recipe, **kw):
        return estimate(model, recipe, **{"baseline_bytes": 0, **kw})["peak_bytes"]

    small = Recipe(method="gptq", group_size=32, calibration=CalibrationConfig(n_samples=8, seqlen=64))
    large = Recipe(method="gptq", group_size=32, calibration=CalibrationConfig(n_samples=64, seqlen=256))
    assert peak(large) > peak(small)
    budget = Recipe(method="gptq", group_size=32, calibration=large.calibration, budget=BudgetConfig(target_bpw=3.0))
    assert peak(budget) > peak(large)
    assert peak(small, eval_seqlen=1024) > peak(small)
    assert peak(small, baseline_bytes=1e9) == pytest.approx(peak(small) + 1e9)


def test_a_job_that_does_not_fit_names_stream_and_streamed_it_runs(env, capsys, monkeypatch):
    """Where the in-memory job's estimate is over the memory left and the streamed one's is not,
    the refusal names --stream (and bf16 calibration forwards), and the same command with --stream
    runs under the same limit."""
    from hostile_cli import assert_clean_error, run_cli

    from lowbit import pipeline

    def peak(model, recipe, block_params, est, baseline=None, eval_seqlen=None, stream=False):
        return float(memory.rss_bytes() + ((1 << 20) if stream else (64 << 30)))

    monkeypatch.setattr(pipeline, "peak_bytes", peak)
    monkeypatch.setattr(memory, "available_bytes", lambda *a, **k: 1 << 30)
    argv = ["quantize", "tiny", "-o", "out", "--method", "gptq", "--group-size", "32", "--calib-data", "text.txt",
            "--calib-samples", "4", "--calib-seqlen", "64", "-q"]
    line = assert_clean_error(*run_cli(capsys, *argv)[::2])
    assert "--stream" in line and "--calib-dtype bfloat16" in line
    assert not (env / "out").exists()
    rc, _, err = run_cli(capsys, *argv, "--stream")
    assert rc == 0, err
    assert (env / "out" / "manifest.json").is_file()
