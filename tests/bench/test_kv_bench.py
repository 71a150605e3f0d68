"""bench kv: results resume by model and settings, the section is rendered from them and replaced in place."""

import json

import pytest
from rendered import markdown_table, number

from lowbit.bench.common import write_section
from lowbit.bench.kv import _load_done, _settings, command_line, render
from lowbit.cli import build_parser
from lowbit.cli.bench import kv_options


def args_for(tmp_path, *extra):
    return kv_options(build_parser().parse_args(
        ["bench", "kv", "smollm2-135m", "--work-dir", str(tmp_path), "--output", str(tmp_path / "B.md"), *extra]))


def row(cache, ppl, kv_bytes, needle=None, lam=None):
    return {"model": "smollm2-135m", "cache": cache, "ppl": ppl, "kv_bytes": kv_bytes, "kv_bf16_bytes": 1000,
            "needle": needle and {"accuracy": needle}, "lambada": lam and {"accuracy": lam}, "seconds": 1.0}


def test_results_resume_only_for_the_same_settings(tmp_path):
    args = args_for(tmp_path)
    s = _settings(args)
    lines = [dict(row("full", 10.0, 1000), settings=s), dict(row("kivi2", 11.0, 300), settings={**s, "chunk": 64})]
    (tmp_path / "kv.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    assert list(_load_done(tmp_path / "kv.jsonl", "smollm2-135m", s)) == ["full"]
    assert _load_done(tmp_path / "kv.jsonl", "other-model", s) == {}


def test_render_reports_ratios_against_the_full_cache_and_plots(tmp_path):
    args = args_for(tmp_path)
    text = render(args, [row("full", 10.0, 1000, 1.0, 0.5), row("kivi2", 10.5, 250, 0.5, 0.45)], tmp_path)
    kivi2 = next(r for r in markdown_table(text) if r["cache"] == "kivi2")
    assert [number(kivi2[c]) for c in ("vs bf16", "ppl", "needle", "LAMBADA")] == [0.25, 10.5, 0.5, 0.45]
    assert number(next(v for k, v in kivi2.items() if k.startswith("Δppl"))) == pytest.approx(5.0)
    assert (tmp_path / "BENCHMARKS-kv-smollm2-135m.png").is_file()
    out = tmp_path / "B.md"
    out.write_text("# Benchmarks\n\nkept text\n")
    write_section(out, text, "kv")
    write_section(out, text.replace("kivi2", "kivi3"), "kv")
    final = out.read_text()
    assert "kept text" in final and "kivi3" in final and "kivi2" not in final
    assert final.count("<!-- bench:kv:begin -->") == 1


def test_a_peer_that_crashes_on_a_task_is_recorded_not_fatal(tmp_path):
    from lowbit.bench.kv import _peer_safe

    def boom():
        raise RuntimeError("odd rows")

    failed = _peer_safe(True, boom, [1]).to_dict()
    assert failed["accuracy"] is None and "odd rows" in failed["failed"]
    with pytest.raises(RuntimeError):
        _peer_safe(False, boom, [1])  # lowbit's own caches must not hide their errors
    args = args_for(tmp_path)
    text = render(args, [row("full", 10.0, 1000, 1.0, 0.5), dict(row("hf-hqq4", 10.2, 300, 1.0), lambada=failed)],
                  tmp_path)
    peer = next(r for r in markdown_table(text) if r["cache"] == "hf-hqq4")
    assert "failed" in peer["LAMBADA"] and number(peer["ppl"]) == 10.2  # its other results stand


def test_a_needle_only_run_keeps_its_own_section_and_plot(tmp_path):
    args = args_for(tmp_path, "--max-tokens", "0", "--needle-lengths", "8192", "--section", "needle-8k")
    text = render(args, [row("full", None, None, 1.0), row("kivi2", None, None, 0.5)], tmp_path)
    assert text.startswith("## KV cache: smollm2-135m (needle-8k)") and "--section needle-8k" in text
    kivi2 = next(r for r in markdown_table(text) if r["cache"] == "kivi2")
    assert number(kivi2["needle"]) == 0.5 and kivi2["ppl"] == "-"
    assert not (tmp_path / "BENCHMARKS-kv-smollm2-135m-needle-8k.png").exists()  # nothing to plot without ppl
    out = tmp_path / "B.md"
    write_section(out, "main table", "kv")
    write_section(out, text, args.section)
    final = out.read_text()
    assert "main table" in final and "(needle-8k)" in final


def test_options_parse_every_cache_once_and_the_command_reproduces_the_flags(tmp_path):
    from lowbit.runtime.kvcache import CacheSpec
    from lowbit.runtime.kvcache.spec import EvictSpec, KVSpec

    caches = "full,kivi2-b64,snapkv@0.2,kvpress:h2o@0.2"
    opts = args_for(tmp_path, "--caches", caches, "--needle-lengths", "", "--section", "x")
    full, kivi, snap, peer = opts.caches
    assert full.full and full.label == "full"
    assert kivi.spec == CacheSpec("kivi2-b64", lowbit=KVSpec(2, 64))
    assert snap.spec == CacheSpec("snapkv@0.2", evict=EvictSpec("snapkv", 0.2))
    assert peer.spec is None and peer.peer == EvictSpec("h2o", 0.2)
    assert command_line(opts) == (
        f"lowbit bench kv smollm2-135m --caches {caches} --data wikitext2 --max-tokens 4096 --seqlen 2048 "
        "--chunk 128 --needle-lengths '' --needle-depths 0.1,0.5,0.9 --needle-per-cell 2 --lambada 200 "
        "--dtype float32 --section x")


def test_the_kv_plot_numbers_every_cache_and_reports_those_beyond_its_range(tmp_path):
    from lowbit.bench.kv import plot

    rows = [row("full", 10.0, 1000), row("kivi2", 12.0, 300), row("kivi2-c1", 12.1, 300), row("hf-hqq2", 80.0, 200),
            row("snapkv@0.2", 20.0, 400), row("h2o@0.2", 14.0, 400), row("kvpress:h2o@0.2", None, None)]
    drawn = plot("m", rows, tmp_path)
    assert drawn.path.stat().st_size > 1000
    assert sorted(drawn.numbers.values()) == list(range(1, 7)) and "kvpress:h2o@0.2" not in drawn.numbers
    assert drawn.numbers["full"] == 1 and drawn.above == ("hf-hqq2",)  # 8x the full cache: an arrow at the top
