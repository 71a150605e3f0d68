"""CLI error paths: every bad input is a clear one-line error and exit code 2, before any work."""

import pytest

from lowbit.cli import main


def run(capsys, *argv):
    code = main(list(argv))
    return code, capsys.readouterr().err


def test_unknown_model_lists_known_names(capsys, tmp_path):
    code, err = run(capsys, "quantize", "no-such-model", "-o", str(tmp_path / "o"), "--method", "rtn",
                    "--cache", str(tmp_path))
    assert code == 2 and "smollm2-135m" in err and "error" in err


def test_bad_bits_is_rejected_before_loading(capsys, tmp_path):
    code, err = run(capsys, "quantize", "no-such-model", "-o", str(tmp_path / "o"), "--bits", "9")
    assert code == 2 and "'bits'" in err and "2 to 8" in err


def test_missing_calibration_data_names_the_file_and_the_fix(capsys, tmp_path):
    code, err = run(capsys, "quantize", "smollm2-135m", "-o", str(tmp_path / "o"), "--method", "gptq",
                    "--data-dir", str(tmp_path))
    assert code == 2 and "c4-validation-2k.jsonl" in err and "--data-dir" in err


def test_missing_eval_data(capsys, tmp_path):
    code, err = run(capsys, "eval", "smollm2-135m", "--data", "ptb", "--data-dir", str(tmp_path))
    assert code == 2 and "ptb-test.txt" in err


def test_datasets_may_be_separated_by_commas(capsys, tmp_path):
    code, err = run(capsys, "eval", "smollm2-135m", "--data", "wikitext2,ptb", "--data-dir", str(tmp_path))
    assert code == 2 and "wikitext2" in err and "unknown dataset" not in err  # split, then found missing


def test_existing_output_needs_force(capsys, tmp_path):
    (tmp_path / "o").mkdir()
    code, err = run(capsys, "quantize", "smollm2-135m", "-o", str(tmp_path / "o"), "--method", "rtn")
    assert code == 2 and "--force" in err


def test_info_on_a_non_checkpoint(capsys, tmp_path):
    code, err = run(capsys, "info", str(tmp_path))
    assert code == 2 and "not a lowbit checkpoint" in err


def test_recipe_file_errors_name_the_field(capsys, tmp_path):
    bad = tmp_path / "r.toml"
    bad.write_text('method = "gptq"\n[gptq]\ndamp = "lots"\n')
    code, err = run(capsys, "quantize", "smollm2-135m", "-o", str(tmp_path / "o"), "--recipe", str(bad))
    assert code == 2 and "gptq.damp" in err


def test_models_lists_every_known_model(capsys, tmp_path):
    assert main(["models", "--cache", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    for name in ("smollm2-135m", "qwen2.5-coder-0.5b", "qwen2.5-coder-1.5b", "gemma3-270m"):
        assert name in out


def test_evaluating_on_the_calibration_file_is_refused(tmp_path):
    from lowbit.errors import ConfigError
    from lowbit.evaluation import check_no_overlap

    f = tmp_path / "mine.txt"
    f.write_text("x")
    check_no_overlap("c4", ["c4", "wikitext2"])  # named sets are split by construction
    check_no_overlap(str(f), ["wikitext2"])
    with pytest.raises(ConfigError, match="calibration set"):
        check_no_overlap(str(f), [str(f)])


def test_fractional_bits_need_slim(capsys, tmp_path):
    code, err = run(capsys, "quantize", "no-such-model", "-o", str(tmp_path / "o"), "--method", "gptq", "--bits", "2.5")
    assert code == 2 and "'bits'" in err and "slim" in err


def test_recipe_flags_map_to_the_recipe():
    from lowbit.cli import _recipe_from_args, build_parser

    args = build_parser().parse_args(["quantize", "m", "-o", "x", "--method", "slim", "--bits", "2.5",
                                      "--integer-scale", "--group-size", "64"])
    r = _recipe_from_args(args)
    assert (r.method, r.bits, r.group_size, r.integer_scale.enabled, r.integer_scale.bits) == ("slim", 2.5, 64, True, 8)
    args = build_parser().parse_args(["quantize", "m", "-o", "x", "--method", "awq-gptq", "--integer-scale", "6"])
    r = _recipe_from_args(args)
    assert r.method == "awq-gptq" and r.integer_scale.bits == 6 and r.bits == 4


def test_budget_flags_map_to_the_recipe():
    from lowbit.cli import _recipe_from_args, build_parser

    args = build_parser().parse_args(["quantize", "m", "-o", "x", "--target-size", "80MB", "--levels", "w2g64,w4g64",
                                      "--search-generations", "3"])
    b = _recipe_from_args(args).budget
    assert (b.target_bytes, b.target_bpw, b.levels, b.generations) == (80_000_000, None, ("w2g64", "w4g64"), 3)
    args = build_parser().parse_args(["quantize", "m", "-o", "x", "--recipe", "budget-3bpw", "--target-bpw", "2.75"])
    assert _recipe_from_args(args).budget.target_bpw == 2.75
    assert _recipe_from_args(build_parser().parse_args(["quantize", "m", "-o", "x", "--target-size", "1.5GiB"])
                             ).budget.target_bytes == int(1.5 * 2**30)


def test_bad_size_is_a_usage_error(capsys):
    with pytest.raises(SystemExit):
        main(["quantize", "m", "-o", "x", "--target-size", "lots"])
    assert "300MB" in capsys.readouterr().err


def test_bad_kv_name_fails_before_loading(capsys, tmp_path):
    code, err = run(capsys, "eval", "no-such-model", "--kv", "int5", "--data-dir", str(tmp_path))
    assert code == 2 and "--kv 'int5'" in err


def test_kv_policy_errors_fail_before_loading(capsys, tmp_path):
    code, err = run(capsys, "eval", "no-such-model", "--kv-policy", "h2o", "--data-dir", str(tmp_path))
    assert code == 2 and "needs --kv-budget" in err
    code, err = run(capsys, "generate", "no-such-model", "--prompt", "x", "--kv", "kivi2", "--kv-policy", "snapkv",
                    "--kv-budget", "0.2")
    assert code == 2 and "together" in err
    code, err = run(capsys, "generate", "no-such-model", "--prompt", "x", "--kv-policy", "snapkv", "--kv-budget", "1.5")
    assert code == 2 and "--kv-budget" in err
    code, err = run(capsys, "generate", "no-such-model")
    assert code == 2 and "--prompt" in err


def test_bench_kv_rejects_bad_cache_names_before_loading(capsys, tmp_path):
    code, err = run(capsys, "bench", "kv", "no-such-model", "--caches", "full,kivi9", "--work-dir", str(tmp_path))
    assert code == 2 and "kivi9" in err
    code, err = run(capsys, "bench", "kv", "no-such-model", "--caches", ",", "--work-dir", str(tmp_path))
    assert code == 2 and "--caches is empty" in err


def test_kernels_says_when_the_reference_is_used(capsys, monkeypatch):
    from lowbit import kernels

    monkeypatch.setenv(kernels.DISABLE_ENV, "1")
    assert main(["kernels"]) == 1
    out = capsys.readouterr().out
    assert "kv_attention: unavailable" in out and "LOWBIT_NO_KERNELS" in out


def test_budget_flags_shape_a_budget_from_a_recipe():
    from lowbit.cli import _recipe_from_args, build_parser

    args = build_parser().parse_args(["quantize", "m", "-o", "x", "--recipe", "budget-3bpw", "--levels", "w2g64,w4g64",
                                      "--search-generations", "0"])
    b = _recipe_from_args(args).budget
    assert (b.target_bpw, b.levels, b.generations) == (3.0, ("w2g64", "w4g64"), 0)


def test_usage_errors_are_one_line(capsys):
    with pytest.raises(SystemExit) as e:
        main(["generate", "m", "--max-new-tokens", "0"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith("lowbit: error:") and len(err.strip().splitlines()) == 1
