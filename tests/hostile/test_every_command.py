"""Every lowbit command, given hostile input, fails with exit code 2 and one line naming the
problem: no traceback, nothing written or deleted in the work folder."""

import json

import pytest
from hostile_cli import assert_clean_error, run_cli, tree

GARBAGE = bytes(range(256)) * 64


def _setup(env, checkpoint=None):
    (env / "garbage.gguf").write_bytes(b"GGUF" + GARBAGE)
    (env / "binary.txt").write_bytes(b"\xff\xfe\x00" + GARBAGE)
    (env / "bad.toml").write_text("method = [unclosed\n")
    (env / "not-a-model").mkdir()
    if checkpoint is not None:
        broken = env / "ckpt-no-manifest"
        broken.mkdir()
        for f in checkpoint.iterdir():
            if f.name != "manifest.json":
                (broken / f.name).write_bytes(f.read_bytes())
        odd = env / "ckpt-list-manifest"
        odd.mkdir()
        for f in checkpoint.iterdir():
            (odd / f.name).write_bytes(b"[1, 2, 3]\n" if f.name == "manifest.json" else f.read_bytes())


CASES = {
    "quantize: no such model": ["quantize", "no/such/model.gguf", "-o", "out"],
    "quantize: garbage gguf": ["quantize", "garbage.gguf", "-o", "out", "--method", "rtn"],
    "quantize: folder without config": ["quantize", "not-a-model", "-o", "out"],
    "quantize: bits 9": ["quantize", "tiny", "-o", "out", "--bits", "9"],
    "quantize: group size 0": ["quantize", "tiny", "-o", "out", "--group-size", "0", "--method", "rtn"],
    "quantize: malformed recipe": ["quantize", "tiny", "-o", "out", "--recipe", "bad.toml"],
    "quantize: binary calibration text": ["quantize", "tiny", "-o", "out", "--calib-data", "binary.txt"],
    "quantize: output is the input": ["quantize", "tiny", "-o", "tiny", "--force", "--method", "rtn"],
    "quantize: output is the cwd": ["quantize", "tiny", "-o", ".", "--force", "--method", "rtn"],
    "quantize: resume without stream": ["quantize", "tiny", "-o", "out", "--method", "rtn", "--resume"],
    "quantize: resume nothing": ["quantize", "tiny", "-o", "out", "--method", "rtn", "--stream", "--resume"],
    "quantize: resume a checkpoint": ["quantize", "tiny", "-o", "ckpt", "--method", "rtn", "--stream", "--resume"],
    "quantize: stream over a checkpoint": ["quantize", "tiny", "-o", "ckpt", "--method", "rtn", "--stream",
                                           "--force"],
    "quantize: stream a budget": ["quantize", "tiny", "-o", "out", "--stream", "--target-bpw", "3"],
    "quantize: stream and eval": ["quantize", "tiny", "-o", "out", "--method", "rtn", "--stream", "--eval",
                                  "text.txt"],
    "quantize: stream garbage gguf": ["quantize", "garbage.gguf", "-o", "out", "--method", "rtn", "--stream"],
    "quantize: stream into the input": ["quantize", "tiny", "-o", "tiny", "--method", "rtn", "--stream", "--force"],
    "quantize: max tokens 0": ["quantize", "tiny", "-o", "out", "--method", "rtn", "--eval", "text.txt",
                               "--max-tokens", "0"],
    "eval: no such model": ["eval", "missing-folder/", "--data", "text.txt"],
    "eval: binary data": ["eval", "ckpt", "--data", "binary.txt", "--reference", "none"],
    "eval: checkpoint without manifest": ["eval", "ckpt-no-manifest", "--data", "text.txt"],
    "eval: manifest not an object": ["eval", "ckpt-list-manifest", "--data", "text.txt"],
    "eval: garbage gguf": ["eval", "garbage.gguf", "--data", "text.txt"],
    "generate: no prompt": ["generate", "ckpt"],
    "generate: missing prompt file": ["generate", "ckpt", "--prompt-file", "nope.txt"],
    "generate: binary prompt file": ["generate", "ckpt", "--prompt-file", "binary.txt"],
    "generate: a billion new tokens": ["generate", "ckpt", "--prompt", "w1 w2", "--max-new-tokens", "1000000000"],
    "generate: negative temperature": ["generate", "ckpt", "--prompt", "w1", "--temperature", "-1"],
    "generate: checkpoint without manifest": ["generate", "ckpt-no-manifest", "--prompt", "w1"],
    "info: not a checkpoint": ["info", "tiny"],
    "info: checkpoint without manifest": ["info", "ckpt-no-manifest"],
    "info: manifest not an object": ["info", "ckpt-list-manifest", "--verify"],
    "bench accuracy: no such model": ["bench", "accuracy", "no/such/model.gguf", "--output", "B.md"],
    "bench kv: no such model": ["bench", "kv", "no/such/model.gguf", "--output", "B.md"],
    "bench speed: not a checkpoint": ["bench", "speed", "tiny", "--no-llamacpp", "--output", "B.md"],
    "models: unknown name": ["models", "--fetch", "no-such-model"],
}


@pytest.mark.parametrize("argv", list(CASES.values()), ids=list(CASES))
def test_hostile_input_gives_one_clean_line_and_changes_nothing(argv, checkpoint, env, capsys):
    _setup(env, checkpoint)
    before = {k: v for k, v in tree(env).items() if not k.startswith("cache")}
    rc, _, err = run_cli(capsys, *argv, "-q" if argv[0] not in ("info",) else "--json")
    assert_clean_error(rc, err)
    after = {k: v for k, v in tree(env).items() if not k.startswith("cache")}
    assert after == before


def test_the_setup_is_hostile_but_the_model_is_fine(checkpoint, env, capsys):
    """The same fixtures with good input succeed, so the failures above are the input's doing."""
    _setup(env, checkpoint)
    rc, out, err = run_cli(capsys, "info", "ckpt", "--json")
    assert rc == 0, err
    assert json.loads(out)["format"] == "lowbit-checkpoint"
