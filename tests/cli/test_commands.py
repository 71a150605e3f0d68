"""CLI error paths: every bad input is a clear one-line error and exit code 2, before any work."""

import json
import re

import pytest
from rendered import error_line, numbers

from lowbit.cli import main
from lowbit.levels import Level


def run(capsys, *argv):
    """The stderr of a `lowbit ARGV` that must fail as a usage error: exit code 2, one error line."""
    code, err = main(list(argv)), capsys.readouterr().err
    error_line(code, err)
    return err


def test_unknown_model_lists_known_names(capsys, tmp_path):
    err = run(capsys, "quantize", "no-such-model", "-o", str(tmp_path / "o"), "--method", "rtn",
              "--cache", str(tmp_path))
    assert "no-such-model" in err and "smollm2-135m" in err  # the bad name, and the known ones


def test_bad_bits_is_rejected_before_loading(capsys, tmp_path):
    err = run(capsys, "quantize", "no-such-model", "-o", str(tmp_path / "o"), "--bits", "9")
    assert "'bits'" in err and {2, 8, 9} <= set(numbers(err))  # the field, the allowed range, the value


def test_missing_calibration_data_names_the_file_and_the_fix(capsys, tmp_path):
    err = run(capsys, "quantize", "smollm2-135m", "-o", str(tmp_path / "o"), "--method", "gptq",
              "--data-dir", str(tmp_path))
    assert "c4-validation-2k.jsonl" in err and "--data-dir" in err


def test_missing_eval_data(capsys, tmp_path):
    err = run(capsys, "eval", "smollm2-135m", "--data", "ptb", "--data-dir", str(tmp_path))
    assert "ptb-test.txt" in err


def test_datasets_may_be_separated_by_commas(capsys, tmp_path):
    err = run(capsys, "eval", "smollm2-135m", "--data", "wikitext2,ptb", "--data-dir", str(tmp_path))
    assert "wikitext2" in err and "wikitext2,ptb" not in err  # split, then found missing


def test_existing_output_needs_force(capsys, tmp_path):
    (tmp_path / "o").mkdir()
    err = run(capsys, "quantize", "smollm2-135m", "-o", str(tmp_path / "o"), "--method", "rtn")
    assert "--force" in err


def test_info_on_a_non_checkpoint(capsys, tmp_path):
    err = run(capsys, "info", str(tmp_path))
    assert str(tmp_path) in err


def test_recipe_file_errors_name_the_field(capsys, tmp_path):
    bad = tmp_path / "r.toml"
    bad.write_text('method = "gptq"\n[gptq]\ndamp = "lots"\n')
    err = run(capsys, "quantize", "smollm2-135m", "-o", str(tmp_path / "o"), "--recipe", str(bad))
    assert "gptq.damp" in err and "lots" in err


def test_models_lists_every_known_model(capsys, tmp_path):
    from lowbit.models import KNOWN_MODELS

    assert main(["models", "--json", "--cache", str(tmp_path)]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["name"] for r in rows] == list(KNOWN_MODELS)
    assert {"smollm2-135m", "qwen2.5-coder-0.5b", "qwen2.5-coder-1.5b", "gemma3-270m"} <= set(KNOWN_MODELS)
    assert [r["bytes"] for r in rows] == [m.size_bytes for m in KNOWN_MODELS.values()]
    assert not any(r["present"] for r in rows)  # an empty cache


def test_evaluating_on_the_calibration_file_is_refused(tmp_path):
    from lowbit.errors import ConfigError
    from lowbit.eval.evaluate import check_no_overlap

    f = tmp_path / "mine.txt"
    f.write_text("x")
    check_no_overlap("c4", ["c4", "wikitext2"])  # named sets are split by construction
    check_no_overlap(str(f), ["wikitext2"])
    with pytest.raises(ConfigError, match=re.escape(str(f))):
        check_no_overlap(str(f), [str(f)])


def test_fractional_bits_need_slim(capsys, tmp_path):
    err = run(capsys, "quantize", "no-such-model", "-o", str(tmp_path / "o"), "--method", "gptq", "--bits", "2.5")
    assert "'bits'" in err and "slim" in err


def test_recipe_flags_map_to_the_recipe():
    from lowbit.cli import build_parser
    from lowbit.cli.common import _recipe_from_args

    args = build_parser().parse_args(["quantize", "m", "-o", "x", "--method", "slim", "--bits", "2.5",
                                      "--integer-scale", "--group-size", "64"])
    r = _recipe_from_args(args)
    assert (r.method, r.bits, r.group_size, r.integer_scale.enabled, r.integer_scale.bits) == ("slim", 2.5, 64, True, 8)
    args = build_parser().parse_args(["quantize", "m", "-o", "x", "--method", "awq-gptq", "--integer-scale", "6"])
    r = _recipe_from_args(args)
    assert r.method == "awq-gptq" and r.integer_scale.bits == 6 and r.bits == 4


def test_budget_flags_map_to_the_recipe():
    from lowbit.cli import build_parser
    from lowbit.cli.common import _recipe_from_args

    args = build_parser().parse_args(["quantize", "m", "-o", "x", "--target-size", "80MB", "--levels", "w2g64,w4g64",
                                      "--search-generations", "3"])
    b = _recipe_from_args(args).budget
    assert (b.target_bytes, b.target_bpw, b.levels, b.generations) == (80_000_000, None, (Level(2, 64), Level(4, 64)), 3)
    args = build_parser().parse_args(["quantize", "m", "-o", "x", "--recipe", "budget-3bpw", "--target-bpw", "2.75"])
    assert _recipe_from_args(args).budget.target_bpw == 2.75
    assert _recipe_from_args(build_parser().parse_args(["quantize", "m", "-o", "x", "--target-size", "1.5GiB"])
                             ).budget.target_bytes == int(1.5 * 2**30)


def test_bad_size_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as e:
        main(["quantize", "m", "-o", "x", "--target-size", "lots"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "--target-size" in err and "'lots'" in err


def test_bad_kv_name_fails_before_loading(capsys, tmp_path):
    err = run(capsys, "eval", "no-such-model", "--kv", "int5", "--data-dir", str(tmp_path))
    assert "--kv 'int5'" in err


def test_kv_policy_errors_fail_before_loading(capsys, tmp_path):
    err = run(capsys, "eval", "no-such-model", "--kv-policy", "h2o", "--data-dir", str(tmp_path))
    assert "--kv-policy h2o" in err and "--kv-budget" in err
    err = run(capsys, "generate", "no-such-model", "--prompt", "x", "--kv", "kivi2", "--kv-policy", "snapkv",
              "--kv-budget", "0.2")
    assert re.search(r"--kv\b(?!-)", err) and "--kv-policy" in err  # the two flags that do not go together
    err = run(capsys, "generate", "no-such-model", "--prompt", "x", "--kv-policy", "snapkv", "--kv-budget", "1.5")
    assert "--kv-budget" in err
    err = run(capsys, "generate", "no-such-model")
    assert "--prompt" in err


def test_bench_kv_rejects_bad_cache_names_before_loading(capsys, tmp_path):
    err = run(capsys, "bench", "kv", "no-such-model", "--caches", "full,kivi9", "--work-dir", str(tmp_path))
    assert "kivi9" in err
    err = run(capsys, "bench", "kv", "no-such-model", "--caches", ",", "--work-dir", str(tmp_path))
    assert "--caches" in err


def test_kernels_says_when_the_reference_is_used(capsys, monkeypatch):
    from lowbit import kernels

    monkeypatch.setenv(kernels.DISABLE_ENV, "1")
    assert main(["kernels"]) == 1
    status = dict(line.split(": ", 1) for line in capsys.readouterr().out.splitlines())  # kernel: why
    assert list(status) == list(kernels.NAMES) and "kv_attention" in status
    assert all(kernels.DISABLE_ENV in why for why in status.values())  # each says what turned it off


def test_budget_flags_shape_a_budget_from_a_recipe():
    from lowbit.cli import build_parser
    from lowbit.cli.common import _recipe_from_args

    args = build_parser().parse_args(["quantize", "m", "-o", "x", "--recipe", "budget-3bpw", "--levels", "w2g64,w4g64",
                                      "--search-generations", "0"])
    b = _recipe_from_args(args).budget
    assert (b.target_bpw, b.levels, b.generations) == (3.0, (Level(2, 64), Level(4, 64)), 0)


def test_usage_errors_are_one_line(capsys):
    with pytest.raises(SystemExit) as e:
        main(["generate", "m", "--max-new-tokens", "0"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith("lowbit: error:") and len(err.strip().splitlines()) == 1


# ---------------------------------------------------------------- generate, --version, dtypes, info, models
@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    from tiny_models import CHAT_TEMPLATE, save_tiny_folder

    root = tmp_path_factory.mktemp("cli")
    return {"chat": save_tiny_folder(root / "chat", CHAT_TEMPLATE), "plain": save_tiny_folder(root / "plain"),
            "cache": root / "cache"}


def _generate_json(capsys, folders, which, *flags):
    code = main(["generate", str(folders[which]), "--prompt", "w1 w2", "--dtype", "float32", "--json", "-q",
                 "--cache", str(folders["cache"]), *flags])
    out, err = capsys.readouterr()
    assert code == 0, err
    return __import__("json").loads(out)


def _reference_tokens(folder, ids, n=8):
    """What runtime.generate makes of `ids` with the folder's model, as the CLI runs it."""
    import torch
    from transformers import AutoTokenizer, LlamaForCausalLM

    from lowbit.runtime.generate import generate

    model = LlamaForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    eos = AutoTokenizer.from_pretrained(folder).eos_token_id
    return generate(model, torch.tensor(ids), n, stop_ids={eos}, static=True).tokens


def test_generate_applies_the_chat_template_unless_raw(capsys, folders):
    from transformers import AutoTokenizer

    from lowbit.runtime.generate import chat_prompt_ids

    tok = AutoTokenizer.from_pretrained(folders["chat"])
    chat_ids, raw_ids = chat_prompt_ids(tok, "w1 w2"), tok("w1 w2")["input_ids"]
    chat = _generate_json(capsys, folders, "chat", "--max-new-tokens", "8")
    assert chat["chat_template"] and chat["prompt_tokens"] == len(chat_ids) > len(raw_ids)
    assert chat["tokens"] == _reference_tokens(folders["chat"], chat_ids)
    raw = _generate_json(capsys, folders, "chat", "--max-new-tokens", "8", "--raw")
    assert not raw["chat_template"] and raw["prompt_tokens"] == len(raw_ids)
    assert raw["tokens"] == _reference_tokens(folders["chat"], raw_ids)
    system = _generate_json(capsys, folders, "chat", "--max-new-tokens", "8", "--system", "w3 w4 w5")
    sys_ids = chat_prompt_ids(tok, "w1 w2", system="w3 w4 w5")
    assert system["prompt_tokens"] == len(sys_ids)
    assert system["tokens"] == _reference_tokens(folders["chat"], sys_ids)
    plain = _generate_json(capsys, folders, "plain", "--max-new-tokens", "8")  # no template: the prompt as is
    assert not plain["chat_template"] and plain["prompt_tokens"] == len(raw_ids)


def test_generate_refuses_what_it_cannot_honour(capsys, folders):
    for flags in (["--top-k", "5"], ["--top-k", "5", "--top-p", "0.9"], ["--system", "w1", "--raw"]):
        err = run(capsys, "generate", str(folders["chat"]), "--prompt", "w1", *flags)
        assert flags[0] in err  # names the flag it cannot honour
    err = run(capsys, "generate", str(folders["plain"]), "--prompt", "w1", "--system", "w2", "-q",
              "--cache", str(folders["cache"]))
    assert "--system" in err  # no chat template to put it in
    for flags in (["--top-k", "0"], ["--repetition-penalty", "0"], ["--stop", ""]):
        with pytest.raises(SystemExit) as e:
            main(["generate", str(folders["chat"]), "--prompt", "w1", "--temperature", "1", *flags])
        assert e.value.code == 2
    capsys.readouterr()


def test_generate_sampling_flags(capsys, folders):
    greedy = _generate_json(capsys, folders, "chat", "--max-new-tokens", "12", "--raw")
    top1 = _generate_json(capsys, folders, "chat", "--max-new-tokens", "12", "--raw", "--temperature", "2",
                          "--top-k", "1", "--seed", "3")
    assert top1["tokens"] == greedy["tokens"]
    penalised = _generate_json(capsys, folders, "chat", "--max-new-tokens", "12", "--raw",
                               "--repetition-penalty", "1e6")
    assert len(set(penalised["tokens"])) == len(penalised["tokens"])


def test_generate_stops_before_a_stop_string_streamed_or_not(capsys, folders):
    full = _generate_json(capsys, folders, "chat", "--max-new-tokens", "24", "--raw")
    words = full["text"].split()
    assert len(words) >= 4
    stop = words[3]  # a word the greedy text reaches after a few others
    cut = full["text"][:full["text"].index(stop)]
    stopped = _generate_json(capsys, folders, "chat", "--max-new-tokens", "24", "--raw", "--stop", stop,
                             "--stop", "w999")
    assert stopped["text"] == cut and stopped["stopped_at_string"]
    assert stopped["tokens"] == full["tokens"][:len(stopped["tokens"])] and len(stopped["tokens"]) < 24
    code = main(["generate", str(folders["chat"]), "--prompt", "w1 w2", "--dtype", "float32", "-q", "--raw",
                 "--cache", str(folders["cache"]), "--max-new-tokens", "24", "--stop", stop])
    assert code == 0 and capsys.readouterr().out.rstrip("\n") == cut


def test_version(capsys):
    import lowbit

    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.split() == ["lowbit", lowbit.__version__]


def test_every_command_spells_dtypes_alike():
    import torch

    from lowbit.cli import build_parser
    from lowbit.dtypes import ALIASES, CHOICES, resolve_dtype

    parser = build_parser()
    commands = {"quantize": ["quantize", "m", "-o", "x"], "eval": ["eval", "m"], "generate": ["generate", "m"],
                "bench kv": ["bench", "kv", "m"]}
    defaults = {name: parser.parse_args(argv).dtype for name, argv in commands.items()}
    assert defaults == {"quantize": "float32", "eval": "auto", "generate": "auto", "bench kv": "float32"}
    for argv in commands.values():
        for given in (*CHOICES, *ALIASES):
            name = parser.parse_args([*argv, "--dtype", given]).dtype
            assert name in CHOICES and resolve_dtype(name) == resolve_dtype(given)
        with pytest.raises(SystemExit):
            parser.parse_args([*argv, "--dtype", "float64"])
    assert resolve_dtype("bf16") == torch.bfloat16 and resolve_dtype("fp32") == torch.float32


def test_models_table_columns_line_up(capsys, tmp_path):
    import re

    assert main(["models", "--cache", str(tmp_path)]) == 0
    lines = capsys.readouterr().out.split("\n\n")[0].splitlines()
    starts = [[m.start() for m in re.finditer(r"(?:^|(?<=  ))\S", line)] for line in lines]
    assert len(lines) == 5 and all(len(s) == 5 for s in starts)  # header + four models, five columns each
    for col in (0, 1, 2, 4):  # left-aligned columns begin at one offset on every line
        assert len({s[col] for s in starts}) == 1
    assert len({len(line[:starts[0][4]].rstrip()) for line in lines}) == 1  # size right-aligned


def test_info_prints_the_used_recipe_and_one_line_per_distinct_format(capsys, folders, tmp_path):
    import json
    import re
    from dataclasses import replace

    from lowbit.checkpoint import Manifest
    from lowbit.eval.report import info_text
    from lowbit.recipes import Recipe

    ckpt = tmp_path / "ck"
    assert main(["quantize", str(folders["plain"]), "--method", "rtn", "--bits", "4", "--group-size", "32", "-o",
                 str(ckpt), "-q", "--cache", str(folders["cache"]), "--head-bits", "0"]) == 0
    assert main(["info", str(ckpt)]) == 0
    text = capsys.readouterr().out
    manifest = Manifest.read(ckpt)
    n_layers = len(manifest.layers)
    assert n_layers == 14
    assert sum(1 for line in text.splitlines() if re.search(r"\b14 layers\b", line)) == 1
    assert not any(name in text for name in manifest.layers)  # no line per layer
    recipe = Recipe.from_dict(manifest.recipe)
    assert {"calibration", "gptq"} <= set(recipe.unused_sections())
    keys = {m.group(1) for m in re.finditer(r"^\s+([a-z_.]+) = ", text, re.MULTILINE)}
    assert not any(k.split(".")[0] in recipe.unused_sections() for k in keys)
    assert {"method", "bits", "group_size"} <= keys

    # two formats, and a manifest that still lists every section: counted per format, unused ones left out
    layers = dict(manifest.layers)
    for name in list(layers)[:5]:
        layers[name] = replace(layers[name], fmt=replace(layers[name].fmt, bits=2))
    manifest = replace(manifest, layers=layers, info={**manifest.info, "recipe": recipe.to_dict()})
    counts = sorted(int(m.group(1)) for m in re.finditer(r"\b(\d+) layers:", info_text(manifest)))
    assert counts == [5, 9]
    assert "gptq." not in info_text(manifest) and json.dumps(manifest.to_dict())


def test_recorded_bench_commands_parse_into_options_that_print_them_back():
    """Each bench gets an options dataclass built from its flags, and the command it records (to
    reproduce the run) is the same text: the commands already in the repository round-trip."""
    import json
    import re
    import shlex
    from pathlib import Path

    from lowbit.bench import accuracy, kv, speed
    from lowbit.cli import build_parser
    from lowbit.cli.bench import accuracy_options, kv_options, speed_options

    root = Path(__file__).resolve().parents[2]
    results = root / "benchmarks" / "results"
    recorded = [*(results / "commands.txt").read_text().splitlines(),
                *(json.loads(line)["command"] for line in (results / "speed.jsonl").read_text().splitlines()),
                *re.findall(r"^Command: `(lowbit bench kv [^`]*)`", (root / "BENCHMARKS.md").read_text(), re.MULTILINE)]
    build = {"accuracy": (accuracy_options, accuracy.command_line), "speed": (speed_options, speed.command_line),
             "kv": (kv_options, kv.command_line)}
    seen = set()
    parser = build_parser()
    for command in recorded:
        argv = shlex.split(command)[1:]
        options, command_line = build[argv[1]]
        assert command_line(options(parser.parse_args(argv))) == command
        seen.add(argv[1])
    assert seen == set(build)
