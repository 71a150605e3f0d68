"""README.md's "Python API" block, run as written: the tiny model folder stands in for
smollm2-135m and a small local text file for wikitext2, so it runs in seconds."""

import json
import math
import re
import sys
from pathlib import Path

import pytest
from tiny_models import CHAT_WORDS, save_tiny_folder

README = Path(__file__).resolve().parents[1] / "README.md"


def _python_api_block() -> str:
    section = README.read_text(encoding="utf-8").split("## Python API", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.DOTALL).group(1)


@pytest.fixture
def api_env(tmp_path, monkeypatch):
    """The tiny folder, an evaluation text and a c4 calibration file of its words; the work folder
    is the current directory, and lowbit's cache and data dir lie inside it."""
    model = save_tiny_folder(tmp_path / "tiny")
    words = CHAT_WORDS[7:]
    text = " ".join(words[(i * 7) % len(words)] for i in range(3000))
    (tmp_path / "text.txt").write_text(text)
    data = tmp_path / "data"
    data.mkdir()
    docs = [" ".join(words[(i * 5 + j * 3) % len(words)] for j in range(40)) for i in range(2000)]
    (data / "c4-validation-2k.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    monkeypatch.setenv("LOWBIT_DATA", str(data))
    monkeypatch.setenv("LOWBIT_CACHE", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    return model, tmp_path / "text.txt"


def test_the_readme_python_api_runs(api_env):
    model, text = api_env
    code = _python_api_block()
    assert "smollm2-135m" in code and "wikitext2" in code
    code = code.replace('"smollm2-135m"', repr(str(model))).replace('"wikitext2"', repr(str(text)))
    scope: dict = {}
    exec(compile(code, "README.md (Python API)", "exec"), scope)  # noqa: S102 - the README's own example

    ds = scope["scores"].datasets[str(text)]
    assert ds.n_tokens_scored > 0 and math.isfinite(ds.ppl) and ds.ppl > 1  # a random model: no better bound
    assert math.isfinite(ds.kl_mean) and ds.kl_mean >= 0 and 0 <= ds.top1_agreement <= 1
    assert Path("out/smol-w4g64/manifest.json").is_file()
    manifest = json.loads(Path("out/smol-w4g64/manifest.json").read_text())
    assert manifest["recipe"]["method"] == "gptq" and manifest["evaluation"]
    ckpt = scope["ckpt"]
    assert sum(1 for _ in ckpt.model.modules()) > 0 and ckpt.manifest.layers


def test_api_names_stay_functions_whatever_was_imported(monkeypatch):
    """Importing every submodule first (as the CLI and the pipeline do) shadows no API name."""
    import importlib
    import pkgutil
    import types

    import lowbit

    for info in pkgutil.walk_packages(lowbit.__path__, "lowbit."):
        if not info.name.startswith(("lowbit.peers", "lowbit.bench")):
            importlib.import_module(info.name)
    for name in lowbit._API:
        assert not isinstance(getattr(lowbit, name), types.ModuleType), name
    assert callable(lowbit.evaluate) and callable(lowbit.save) and "lowbit.eval.evaluate" in sys.modules
