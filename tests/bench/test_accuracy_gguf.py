"""The GGUF views of the accuracy section: same-mix comparison and the per-family KL fronts."""

from __future__ import annotations

import itertools

from rendered import markdown_table, number

from lowbit.bench.accuracy_gguf import family_fronts, plot_gguf_kl, same_type_table


def row(method, setting, bpw, kl):
    return {"model": "m", "method": method, "setting": setting, "bits_per_weight": bpw,
            "datasets": {"wikitext2": {"ppl": 20.0, "kl": kl, "top1": 0.9}}}


ROWS = [row("llamacpp", "Q3_K_M", 3.9, 0.20), row("llamacpp-imatrix", "Q3_K_M", 3.9, 0.10),
        row("gguf-rtn", "Q3_K_M", 3.9, 0.15), row("gguf-gptq", "Q3_K_M", 3.9, 0.08),
        row("llamacpp-imatrix", "Q2_K", 3.0, 0.40), row("gguf-gptq", "Q2_K", 3.0, 0.50),
        row("llamacpp-imatrix", "IQ4_XS", 4.4, 0.05),  # no lowbit file of this mix: no table row
        row("gguf-budget", "3.5bpw", 3.5, 0.12), row("gguf-budget", "3.6bpw", 3.6, 0.13)]


def test_same_type_table_compares_lowbit_best_with_the_imatrix_file_of_each_mix():
    table = {r["mix"]: r for r in markdown_table("\n".join(same_type_table(ROWS, "wikitext2")))}
    assert set(table) == {"Q3_K_M", "Q2_K"}
    assert number(table["Q3_K_M"]["lowbit / imatrix"]) == 0.8  # gptq's 0.08 over 0.10
    assert number(table["Q2_K"]["lowbit / imatrix"]) == 1.25
    assert table["Q2_K"]["llama-quantize"] == "-"  # not measured without an imatrix at Q2_K
    assert same_type_table([r for r in ROWS if r["method"] != "llamacpp-imatrix"], "wikitext2") == []


def test_fronts_keep_only_rows_no_smaller_row_of_the_family_beats():
    fronts = family_fronts(ROWS, "wikitext2")
    assert [s for _, _, s in fronts["gguf-budget"]] == ["3.5bpw"]  # 3.6 bpw is larger and worse
    assert [s for _, _, s in fronts["llamacpp-imatrix"]] == ["Q2_K", "Q3_K_M", "IQ4_XS"]
    for front in fronts.values():
        assert all(a[0] < b[0] and a[1] > b[1] for a, b in itertools.pairwise(front))


def test_plot_is_written_with_two_families_or_more(tmp_path):
    path = plot_gguf_kl("m", ROWS, "wikitext2", tmp_path)
    assert path is not None and path.stat().st_size > 0
    assert plot_gguf_kl("m", [r for r in ROWS if r["method"] == "llamacpp"], "wikitext2", tmp_path / "x") is None
