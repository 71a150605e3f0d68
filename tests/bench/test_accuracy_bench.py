import json
import re
from pathlib import Path

import pytest
from rendered import image_links, markdown_table, number, numbers

from lowbit.bench.accuracy_jobs import (
    Job,
    Setting,
    file_label,
    result_key,
    select_jobs,
)
from lowbit.bench.accuracy_render import pareto_front, render
from lowbit.errors import ConfigError


def test_setting_parse():
    assert Setting.parse("w3g64") == Setting(3, 64)
    assert str(Setting.parse("W4G128")) == "w4g128"
    with pytest.raises(ConfigError, match="w<bits>g<group>"):
        Setting.parse("4bit")


def test_file_labels_keep_names_and_tell_paths_apart():
    assert file_label("qwen2.5-coder-1.5b") == "qwen2.5-coder-1.5b"
    a, b = file_label("/data/a/model"), file_label("/data/b/model")
    assert a != b and a.startswith("model-") and "/" not in a + b
    assert "/" not in file_label("org/name") and "\\" not in file_label("C:\\m\\x.gguf")


def test_jobs_parse_and_refuse_what_cannot_run():
    assert Job.parse("slim:w2.5g128") == Job("slim", "w2.5g128")
    assert Job.parse("gptq:w4g128-is8").setting == "w4g128-is8"
    assert Setting.parse("w2.5g128").bits == 2.5
    assert Job.parse("awq-slim:w2.5g128") == Job("awq-slim", "w2.5g128")
    assert Job.parse("budget:2.92bpw").setting == "2.92bpw"  # a size given directly, not a uniform format's
    for bad, match in (("gptq:w2.5g128", "need method slim or awq-slim"), ("llamacpp:Q9_Z", "Q9_Z"),
                       ("sparsegpt:w4g128", "METHOD:SETTING"), ("gptq", "METHOD:SETTING"),
                       ("hqq:w4g128-is8", "integer scales"), ("gptq:2.92bpw", "w<bits>g<group>"),
                       ("budget:0.5bpw", "in \\(1, 16\\]"), ("budget:2.92bpw-is8", "integer scales")):
        with pytest.raises(ConfigError, match=match):
            Job.parse(bad)
    jobs = select_jobs(None, None, "rtn,gptq", "w4g128,w3g64")
    assert [str(j) for j in jobs] == ["rtn:w4g128", "gptq:w4g128", "rtn:w3g64", "gptq:w3g64"]
    suite = [str(j) for j in select_jobs("methods", None, "", "")]
    assert {"awq-gptq:w3g128", "slim:w2.5g128", "budget:w2g32", "llamacpp:Q2_K", "hqq:w2g128"} <= set(suite)


def test_gguf_jobs_parse_and_refuse_what_llama_cpp_cannot_do():
    assert Job.parse("llamacpp:Q4_0") == Job("llamacpp", "Q4_0")
    assert Job.parse("llamacpp:q3_k_m") == Job("llamacpp", "Q3_K_M")  # llama-quantize's spelling
    assert Job.parse("llamacpp-imatrix:iq3_xxs") == Job("llamacpp-imatrix", "IQ3_XXS")
    assert Job.parse("llamacpp-imatrix:Q4_K_M") == Job("llamacpp-imatrix", "Q4_K_M")
    assert Job.parse("gguf:out/m.Q4_K_M.gguf") == Job("gguf", "out/m.Q4_K_M.gguf")
    for bad, match in (("llamacpp:IQ3_XXS", "llamacpp-imatrix:IQ3_XXS"), ("llamacpp:IQ2_M", "llamacpp-imatrix:IQ2_M"),
                       ("llamacpp:Q2_K_S", "llamacpp-imatrix:Q2_K_S"), ("llamacpp-imatrix:IQ1_S", "IQ1_S"),
                       ("llamacpp:Q4_K_M-is8", "Q4_K_M-is8"), ("gguf:model.bin", "model.bin")):
        with pytest.raises(ConfigError, match=match):
            Job.parse(bad)
    with pytest.raises(ConfigError, match="llamacpp-imatrix"):
        select_jobs(None, None, "gptq,llamacpp-imatrix", "w4g128")


def test_old_records_keep_their_identity():
    assert result_key({"model": "m", "method": "gptq", "bits": 3, "group_size": 64}) == ("m", "gptq", "w3g64", "float32")
    assert result_key({"model": "m", "method": "slim", "setting": "w2.5g128"}) == ("m", "slim", "w2.5g128", "float32")
    # bfloat16 calibration forwards are another result, not a rerun of the float32 one
    assert result_key({"model": "m", "method": "gptq", "setting": "w3g64", "calib_dtype": "bfloat16"})[3] == "bfloat16"
    # uncalibrated methods: one result, whatever dtype the run's calibration forwards had
    assert result_key({"model": "m", "method": "hqq", "setting": "w3g64", "calib_dtype": "bfloat16"}) == \
        result_key({"model": "m", "method": "hqq", "setting": "w3g64"})


def test_pareto_front_keeps_only_undominated_points():
    pts = [(4.2, 30.0), (3.2, 70.0), (3.3, 90.0), (2.3, 400.0), (4.5, 29.0), (4.3, 31.0)]
    assert pareto_front(pts) == [(2.3, 400.0), (3.2, 70.0), (4.2, 30.0), (4.5, 29.0)]
    # the same size, once rounded (3.148) and once exact (3.1484375): only the better is on the front
    assert pareto_front([(3.148, 20.9), (3.1484375, 17.6), (2.28, 41.7)]) == [(2.28, 41.7), (3.1484375, 17.6)]


def test_render_writes_table_and_plot(tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    (work / "commands.txt").write_text("lowbit bench accuracy m --suite methods\n")
    (work / "reference-m.json").write_text(json.dumps({"max_tokens": 64, "seqlen": 32, "sha256": "ab" * 32,
                                                       "ppl": {"wikitext2": 20.0}}))
    def row(method, setting, bpw, ppl):
        return {"model": "m", "method": method, "setting": setting, "bits_per_weight": bpw, "quant_seconds": 1.0,
                "peak_rss_bytes": 2**30, "calib_samples": 8, "calib_seqlen": 64,
                "datasets": {"wikitext2": {"ppl": ppl, "kl": 0.1, "top1": 0.9}}}
    rows = [row("gptq", "w3g128", 3.16, 70.0),
            {**row("slim", "w3g128", 3.17, 50.0), "slim_choices": {"table, plain clip": 3, "unmoved, salience clip": 4}},
            {**row("gptq", "w3g128", 3.16, 71.0), "calib_dtype": "bfloat16"},
            {**row("budget", "w3g128", 3.15, 60.0), "budget": {"target": "3.15 bits/weight", "counts": {"w3g64": 2},
                                                               "start": "uniform w3g128",
                                                               "starts": {"greedy": 1.3, "uniform w3g128": 1.0},
                                                               "start_kl": 1.0, "final_kl": 0.8, "accepted": 3,
                                                               "confirm": {"start": 1.1, "searched": 1.2},
                                                               "kept": "start"}},
            {"model": "m", "method": "llamacpp", "setting": "Q2_K", "error": "RuntimeError: no cmake"}]
    results = {result_key(r): r for r in rows}
    text = render(["m"], ["wikitext2"], results, work, plot_dir=tmp_path)
    table = markdown_table(text)
    assert (table[0]["method"], table[0]["setting"]) == ("reference", "fp32")  # one row per record after it
    assert sorted((r["method"], r["setting"]) for r in table[1:]) == sorted((r["method"], r["setting"]) for r in rows)
    assert number(table[0]["wikitext2 ppl"]) == 20.0
    done = [r for r in table[1:] if r["method"] != "llamacpp"]
    by_ppl = {number(r["wikitext2 ppl"]): r for r in done}
    for rec in rows[:4]:  # every number of a row is its record's
        got, ds = by_ppl[rec["datasets"]["wikitext2"]["ppl"]], rec["datasets"]["wikitext2"]
        assert (got["method"], got["setting"]) == (rec["method"], rec["setting"])
        assert number(got["bits/weight"]) == rec["bits_per_weight"]
        assert (number(got["wikitext2 KL"]), number(got["wikitext2 top-1"])) == (ds["kl"], ds["top1"])
        assert number(got["peak RSS (GiB)"]) == rec["peak_rss_bytes"] / 2**30
        assert numbers(got["calib"])[:2] == [rec["calib_samples"], rec["calib_seqlen"]]
    # the bfloat16-forwards run is told apart from the float32 one in the calib column
    assert "bfloat16" in by_ppl[71.0]["calib"] and "bfloat16" not in by_ppl[70.0]["calib"]
    slim_notes = by_ppl[50.0]["notes"]
    assert all(name in slim_notes for name in rows[1]["slim_choices"])
    assert numbers(slim_notes) == list(rows[1]["slim_choices"].values())
    budget, budget_notes = rows[3]["budget"], by_ppl[60.0]["notes"]
    assert "w3g64" in budget_notes and budget["start"] in budget_notes
    assert [float(x) for x in re.findall(r"\d+\.\d+", budget_notes)] == [
        budget["start_kl"], budget["final_kl"], budget["confirm"]["start"], budget["confirm"]["searched"]]
    failed = next(r for r in table if r["method"] == "llamacpp")
    assert rows[-1]["error"] in " ".join(failed.values())
    assert image_links(text) == ["BENCHMARKS-pareto-m.png"]
    assert (tmp_path / "BENCHMARKS-pareto-m.png").stat().st_size > 1000


def test_render_adds_llama_perplexity_numbers_for_gguf_rows(tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    (work / "commands.txt").write_text("lowbit bench accuracy m --jobs llamacpp:Q4_K_M\n")
    (work / "reference-m.json").write_text(json.dumps({"max_tokens": 4096, "seqlen": 1024, "sha256": "ab" * 32,
                                                       "ppl": {"wikitext2": 20.0, "c4": 25.0}}))
    def row(method, setting, bpw, ppl, llama=None):
        r = {"model": "m", "method": method, "setting": setting, "bits_per_weight": bpw, "quant_seconds": 1.0,
             "peak_rss_bytes": 2**30, "calib_samples": 8, "calib_seqlen": 64,
             "datasets": {d: {"ppl": ppl, "kl": 0.1, "top1": 0.9} for d in ("wikitext2", "c4")}}
        if llama:
            r["llama_perplexity"] = {d: {"ppl": p, "ref_ppl": 19.0, "kl": kl, "top1": t1, "n_ctx": 1024,
                                         "n_chunks": 4, "n_tokens_scored": 4 * 511} for d, (p, kl, t1) in llama.items()}
        return r
    rows = [row("gptq", "w4g128", 4.15, 21.0),
            row("llamacpp", "Q4_K_M", 4.9, 20.5, {"wikitext2": (19.5, 0.021, 0.95), "c4": (24.0, 0.03, 0.93)}),
            {**row("llamacpp-imatrix", "IQ3_XXS", 3.3, 24.0, {"wikitext2": (23.0, 0.11, 0.85)}),
             "imatrix": {"chunks": 8, "n_ctx": 64, "token_agreement": 0.987, "chunks_equal": 7, "seconds": 30.0,
                         "reused": False}}]
    text = render(["m"], ["wikitext2", "c4"], {result_key(r): r for r in rows}, work)
    first, second = text.split("llama-perplexity (llama.cpp's evaluator)")
    llama_table = markdown_table(second)
    assert [(r["method"], r["setting"]) for r in llama_table] == [
        ("reference", "f32 GGUF"), ("llamacpp", "Q4_K_M"), ("llamacpp-imatrix", "IQ3_XXS")]
    assert number(llama_table[0]["wikitext2 ppl"]) == 19.0
    q4 = llama_table[1]
    assert [number(q4[c]) for c in ("wikitext2 ppl", "wikitext2 KL", "wikitext2 top-1", "c4 ppl", "c4 KL")] == [
        19.5, 0.021, 0.95, 24.0, 0.03]
    assert llama_table[2]["c4 ppl"] == "-"  # not measured on c4
    assert numbers(second.split("\n")[0])[:3] == [4, 1024, 4 * 511]  # chunks, their length, tokens scored
    notes = next(r for r in markdown_table(first) if r["method"] == "llamacpp-imatrix")["notes"]
    # chunks x tokens, ids that differ, the imatrix's time
    assert numbers(notes.split("llama-imatrix")[1])[:5] == [8, 64, 7, 512, 30]


def _dies(spec, queue):
    import os

    os._exit(3)


def test_a_job_process_that_dies_gives_an_error_row_instead_of_hanging():
    from lowbit.bench.accuracy import _run_in_child

    r = _run_in_child({"model": "m", "method": "gptq", "setting": "w3g128"}, target=_dies)
    assert result_key(r)[:3] == ("m", "gptq", "w3g128") and 3 in numbers(r["error"])  # the exit code


def test_a_budget_job_meets_a_size_given_in_bits_per_weight(tmp_path, shared_data):
    """budget:<x>bpw runs end to end (child process, reference, table) and meets x within 1%."""
    from tiny_models import save_tiny_folder

    from lowbit.cli import main

    save_tiny_folder(tmp_path / "m")
    work, out = tmp_path / "work", tmp_path / "B.md"
    assert main(["bench", "accuracy", str(tmp_path / "m"), "--jobs", "budget:3.5bpw", "--data", "wikitext2",
                 "--max-tokens", "256", "--seqlen", "64", "--calib-samples", "4", "--calib-seqlen", "64",
                 "--budget-generations", "1", "--data-dir", str(shared_data), "--work-dir", str(work),
                 "--output", str(out), "-q"]) == 0
    rec = json.loads((work / "accuracy.jsonl").read_text().splitlines()[-1])
    assert "error" not in rec, rec.get("error")
    assert rec["setting"] == "3.5bpw" and 0.99 * 3.5 <= rec["bits_per_weight"] <= 3.5
    assert rec["budget"]["target"].startswith("3.5") and rec["datasets"]["wikitext2"]["kl"] >= 0
    row = next(r for r in markdown_table(out.read_text()) if r["method"] == "budget")
    assert row["setting"] == "3.5bpw" and number(row["bits/weight"]) == pytest.approx(rec["bits_per_weight"], abs=5e-4)


def test_pareto_plot_clips_blown_up_rows_and_reports_them(tmp_path):
    from lowbit.bench.accuracy_render import plot_pareto

    def row(method, setting, bpw, ppl):
        return {"model": "m", "method": method, "setting": setting, "bits_per_weight": bpw,
                "datasets": {"wikitext2": {"ppl": ppl}}}

    rows = [row("gptq", "w4g128", 4.15, 21.0), row("gptq", "w3g128", 3.15, 30.0), row("rtn", "w3g128", 3.15, 45.0),
            row("rtn", "w2g64", 2.28, 3.4e4), row("gptq", "w2g64", 2.28, 400.0)]
    ref = {"ppl": {"wikitext2": 20.0}, "max_tokens": 64, "seqlen": 32}
    plot = plot_pareto("m", rows, ref, "wikitext2", tmp_path, clip=5.0)
    assert plot.path.stat().st_size > 1000 and plot.y_top < 5.0 * 20.0 * 1.05
    assert plot.above == (("gptq", "w2g64", 2.28, 400.0), ("rtn", "w2g64", 2.28, 3.4e4))  # by size, then ppl
    assert plot_pareto("m", rows[:3], ref, "wikitext2", tmp_path).above == ()  # nothing beyond the range


def test_llama_cpp_rows_end_to_end_with_both_evaluators(tmp_path, shared_data, monkeypatch):
    """llamacpp, llamacpp-imatrix and gguf jobs on a tiny GGUF model, through the child processes,
    lowbit's evaluator and llama-perplexity (needs the llama.cpp tools built in the usual cache)."""
    import sys

    from lowbit.bench.accuracy import AccuracyBenchOptions, run_accuracy_bench
    from lowbit.peers.llamacpp import built_tools, tools_dir

    tools = built_tools()
    if tools is None:
        pytest.skip(f"llama.cpp tools not built in {tools_dir()} (lowbit.peers.llamacpp.ensure_llamacpp)")
    sys.path.insert(0, str(Path(__file__).parents[1] / "peers"))
    from test_llamacpp_imatrix import write_tiny_llama

    cache = tmp_path / "cache"
    (cache / "llamacpp").mkdir(parents=True)
    (cache / "llamacpp" / tools.root.name).symlink_to(tools.root)  # the built tools, models cached apart
    monkeypatch.setenv("LOWBIT_CACHE", str(cache))
    model = tmp_path / "tiny.gguf"
    write_tiny_llama(model)  # float32 tensors: as a gguf job, the reference itself
    work, out = tmp_path / "work", tmp_path / "B.md"
    run_accuracy_bench(AccuracyBenchOptions(
        models=(str(model),), jobs=f"llamacpp:Q8_0,llamacpp-imatrix:IQ4_XS,gguf:{model}", data="wikitext2",
        max_tokens=512, seqlen=128, calib_samples=4, calib_seqlen=64, llama_perplexity=True, cache=str(cache),
        data_dir=str(shared_data), work_dir=str(work), output=str(out), quiet=True))
    recs = {r["method"]: r for r in map(json.loads, (work / "accuracy.jsonl").read_text().splitlines())}
    assert all("error" not in r for r in recs.values()), [r.get("error") for r in recs.values()]
    same, q8, iq4 = recs["gguf"], recs["llamacpp"], recs["llamacpp-imatrix"]
    assert same["bits_per_weight"] == 32 and q8["bits_per_weight"] == 8.5  # Q8_0: 34 bytes per 32
    assert iq4["imatrix"]["chunks"] == 4 and iq4["imatrix"]["n_ctx"] == 64
    assert 0 <= iq4["imatrix"]["token_agreement"] <= 1
    for ds in ("wikitext2",):
        mine = {m: r["datasets"][ds] for m, r in recs.items()}
        llama = {m: r["llama_perplexity"][ds] for m, r in recs.items()}
        assert mine["gguf"]["kl"] < 1e-6 and llama["gguf"]["kl"] < 1e-4  # the reference against itself
        assert llama["gguf"]["top1"] == 1.0
        assert llama["gguf"]["ref_ppl"] == pytest.approx(llama["gguf"]["ppl"], rel=1e-3)
        assert (llama["llamacpp"]["n_chunks"], llama["llamacpp"]["n_ctx"]) == (512 // 128, 128)
        # both evaluators see Q8_0 closer to the reference than IQ4_XS
        assert mine["gguf"]["kl"] < mine["llamacpp"]["kl"] < mine["llamacpp-imatrix"]["kl"]
        assert llama["gguf"]["kl"] < llama["llamacpp"]["kl"] < llama["llamacpp-imatrix"]["kl"]
    table = out.read_text().split("llama-perplexity (llama.cpp's evaluator)")[1]
    assert {r["method"] for r in markdown_table(table)} == {"reference", "gguf", "llamacpp", "llamacpp-imatrix"}
