"""Bad user input and flags (issue 22, classes 4 and 5): every one is refused with exit code 2 and
one `lowbit: error:` line naming the problem, no traceback, nothing written or deleted; flags a
command would ignore are refused, not recorded as if used; -q silences the libraries' bars."""

import errno
import json
import re

import pytest
import torch
from hostile_cli import assert_clean_error, run_cli, tree
from rendered import numbers, warnings_logged

from lowbit.cli import models as cli_models
from lowbit.errors import ConfigError, ResourceError
from lowbit.recipes import Recipe

GARBAGE = b"\xff\xfe\x00\x81" + bytes(range(256)) * 16


def _files(env):
    (env / "binary.txt").write_bytes(GARBAGE)
    (env / "latin1.txt").write_bytes("caf\xe9 w1 w2".encode("latin-1"))  # no NUL, not UTF-8
    (env / "binary.jsonl").write_bytes(b'{"text": "w1"}\n' + GARBAGE)
    (env / "empty.txt").write_text("  \n")
    (env / "bad.toml").write_text("method = [unclosed\n")
    (env / "bad.yaml").write_text("method: [unclosed\n  bits: {\n")
    (env / "list.yaml").write_text("- method: rtn\n- bits: 4\n")
    (env / "list.toml").write_text("x = 1\n")  # a mapping, but not of recipe fields
    (env / "binary.toml").write_bytes(GARBAGE)
    (env / "python-tag.yaml").write_text('method: !!python/object/apply:os.system ["touch pwned"]\n')
    (env / "python-name.yaml").write_text("method: !!python/name:os.system\n")


def _refused(capsys, env, *argv, quiet=True):
    """Run argv, assert a clean refusal that changed nothing (lowbit's cache aside: loading a model
    may stamp its hashes there); returns the error line."""
    before = {k: v for k, v in tree(env).items() if not k.startswith("cache")}
    rc, _, err = run_cli(capsys, *argv, *(["-q"] if quiet else []))
    line = assert_clean_error(rc, err)
    assert {k: v for k, v in tree(env).items() if not k.startswith("cache")} == before
    return line


RTN = ["quantize", "tiny", "-o", "out", "--method", "rtn", "--group-size", "32"]
GEN = ["generate", "tiny", "--prompt", "w1 w2"]

BAD_INPUTS = {
    "eval: binary --data": (["eval", "tiny", "--data", "binary.txt", "--reference", "none"], "binary.txt"),
    "eval: latin-1 --data": (["eval", "tiny", "--data", "latin1.txt", "--reference", "none"], "latin1.txt"),
    "eval: binary jsonl --data": (["eval", "tiny", "--data", "binary.jsonl", "--reference", "none"], "binary.jsonl"),
    "eval: empty --data": (["eval", "tiny", "--data", "empty.txt", "--reference", "none"], "empty.txt"),
    "quantize: binary --calib-data": (["quantize", "tiny", "-o", "out", "--calib-data", "binary.txt"], "binary.txt"),
    "quantize: latin-1 --calib-data": (["quantize", "tiny", "-o", "out", "--calib-data", "latin1.txt"], "latin1.txt"),
    "quantize: binary --eval": ([*RTN, "--eval", "binary.txt"], "binary.txt"),
    "generate: binary --prompt-file": ([*GEN[:2], "--prompt-file", "binary.txt"], "binary.txt"),
    "generate: latin-1 --prompt-file": ([*GEN[:2], "--prompt-file", "latin1.txt"], "latin1.txt"),
    "generate: missing --prompt-file": ([*GEN[:2], "--prompt-file", "nope.txt"], "nope.txt"),
    "generate: folder --prompt-file": ([*GEN[:2], "--prompt-file", "tiny"], "tiny"),
    "generate: empty --prompt-file": ([*GEN[:2], "--prompt-file", "empty.txt"], "prompt"),
    "generate: surrogate --prompt": ([*GEN[:2], "--prompt", "w1 \udcff\udcfe"], "--prompt"),
    "generate: lone surrogate only": ([*GEN[:2], "--prompt", "\udc80"], "--prompt"),
    "generate: both prompts": ([*GEN, "--prompt-file", "latin1.txt"], "--prompt-file"),
    "quantize: malformed toml": ([*RTN, "--recipe", "bad.toml"], "bad.toml"),
    "quantize: malformed yaml": ([*RTN, "--recipe", "bad.yaml"], "bad.yaml"),
    "quantize: binary toml": ([*RTN, "--recipe", "binary.toml"], "binary.toml"),
    "quantize: yaml list": ([*RTN, "--recipe", "list.yaml"], "mapping"),
    "quantize: toml unknown field": ([*RTN, "--recipe", "list.toml"], "x"),
    "quantize: yaml python tag": ([*RTN, "--recipe", "python-tag.yaml"], "python-tag.yaml"),
    "quantize: yaml python name": ([*RTN, "--recipe", "python-name.yaml"], "python-name.yaml"),
    "quantize: recipe is a folder": ([*RTN, "--recipe", "tiny"], "tiny"),
}


@pytest.mark.parametrize("argv,named", list(BAD_INPUTS.values()), ids=list(BAD_INPUTS))
def test_bad_input_is_one_line_naming_it(argv, named, env, capsys):
    _files(env)
    line = _refused(capsys, env, *argv)
    assert named in line
    assert not (env / "pwned").exists()


def test_a_yaml_python_tag_never_runs(env, capsys):
    """safe_load refuses the tag; the command it names would have created a file."""
    _files(env)
    _refused(capsys, env, *RTN, "--recipe", "python-tag.yaml")
    assert not (env / "pwned").exists()


REFUSED_FLAGS = {
    "group size 0": ([*RTN[:-1], "0"], "group_size"),
    "group size -2": ([*RTN[:-1], "-2"], "group_size"),
    "group size 7": ([*RTN[:-1], "7"], "group_size"),
    "group size 100": ([*RTN[:-1], "100"], "group_size"),
    "levels without a budget": ([*RTN, "--levels", "w9g7"], "--levels"),
    "good levels without a budget": ([*RTN, "--levels", "w2g64,w4g64"], "--levels"),
    "generations without a budget": ([*RTN, "--search-generations", "3"], "--search-generations"),
    "negative generations": ([*RTN, "--target-bpw", "3", "--search-generations", "-3"], "--search-generations"),
    "level w9g7 with a budget": ([*RTN, "--target-bpw", "3", "--levels", "w9g7,w4g64"], "w9g7"),
    "level w4g7 with a budget": ([*RTN, "--target-bpw", "3", "--levels", "w4g7,w4g64"], "w4g7"),
    "rtn --act-order": ([*RTN, "--act-order"], "--act-order"),
    "rtn --no-act-order": ([*RTN, "--no-act-order"], "--act-order"),
    "rtn --static-groups": ([*RTN, "--static-groups"], "--static-groups"),
    "rtn --damp": ([*RTN, "--damp", "0.1"], "--damp"),
    "rtn --true-sequential": ([*RTN, "--no-true-sequential"], "--true-sequential"),
    "awq --damp": (["quantize", "tiny", "-o", "out", "--method", "awq", "--damp", "0.1"], "--damp"),
    "rtn --calib-data": ([*RTN, "--calib-data", "text.txt"], "--calib-data"),
    "rtn --calib-samples": ([*RTN, "--calib-samples", "8"], "--calib-samples"),
    "rtn --calib-seqlen": ([*RTN, "--calib-seqlen", "64"], "--calib-seqlen"),
    "rtn --calib-dtype": ([*RTN, "--calib-dtype", "bfloat16"], "--calib-dtype"),
    "rtn --seed": ([*RTN, "--seed", "3"], "--seed"),
    "calib samples 0": (["quantize", "tiny", "-o", "out", "--calib-samples", "0"], "--calib-samples"),
    "calib seqlen 1": (["quantize", "tiny", "-o", "out", "--calib-seqlen", "1"], "--calib-seqlen"),
    "damp 0": (["quantize", "tiny", "-o", "out", "--damp", "0"], "--damp"),
    "damp 1": (["quantize", "tiny", "-o", "out", "--damp", "1"], "--damp"),
    "damp nan": (["quantize", "tiny", "-o", "out", "--damp", "nan"], "--damp"),
    "max tokens without --eval": ([*RTN, "--max-tokens", "100"], "--max-tokens"),
    "seqlen without --eval": ([*RTN, "--seqlen", "64"], "--seqlen"),
    "quantize max tokens 0": ([*RTN, "--eval", "text.txt", "--max-tokens", "0"], "--max-tokens"),
    "quantize seqlen 1": ([*RTN, "--eval", "text.txt", "--seqlen", "1"], "--seqlen"),
    "eval max tokens 0": (["eval", "tiny", "--data", "text.txt", "--max-tokens", "0"], "--max-tokens"),
    "eval max tokens -5": (["eval", "tiny", "--data", "text.txt", "--max-tokens", "-5"], "--max-tokens"),
    "eval seqlen 1": (["eval", "tiny", "--data", "text.txt", "--seqlen", "1"], "--seqlen"),
    "temperature -1 top-p 5": ([*GEN, "--temperature", "-1", "--top-p", "5"], "--temperature"),
    "top-p 5": ([*GEN, "--temperature", "0.8", "--top-p", "5"], "--top-p"),
    "top-p 0": ([*GEN, "--temperature", "0.8", "--top-p", "0"], "--top-p"),
    "top-p without sampling": ([*GEN, "--top-p", "0.9"], "--top-p"),
    "seed without sampling": ([*GEN, "--seed", "3"], "--seed"),
    "max new tokens 0": ([*GEN, "--max-new-tokens", "0"], "--max-new-tokens"),
    "max new tokens -1": ([*GEN, "--max-new-tokens", "-1"], "--max-new-tokens"),
    "prefill chunk 0": ([*GEN, "--prefill-chunk", "0"], "--prefill-chunk"),
    "runtime on a plain model": ([*GEN, "--runtime", "reference"], "--runtime"),
    "int8 activations on a plain model": ([*GEN, "--activations", "int8"], "--activations"),
    "a billion new tokens": ([*GEN, "--max-new-tokens", "1000000000"], "--max-new-tokens"),
    "unknown flag": ([*GEN, "--no-such-flag"], "--no-such-flag"),
    "not a number": ([*GEN, "--max-new-tokens", "many"], "--max-new-tokens"),
}


@pytest.mark.parametrize("argv,named", list(REFUSED_FLAGS.values()), ids=list(REFUSED_FLAGS))
def test_flags_that_make_no_sense_are_refused(argv, named, env, capsys):
    line = _refused(capsys, env, *argv)
    assert named in line


def test_the_same_commands_with_sensible_flags_work(env, capsys):
    """The refusals above are the flags' doing: the neighbouring sensible commands succeed."""
    rc, _, err = run_cli(capsys, *RTN, "-q")
    assert rc == 0, err
    recorded = json.loads((env / "out" / "manifest.json").read_text())["recipe"]
    assert recorded["group_size"] == 32
    rc, out, err = run_cli(capsys, *GEN, "--max-new-tokens", "3", "--temperature", "0.8", "--top-p", "0.9",
                           "--seed", "1", "-q")
    assert rc == 0, err and out.strip()


def test_every_command_turns_usage_errors_into_one_line(env, capsys):
    for command in (["models"], ["kernels"], ["recipes"], ["quantize", "tiny", "-o", "o"], ["eval", "tiny"],
                    ["generate", "tiny"], ["info", "tiny"], ["bench", "accuracy"], ["bench", "kv"],
                    ["bench", "speed"], []):
        _refused(capsys, env, *command, "--no-such-flag", quiet=False)


def test_generation_past_the_context_is_refused_after_the_prompt_is_counted(env, capsys):
    # tiny's context is 256 tokens: 250 new tokens fit after a 2-token prompt, not after a 10-token one
    line = _refused(capsys, env, "generate", "tiny", "--prompt", " ".join(["w1"] * 10), "--max-new-tokens", "250")
    assert "246" in line
    rc, _, err = run_cli(capsys, "generate", "tiny", "--prompt", "w1 w2", "--max-new-tokens", "250", "-q")
    assert rc == 0, err
    line = _refused(capsys, env, "generate", "tiny", "--prompt", " ".join(["w1"] * 300), "--max-new-tokens", "4")
    assert "300" in line


def test_a_long_prompt_with_a_growing_cache_is_warned_about(env, capsys, caplog):
    rc, _, err = run_cli(capsys, "generate", "tiny", "--prompt", " ".join(["w1"] * 300), "--max-new-tokens", "2",
                         "--kv", "int4", "-q")
    assert rc == 0, err
    # one warning, naming the prompt's length and the context's
    assert [w for w in warnings_logged(caplog) if {300, 256} <= set(numbers(w))]


def test_static_cache_checks_in_the_library(env, monkeypatch):
    from transformers import AutoModelForCausalLM

    from lowbit.runtime import generate as gen

    model = AutoModelForCausalLM.from_pretrained(env / "tiny").eval()
    with pytest.raises(ConfigError, match="at most 246"):
        gen.generate(model, torch.ones(10, dtype=torch.long), 250, static=True)
    monkeypatch.setattr(gen, "_memory_room", lambda: 1000)
    with pytest.raises(ResourceError, match="--max-new-tokens"):
        gen.generate(model, torch.ones(10, dtype=torch.long), 4, static=True)
    assert gen.static_cache_bytes(model.config, 100, torch.float32) == 2 * 2 * 2 * 16 * 100 * 4


def test_generate_prints_no_future_warning(env, capsys, recwarn):
    rc, _, err = run_cli(capsys, *GEN, "--max-new-tokens", "2", "-q")
    assert rc == 0, err
    assert "FutureWarning" not in err
    assert not [w for w in recwarn if issubclass(w.category, FutureWarning) and "past_key_values" in str(w.message)]


BAR_MARKS = ("it/s]", "%|", "\u2588", "Loading weights")


@pytest.mark.parametrize("argv", [
    GEN + ["--max-new-tokens", "2"],
    ["eval", "tiny", "--data", "text.txt", "--max-tokens", "256", "--seqlen", "128", "--reference", "none"],
    RTN,
], ids=["generate", "eval", "quantize"])
def test_quiet_silences_library_progress_bars(argv, env, capsys):
    rc, _, err = run_cli(capsys, *argv, "-q")
    assert rc == 0, err
    assert not [m for m in BAR_MARKS if m in err], err


def test_quiet_settings_do_not_leak_past_the_command(env, capsys):
    from transformers.utils import logging as hf_logging

    bars, level = hf_logging.is_progress_bar_enabled(), hf_logging.get_verbosity()
    run_cli(capsys, *GEN, "--max-new-tokens", "2", "-q")
    assert (hf_logging.is_progress_bar_enabled(), hf_logging.get_verbosity()) == (bars, level)


@pytest.mark.parametrize("error", [
    MemoryError(),
    RuntimeError("[enforce fail at alloc_cpu.cpp:117] data. DefaultCPUAllocator: can't allocate memory: "
                 "you tried to allocate 1000000000 bytes. Error code 12 (Cannot allocate memory)"),
], ids=["MemoryError", "torch allocator"])
@pytest.mark.parametrize("command", ["generate", "eval", "quantize"])
def test_out_of_memory_while_loading_is_one_line_naming_what_to_reduce(error, command, env, capsys, monkeypatch):
    import lowbit.models

    def load_model(*args, **kwargs):
        raise error

    monkeypatch.setattr(lowbit.models, "load_model", load_model)
    argv = {"generate": GEN, "eval": ["eval", "tiny", "--data", "text.txt", "--reference", "none"],
            "quantize": RTN}[command]
    line = _refused(capsys, env, *argv)
    assert re.search(r"--[a-z][a-z-]+", line)  # names a flag to lower


@pytest.mark.parametrize("error,named", [
    (OSError(errno.ENOSPC, "No space left on device", "out/quantized.safetensors"), "space"),
    (PermissionError(errno.EACCES, "Permission denied", "/root/x"), "ermission"),
], ids=["disk full", "permission denied"])
def test_os_errors_with_a_file_are_one_line(error, named, env, capsys, monkeypatch):
    def cmd(args):
        raise error

    monkeypatch.setattr(cli_models, "cmd_models", cmd)
    line = _refused(capsys, env, "models", quiet=False)
    assert named in line and error.filename in line


def test_an_unexpected_exception_is_one_internal_error_line(env, capsys, monkeypatch):
    def cmd(args):
        raise ZeroDivisionError("surprise")

    monkeypatch.setattr(cli_models, "cmd_models", cmd)
    rc, _, err = run_cli(capsys, "models")
    assert rc == 1 and "Traceback" not in err
    assert [line for line in err.splitlines() if line.startswith("lowbit: internal error:")] and "-v" in err
    rc, _, err = run_cli(capsys, "-v", "models")
    assert rc == 1 and "Traceback" in err and "ZeroDivisionError: surprise" in err


def test_a_manifest_recipe_reads_back(env, capsys):
    rc, _, err = run_cli(capsys, *RTN, "-q")
    assert rc == 0, err
    recorded = json.loads((env / "out" / "manifest.json").read_text())["recipe"]
    used = Recipe.from_dict(recorded)
    assert (used.method, used.group_size) == ("rtn", 32)
    assert Recipe.from_dict(used.used_dict()).used_dict() == used.used_dict()


def test_a_group_wider_than_a_layer_is_refused_naming_its_width(env, caplog):
    from transformers import AutoModelForCausalLM

    from lowbit.cli.checks import check_layer_groups
    from lowbit.pipeline import target_layers

    model = AutoModelForCausalLM.from_pretrained(env / "tiny")
    recipe = Recipe(method="rtn", group_size=100000)
    names, _ = target_layers(model, recipe)
    with pytest.raises(ConfigError, match="64 inputs"):
        check_layer_groups(model, names, recipe)
    check_layer_groups(model, names, Recipe(method="rtn", group_size=-1))
    check_layer_groups(model, names, Recipe(method="rtn", group_size=32))
    assert not [r for r in caplog.records if r.levelname == "WARNING"]
    check_layer_groups(model, names, Recipe(method="rtn", group_size=48))  # 64 % 48: a short last group
    assert [r for r in caplog.records if r.levelname == "WARNING" and "layers.0" in r.getMessage()]


def test_group_size_100000_is_refused_by_quantize(env, capsys):
    """Needs cmd_quantize to call cli.checks.check_layer_groups after loading the model."""
    line = _refused(capsys, env, *RTN[:-1], "100000")
    assert "64" in line
