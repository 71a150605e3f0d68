"""gguf-<method>:<mix> jobs of `lowbit bench accuracy`: lowbit's own GGUF files in the same table as
llama.cpp's, measured by the same evaluators."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from tiny_models import write_tiny_gguf_of

from lowbit.bench.accuracy_jobs import Job
from lowbit.errors import ConfigError


def test_jobs_name_a_method_and_a_llama_cpp_mix():
    assert Job.parse("gguf-gptq:q3_k_m") == Job("gguf-gptq", "Q3_K_M")
    assert Job.parse("gguf-rtn:Q4_0") == Job("gguf-rtn", "Q4_0")
    with pytest.raises(ConfigError, match="Q9_Z"):
        Job.parse("gguf-rtn:Q9_Z")
    assert Job.parse("gguf-budget:3.5bpw") == Job("gguf-budget", "3.5bpw")
    with pytest.raises(ConfigError, match="bpw"):
        Job.parse("gguf-budget:Q4_K_M")  # a budget names a size, not a mix


def _run(tmp_path, shared_data, monkeypatch, jobs: str, llama_perplexity: bool = False, write=write_tiny_gguf_of):
    from lowbit.bench.accuracy import AccuracyBenchOptions, run_accuracy_bench

    monkeypatch.setenv("LOWBIT_CACHE", str(tmp_path / "cache"))
    model = tmp_path / "tiny.gguf"
    write(model)
    work = tmp_path / "work"
    run_accuracy_bench(AccuracyBenchOptions(
        models=(str(model),), jobs=jobs, data="wikitext2", max_tokens=512, seqlen=128, calib_samples=4,
        calib_seqlen=64, llama_perplexity=llama_perplexity, cache=str(tmp_path / "cache"),
        data_dir=str(shared_data), work_dir=str(work), output=str(tmp_path / "B.md"), quiet=True))
    return {r["method"]: r for r in map(json.loads, (work / "accuracy.jsonl").read_text().splitlines())}


def test_lowbit_gguf_rows_are_measured_from_the_written_file(tmp_path, shared_data, monkeypatch):
    recs = _run(tmp_path, shared_data, monkeypatch, "gguf-rtn:Q4_0,gguf-gptq:Q4_0,gguf-rtn:Q8_0")
    assert all("error" not in r for r in recs.values()), [r.get("error") for r in recs.values()]
    rows = {(r["method"], r["setting"]): r for r in recs.values()}
    rtn = [r for r in map(json.loads, (tmp_path / "work" / "accuracy.jsonl").read_text().splitlines())
           if r["method"] == "gguf-rtn"]
    by_mix = {r["setting"]: r for r in rtn}
    assert by_mix["Q4_0"]["bits_per_weight"] == 4.5 and by_mix["Q8_0"]["bits_per_weight"] == 8.5
    assert rows[("gguf-gptq", "Q4_0")]["llamacpp_tensor_types"] == {"Q4_0": 14}  # 2 blocks x 7 matrices
    kl = {s: r["datasets"]["wikitext2"]["kl"] for s, r in by_mix.items()}
    assert 0 < kl["Q8_0"] < kl["Q4_0"]


def test_a_budget_row_chooses_block_types_within_its_size(tmp_path, shared_data, monkeypatch):
    recs = _run(tmp_path, shared_data, monkeypatch, "gguf-budget:5.5bpw")
    r = recs["gguf-budget"]
    assert "error" not in r, r.get("error")
    assert r["bits_per_weight"] <= 5.5  # measured from the file's block tensors
    assert sum(r["budget"]["counts"].values()) == 14  # every matrix of the 2 blocks got a type
    assert sum(r["llamacpp_tensor_types"].values()) == 14


def test_llama_cpp_reads_lowbit_gguf_files(tmp_path, shared_data, monkeypatch):
    """The proof llama.cpp runs the file: llama-perplexity scores it against the reference (needs the
    llama.cpp tools built in the usual cache)."""
    from lowbit.peers.llamacpp import built_tools, tools_dir

    tools = built_tools()
    if tools is None:
        pytest.skip(f"llama.cpp tools not built in {tools_dir()} (lowbit.peers.llamacpp.ensure_llamacpp)")
    (tmp_path / "cache" / "llamacpp").mkdir(parents=True)
    (tmp_path / "cache" / "llamacpp" / tools.root.name).symlink_to(tools.root)
    sys.path.insert(0, str(Path(__file__).parents[1] / "peers"))
    # a vocabulary llama.cpp's own tokenizer takes (byte pieces, a newline)
    from test_llamacpp_imatrix import write_tiny_llama

    recs = _run(tmp_path, shared_data, monkeypatch, "gguf-rtn:Q4_K_M", llama_perplexity=True, write=write_tiny_llama)
    r = recs["gguf-rtn"]
    assert "error" not in r, r.get("error")
    llama = r["llama_perplexity"]["wikitext2"]
    assert llama["kl"] > 0 and 0 < llama["top1"] <= 1 and llama["ppl"] > 1
