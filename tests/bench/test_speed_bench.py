"""`lowbit bench speed` end to end on a tiny checkpoint (llama.cpp left out: it needs a build),
and the byte accounting it reports bandwidth fractions with."""

import json
import re
import statistics

import pytest
from rendered import column, error_line, markdown_table, number, numbers
from tiny_models import build_tiny, save_tiny_folder

from lowbit.bench.speed import bytes_per_token, read_bandwidth
from lowbit.cli import main


def test_bytes_per_token_counts_one_embedding_row_unless_the_head_shares_it():
    for tie in (True, False):
        model = build_tiny("llama", tie=tie)
        emb = model.get_input_embeddings().weight
        tensors = list(model.parameters()) + list(model.buffers())  # a tied head is one parameter
        everything = sum(t.numel() * t.element_size() for t in tensors)
        row = emb.shape[1] * emb.element_size()
        want = everything if tie else everything - emb.numel() * emb.element_size() + row
        assert bytes_per_token(model) == want


def test_read_bandwidth_is_a_plausible_rate():
    bw = read_bandwidth(1, gib=0.05, repeats=2)
    assert 1e8 < bw < 1e13


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    root = tmp_path_factory.mktemp("speed")
    save_tiny_folder(root / "src", tie=False)
    for bits in (4, 2):
        assert main(["quantize", str(root / "src"), "--method", "rtn", "--bits", str(bits), "--group-size", "32",
                     "-o", str(root / f"ck{bits}"), "-q"]) == 0
    assert main(["quantize", str(root / "src"), "--method", "rtn", "--bits", "8", "--group-size", "-1", "--sym",
                 "-o", str(root / "ck8"), "-q"]) == 0
    return root


def test_bench_speed_measures_checkpoints_beside_the_bf16_model(checkpoint, capsys):
    out, work = checkpoint / "BENCH.md", checkpoint / "work"
    code = main(["bench", "speed", str(checkpoint / "ck4"), str(checkpoint / "ck2"), f"{checkpoint / 'ck8'}@int8",
                 "--prompt-tokens", "8",
                 "--new-tokens", "4", "--repeats", "2", "--threads", "1", "--no-llamacpp",
                 "--work-dir", str(work), "--output", str(out)])
    assert code == 0
    rec = json.loads((work / "speed.jsonl").read_text().splitlines()[-1])
    assert list(rec["runtimes"]) == ["ck4", "ck2", "ck8 (int8 activations)", "bf16 (unquantized)"]
    for rows in rec["runtimes"].values():
        assert len(rows) == 2 and all(r["decode_tok_s"] > 0 and r["prefill_tok_s"] > 0 for r in rows)
    bpt = {k: v[0]["bytes_per_token"] for k, v in rec["runtimes"].items()}
    assert bpt["ck2"] < bpt["ck4"] < bpt["bf16 (unquantized)"]
    assert len(rec["bandwidth"]) == 2 and rec["kernels"][0]["format"] == "bf16 F.linear"
    assert all(r["bandwidth_beside"] > 1e8 for rows in rec["runtimes"].values() for r in rows)
    text = out.read_text()
    assert "<!-- bench:speed:begin -->" in text  # the marker a rerun replaces the section from
    table = markdown_table(text, "runtime")
    assert [r["runtime"] for r in table] == list(rec["runtimes"])
    decode = column(table, "decode tok/s")
    for row, rows in zip(table, rec["runtimes"].values(), strict=True):
        assert number(row[decode]) == pytest.approx(statistics.median(r["decode_tok_s"] for r in rows), abs=0.005)
        assert number(row["bytes/token"]) == round(rows[0]["bytes_per_token"] / 1e6)
    beside = statistics.median(r["decode_tok_s"] * bpt["ck2"] / r["bandwidth_beside"] for r in rec["runtimes"]["ck2"])
    assert abs(number(table[1]["beside"]) - 100 * beside) <= 0.5  # percent, rounded
    # the decode rate of every round, for ck2: "ck2 <round 1> / <round 2>"
    rounds = re.search(r"\bck2 ((?:\d+\.\d / )*\d+\.\d)\b", text)
    assert rounds and numbers(rounds.group(1)) == pytest.approx([r["decode_tok_s"] for r in rec["runtimes"]["ck2"]],
                                                                abs=0.051)
    kernels = markdown_table(text, "format")
    assert [r["format"] for r in kernels] == [k["format"] for k in rec["kernels"]]


def test_bench_speed_refuses_what_is_not_a_checkpoint(tmp_path, capsys):
    code = main(["bench", "speed", str(tmp_path), "--no-llamacpp", "--work-dir", str(tmp_path / "w"),
                 "--output", str(tmp_path / "B.md")])
    assert str(tmp_path) in error_line(code, capsys.readouterr().err)  # names what it refused
    assert not (tmp_path / "B.md").exists()


def test_bytes_per_token_counts_the_int8_weights_oneDNN_holds():
    from lowbit.algorithms.rtn import rtn_quantize
    from lowbit.qtensor import QuantFormat
    from lowbit.runtime.w8a8 import W8A8Linear

    model = build_tiny("llama", tie=True)
    before = bytes_per_token(model)
    lin = model.model.layers[0].mlp.down_proj
    dense = lin.weight.numel() * lin.weight.element_size()
    w8 = W8A8Linear(rtn_quantize(lin.weight.detach(), QuantFormat.resolved(lin.in_features, 8, -1, True)))
    model.model.layers[0].mlp.down_proj = w8
    # the float weight goes; one byte per weight (held by oneDNN, not a buffer) and a float scale per row come
    assert bytes_per_token(model) == before - dense + lin.weight.numel() + 4 * lin.out_features


def test_gguf_files_run_in_llama_bench_side_by_side(tmp_path, monkeypatch):
    """GGUF files in place of checkpoints: each through llama-bench in the same rounds, labelled with
    its block types (needs the llama.cpp tools built in the usual cache)."""
    import sys
    from pathlib import Path

    from lowbit.bench.speed_llamacpp import gguf_types
    from lowbit.peers.llamacpp import built_tools, tools_dir

    tools = built_tools()
    if tools is None:
        pytest.skip(f"llama.cpp tools not built in {tools_dir()} (lowbit.peers.llamacpp.ensure_llamacpp)")
    monkeypatch.setenv("LOWBIT_CACHE", str(tmp_path / "cache"))
    (tmp_path / "cache" / "llamacpp").mkdir(parents=True)
    (tmp_path / "cache" / "llamacpp" / tools.root.name).symlink_to(tools.root)
    sys.path.insert(0, str(Path(__file__).parents[1] / "peers"))
    from test_llamacpp_imatrix import write_tiny_llama

    write_tiny_llama(tmp_path / "src.gguf")
    for mix in ("Q8_0", "Q4_0"):
        assert main(["quantize", str(tmp_path / "src.gguf"), "--method", "rtn", "--format", f"gguf:{mix}",
                     "-o", str(tmp_path / f"{mix}.gguf"), "-q"]) == 0
    assert gguf_types(tmp_path / "Q4_0.gguf").split()[0].startswith("Q4_0x")
    work = tmp_path / "work"
    code = main(["bench", "speed", str(tmp_path / "Q8_0.gguf"), str(tmp_path / "Q4_0.gguf"), "--prompt-tokens", "8",
                 "--new-tokens", "4", "--repeats", "2", "--threads", "1", "--work-dir", str(work),
                 "--output", str(tmp_path / "B.md")])
    assert code == 0
    rec = json.loads((work / "speed.jsonl").read_text().splitlines()[-1])
    names = list(rec["runtimes"])
    assert len(names) == 2 and "Q8_0.gguf" in names[0] and "Q4_0.gguf" in names[1]
    for rows in rec["runtimes"].values():
        assert len(rows) == 2 and all(r["decode_tok_s"] > 0 for r in rows)
    q8, q4 = (rec["runtimes"][n][0]["bytes_per_token"] for n in names)
    assert q4 < q8  # the Q4_0 file's matrices are about half the bytes
    assert not rec["kernels"]  # no lowbit checkpoint: no kernel table


def test_bench_speed_refuses_a_missing_gguf_file(tmp_path, capsys):
    code = main(["bench", "speed", str(tmp_path / "absent.gguf"), "--work-dir", str(tmp_path / "w"),
                 "--output", str(tmp_path / "B.md")])
    assert "absent.gguf" in error_line(code, capsys.readouterr().err)
    assert not (tmp_path / "B.md").exists()
