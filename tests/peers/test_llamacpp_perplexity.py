"""llama-perplexity as an evaluator: its report parsed into numbers, its KL base file read, and
with the real tool, KL and top-1 that order llama.cpp's own types as their sizes do."""

import struct
import subprocess

import pytest
from test_llamacpp_imatrix import word_text, write_tiny_llama

from lowbit.errors import ConfigError
from lowbit.peers.llamacpp import built_tools, tools_dir
from lowbit.peers.llamacpp_perplexity import (
    kl_base_header,
    llama_kl_divergence,
    llama_perplexity,
    parse_perplexity_output,
    save_kl_base,
)

# the lines of a report this module reads, as llama-perplexity prints them (numbers made up)
PLAIN_REPORT = """perplexity: calculating perplexity over 3 chunks, n_ctx=512, batch_size=512, n_seq=1
[1]19.1,[2]18.5,[3]18.4567,
Final estimate: PPL = 18.4567 +/- 0.12345
"""
KL_REPORT = """kl_divergence: computing over 4 chunks, n_ctx=2048, batch_size=2048, n_seq=1
chunk             PPL               ln(PPL(Q)/PPL(base))          KL Divergence              Δp RMS            Same top p
   1      22.0000 ±    1.2000       0.10000 ±    0.01000       0.13000 ±    0.01000     5.100 ±  0.200 %    86.000 ±  1.000 %
   4      21.2500 ±    0.3000       0.16599 ±    0.00500       0.12346 ±    0.00100     5.000 ±  0.100 %    87.500 ±  0.500 %

====== Perplexity statistics ======
Mean PPL(Q)                   :  21.250000 \u00b1   0.300000
Mean PPL(base)                :  18.000000 \u00b1   0.250000
====== KL divergence statistics ======
Mean    KLD:   0.123456 \u00b1   0.001000
Maximum KLD:   7.000000
Median  KLD:   0.050000
RMS \u0394p    :  5.000 \u00b1 0.100 %
Same top p: 87.500 \u00b1 0.500 %
"""


def test_parse_plain_and_kl_reports():
    assert parse_perplexity_output(PLAIN_REPORT) == {"ppl": 18.4567, "n_chunks": 3, "n_ctx": 512}
    got = parse_perplexity_output(KL_REPORT)
    assert got == {"ppl": 21.25, "ref_ppl": 18.0, "kl_mean": 0.123456, "top1_agreement": 0.875,
                   "n_chunks": 4, "n_ctx": 2048}
    assert parse_perplexity_output("nothing here") == {}


def test_parse_falls_back_to_the_running_values_when_the_last_lines_are_lost():
    # llama-perplexity logs from a thread of its own, and its last lines sometimes never arrive
    got = parse_perplexity_output(KL_REPORT[:KL_REPORT.index("======")])
    assert got["ppl"] == 21.25 and got["kl_mean"] == 0.12346 and got["top1_agreement"] == 0.875
    assert got["ref_ppl"] == pytest.approx(18.0, rel=1e-5)  # 21.25 / exp(0.16599)
    assert parse_perplexity_output(PLAIN_REPORT[:PLAIN_REPORT.index("Final")])["ppl"] == 18.4567
    # the running values of an earlier chunk are not the result: nothing is read
    assert "ppl" not in parse_perplexity_output(PLAIN_REPORT[:PLAIN_REPORT.index("[3]")])
    assert "kl_mean" not in parse_perplexity_output(KL_REPORT[:KL_REPORT.index("   4 ")])


def test_kl_base_header(tmp_path):
    base = tmp_path / "base.bin"
    base.write_bytes(b"_logits_" + struct.pack("<Iii", 512, 49152, 16) + b"\0" * 64)
    assert kl_base_header(base) == (512, 49152, 16)
    bad = tmp_path / "bad.bin"
    bad.write_bytes(b"GGUF" + b"\0" * 40)
    with pytest.raises(ConfigError, match="bad.bin"):
        kl_base_header(bad)


def test_missing_inputs_are_named(tmp_path):
    tools = object()  # never reached
    with pytest.raises(ConfigError, match="nope.gguf"):
        llama_perplexity(tmp_path / "nope.gguf", tmp_path / "t.txt", 512, tools, progress=False)
    (tmp_path / "m.gguf").write_text("x")
    with pytest.raises(ConfigError, match="t.txt"):
        llama_perplexity(tmp_path / "m.gguf", tmp_path / "t.txt", 512, tools, progress=False)
    with pytest.raises(ConfigError, match="n_ctx"):
        llama_perplexity(tmp_path / "m.gguf", tmp_path / "t.txt", 2, tools, progress=False)


# --- real: a tiny GGUF, its quantizations, llama-perplexity ----------------------------------

@pytest.fixture(scope="module")
def tools():
    found = built_tools()
    if found is None:
        pytest.skip(f"llama.cpp tools not built in {tools_dir()} (lowbit.peers.llamacpp.ensure_llamacpp)")
    return found


def test_real_kl_orders_types_by_size(tools, tmp_path):
    reference = tmp_path / "tiny.f32.gguf"
    write_tiny_llama(reference)
    text = tmp_path / "text.txt"
    text.write_text(word_text(1000))
    base = tmp_path / "tiny.kld-base"
    ref = save_kl_base(reference, text, 64, base, tools, chunks=6, progress=False)
    assert (ref.n_ctx, ref.n_chunks, ref.n_tokens_scored) == (64, 6, 6 * 31)
    assert kl_base_header(base)[::2] == (64, 6)
    plain = llama_perplexity(reference, text, 64, tools, chunks=6, progress=False)
    assert plain.ppl == pytest.approx(ref.ppl, rel=1e-6)  # the same tokens, the same model

    same = llama_kl_divergence(reference, base, tools, progress=False)
    assert same.kl_mean < 1e-4 and same.top1_agreement == 1.0  # log-probs are stored in 16 bits
    assert same.ref_ppl == pytest.approx(ref.ppl, rel=1e-4)
    results = {}
    for qtype in ("Q8_0", "Q4_K_M", "Q2_K"):
        quant = tmp_path / f"tiny.{qtype}.gguf"
        subprocess.run([str(tools.quantize_bin), str(reference), str(quant), qtype, "1"], check=True,
                       capture_output=True)
        results[qtype] = llama_kl_divergence(quant, base, tools, progress=False)
        assert results[qtype].ref_ppl == pytest.approx(ref.ppl, rel=1e-4)
        assert results[qtype].n_tokens_scored == 6 * 31
    kl = [results[q].kl_mean for q in ("Q8_0", "Q4_K_M", "Q2_K")]
    top1 = [results[q].top1_agreement for q in ("Q8_0", "Q4_K_M", "Q2_K")]
    assert same.kl_mean < kl[0] < kl[1] < kl[2]
    assert top1[0] >= top1[1] > top1[2]
    # a cached base file is not recomputed
    assert save_kl_base(reference, text, 64, base, tools, progress=False).n_chunks == 6
