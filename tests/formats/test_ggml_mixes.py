"""llama.cpp's mixes as data (formats.ggml.mixes): rules read from llama.cpp's quantizer, then the
whole table checked against llama-quantize itself on small GGUFs (when the tools are built)."""

import subprocess

import numpy as np
import pytest

from lowbit.errors import ConfigError
from lowbit.formats.ggml.mixes import MIXES, fallback_type, tensor_type

BLOCK_ROLES = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")


def _types(mix, role, n_layer, **kw):
    return [tensor_type(mix, f"blk.{i}.{role}.weight", n_layer, **kw) for i in range(n_layer)]


# --- rules stated from llama.cpp's source ----------------------------------------------------

def test_q4_k_m_gives_q6_k_to_attn_v_and_ffn_down_in_the_first_and_last_eighth_and_every_third():
    more = {0, 1, 4, 7, 10, 13, 14, 15}  # 16 layers: i < 2, i >= 14, (i - 2) % 3 == 2
    for role in ("attn_v", "ffn_down"):
        assert _types("Q4_K_M", role, 16) == ["Q6_K" if i in more else "Q4_K" for i in range(16)]
    for role in ("attn_q", "attn_k", "attn_output", "ffn_gate", "ffn_up"):
        assert set(_types("Q4_K_M", role, 16)) == {"Q4_K"}


def test_q3_k_m_and_q4_k_s_raise_the_first_layers():
    assert _types("Q3_K_M", "attn_v", 8) == ["Q5_K"] * 2 + ["Q4_K"] * 6
    assert _types("Q3_K_M", "ffn_down", 32) == ["Q5_K"] * 2 + ["Q4_K"] * 30  # i < n/16
    assert set(_types("Q3_K_M", "attn_output", 8)) == {"Q4_K"}
    assert set(_types("Q3_K_M", "attn_q", 8)) == {"Q3_K"}
    assert _types("Q4_K_S", "attn_v", 8) == ["Q5_K"] * 4 + ["Q4_K"] * 4
    assert _types("Q4_K_S", "ffn_down", 16) == ["Q5_K"] * 2 + ["Q4_K"] * 14  # i < n/8


def test_grouped_query_attention_raises_attn_v():
    assert set(_types("Q2_K", "attn_v", 4, n_gqa=4)) == {"Q4_K"}
    assert set(_types("Q2_K", "attn_v", 4, n_gqa=2)) == {"Q3_K"}
    assert set(_types("IQ4_XS", "attn_v", 4, n_gqa=8)) == {"Q5_K"}
    assert set(_types("IQ4_XS", "attn_v", 4, n_gqa=1)) == {"IQ4_XS"}
    assert set(_types("IQ2_XXS", "attn_v", 4, n_gqa=4)) == {"Q4_K"}
    assert set(_types("IQ2_XXS", "attn_v", 4, n_gqa=1)) == {"Q2_K"}


def test_an_importance_matrix_changes_some_choices():
    assert tensor_type("Q4_0", "blk.0.ffn_down.weight", 16) == "Q4_0"
    assert tensor_type("Q4_0", "blk.0.ffn_down.weight", 16, has_imatrix=True) == "Q4_1"
    assert tensor_type("Q5_0", "blk.1.ffn_down.weight", 16, has_imatrix=True) == "Q5_1"
    assert tensor_type("Q5_0", "blk.2.ffn_down.weight", 16, has_imatrix=True) == "Q5_0"
    assert tensor_type("IQ4_NL", "blk.0.ffn_down.weight", 16) == "Q5_K"
    assert tensor_type("IQ4_NL", "blk.0.ffn_down.weight", 16, has_imatrix=True) == "IQ4_NL"
    assert tensor_type("IQ3_XXS", "blk.3.attn_v.weight", 8) == "IQ3_S"
    assert tensor_type("IQ3_XXS", "blk.3.attn_v.weight", 8, has_imatrix=True) == "IQ3_XXS"


def test_70b_models_get_q5_k_attn_v():
    assert set(_types("Q3_K_S", "attn_v", 80, arch="qwen2")) == {"Q5_K"}
    assert set(_types("Q3_K_S", "attn_v", 80, arch="llama", n_gqa=8)) == {"Q5_K"}
    assert set(_types("Q3_K_S", "attn_v", 80, arch="llama", n_gqa=1)) == {"Q3_K"}  # llama.cpp's "65B"
    assert set(_types("Q3_K_S", "attn_q", 80, arch="qwen2")) == {"Q3_K"}


def test_output_head_and_embeddings():
    for mix in MIXES:
        expected = {"Q8_0": "Q8_0", "IQ2_XXS": "Q5_K", "IQ2_XS": "Q5_K", "IQ2_S": "Q5_K", "IQ2_M": "Q5_K",
                    "IQ3_XXS": "Q5_K"}.get(mix, "Q6_K")
        assert tensor_type(mix, "output.weight", 4) == expected
        assert tensor_type(mix, "token_embd.weight", 4, tied_output=True) == expected
    assert tensor_type("Q4_K_M", "token_embd.weight", 4) == "Q4_K"  # untied: the default type
    assert tensor_type("IQ2_XS", "token_embd.weight", 4) == "Q2_K"
    # rows that a K type cannot hold: the head goes to Q8_0 (not the generic fallback)
    assert tensor_type("Q4_K_M", "output.weight", 4, row_width=576) == "Q8_0"
    assert tensor_type("Q3_K_S", "token_embd.weight", 4, tied_output=True, row_width=576) == "Q8_0"
    assert tensor_type("Q4_0", "output.weight", 4, row_width=100) == "F16"


def test_fallback_for_rows_that_do_not_fit():
    table = {"Q2_K": "Q4_0", "Q3_K": "Q4_0", "Q4_K": "Q5_0", "Q5_K": "Q5_1", "Q6_K": "Q8_0",
             "IQ4_XS": "IQ4_NL", "IQ2_XXS": "IQ4_NL", "IQ3_S": "IQ4_NL", "Q4_0": "F16", "IQ4_NL": "F16"}
    for t, fb in table.items():
        assert fallback_type(t) == fb
        assert fallback_type(t, 1024) == t  # rows that fit keep their type
        assert fallback_type(t, 100) == "F16"  # not even a 32-block type fits
    assert fallback_type("Q4_K", 576) == "Q5_0"
    # smollm2's rows of 576 under Q4_K_M: attn_q falls back, ffn_down (rows of 1536) keeps k-quants
    assert tensor_type("Q4_K_M", "blk.5.attn_q.weight", 30, row_width=576) == "Q5_0"
    assert tensor_type("Q4_K_M", "blk.0.ffn_down.weight", 30, row_width=1536) == "Q6_K"


def test_bad_names_and_mixes_are_refused():
    with pytest.raises(ConfigError, match="Q9_K"):
        tensor_type("Q9_K", "output.weight", 4)
    with pytest.raises(ConfigError, match="attn_norm"):
        tensor_type("Q4_K_M", "blk.0.attn_norm.weight", 4)
    with pytest.raises(ConfigError, match="blk.7"):
        tensor_type("Q4_K_M", "blk.7.attn_v.weight", 4)
    with pytest.raises(ConfigError, match="Q7"):
        fallback_type("Q7")
    assert tensor_type("q4_k_m", "blk.0.attn_q.weight", 4) == "Q4_K"


# --- against llama-quantize --------------------------------------------------------------------

# (arch, n_layer, n_embd, n_ff, n_head, n_head_kv, tied): every width a multiple of 256 but
# qwen2's ffn_down rows (288) and the third model's n_embd (288), which exercise the fallback
SHAPES = {
    "llama-gqa4": ("llama", 16, 256, 512, 8, 2, False),
    "qwen2-tied": ("qwen2", 8, 256, 288, 4, 2, True),
    "llama-narrow": ("llama", 4, 288, 512, 9, 3, True),
}


ROWS = 32  # output rows of every block weight: the choice of type reads only names and row widths


def _write_model(path, arch, n_layer, n_embd, n_ff, n_head, n_kv, tied):
    """A float32 GGUF of that shape for llama-quantize, which reads the hyperparameters and each
    tensor's name and row width (ne[0]) but never builds the model: the block weights get only
    ROWS rows each, to keep the i-quants' searches short. Returns {block weight: row width}."""
    gguf = pytest.importorskip("gguf")
    rng = np.random.default_rng(0)
    vocab = ["<unk>", "<s>", "</s>", *(f"w{i}" for i in range(61))]
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(n_layer)
    w.add_context_length(256)
    w.add_embedding_length(n_embd)
    w.add_feed_forward_length(n_ff)
    w.add_head_count(n_head)
    w.add_head_count_kv(n_kv)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_rope_freq_base(10000.0)
    w.add_tokenizer_model("llama")
    w.add_token_list(vocab)
    w.add_token_scores([0.0] * len(vocab))
    w.add_token_types([2, 3, 3] + [1] * (len(vocab) - 3))

    def add(name, rows, width):
        w.add_tensor(name, rng.standard_normal((rows, width)).astype(np.float32) * 0.05)

    add("token_embd.weight", len(vocab), n_embd)
    w.add_tensor("output_norm.weight", np.ones(n_embd, dtype=np.float32))
    if not tied:
        add("output.weight", len(vocab), n_embd)
    widths = {role: n_ff if role == "ffn_down" else n_embd for role in BLOCK_ROLES}
    for i in range(n_layer):
        w.add_tensor(f"blk.{i}.attn_norm.weight", np.ones(n_embd, dtype=np.float32))
        w.add_tensor(f"blk.{i}.ffn_norm.weight", np.ones(n_embd, dtype=np.float32))
        for role, width in widths.items():
            add(f"blk.{i}.{role}.weight", ROWS, width)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return {f"blk.{i}.{role}.weight": width for i in range(n_layer) for role, width in widths.items()}


def _write_imatrix(path, widths):
    """A synthetic importance matrix in llama-imatrix's GGUF layout: per weight, the sums of
    squared activations per input feature (in_sum2) and how many tokens they summed (counts)."""
    import gguf

    rng = np.random.default_rng(1)
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_string("general.type", "imatrix")
    w.add_array("imatrix.datasets", ["synthetic"])
    w.add_uint32("imatrix.chunk_count", 1)
    w.add_uint32("imatrix.chunk_size", 64)
    for name, width in widths.items():
        w.add_tensor(f"{name}.in_sum2", (rng.random((1, width)) + 0.1).astype(np.float32))
        w.add_tensor(f"{name}.counts", np.full((1, 1), 64.0, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.fixture(scope="module")
def quantize_bin():
    from lowbit.peers.llamacpp import built_tools, tools_dir

    tools = built_tools()
    if tools is None:
        pytest.skip(f"llama.cpp tools not built in {tools_dir()} (lowbit.peers.llamacpp.ensure_llamacpp)")
    return tools.quantize_bin


# Quantizing to IQ2_XXS/XS/S and IQ3_XXS first builds search tables for their grids, seconds per
# process: each of the mixes that use them runs on one of the models, the others on all three.
SLOW_MIXES = {"IQ2_XXS": "qwen2-tied", "IQ2_XS": "llama-gqa4", "IQ2_S": "qwen2-tied", "IQ2_M": "llama-gqa4",
              "IQ3_XXS": "qwen2-tied", "IQ3_XS": "llama-gqa4"}
# the mixes whose rules read whether there is an importance matrix (besides those that need one)
IMATRIX_RULES = ("Q4_0", "Q5_0", "IQ4_NL", "IQ4_XS")


def _runs(shape):
    """(mix, with an importance matrix) pairs to quantize the model `shape` with."""
    from lowbit.peers.llamacpp import NEEDS_IMATRIX

    mixes = [m for m in MIXES if SLOW_MIXES.get(m, shape) == shape]
    return [(m, im) for m in mixes for im in (False, True)
            if (im or m not in NEEDS_IMATRIX) and (not im or m in NEEDS_IMATRIX or m in IMATRIX_RULES)]


@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_tensor_type_is_what_llama_quantize_chooses(shape, quantize_bin, tmp_path):
    from gguf import GGUFReader

    arch, n_layer, n_embd, n_ff, n_head, n_kv, tied = SHAPES[shape]
    model = tmp_path / "model.f32.gguf"
    widths = _write_model(model, arch, n_layer, n_embd, n_ff, n_head, n_kv, tied)
    imatrix = tmp_path / "imatrix.gguf"
    _write_imatrix(imatrix, widths)
    wrong = []
    for mix, with_imatrix in _runs(shape):
        out = tmp_path / f"{mix}.{with_imatrix}.gguf"
        cmd = [str(quantize_bin), *(["--imatrix", str(imatrix)] if with_imatrix else []), str(model), str(out),
               mix, "1"]
        done = subprocess.run(cmd, capture_output=True, text=True, check=False)
        assert done.returncode == 0, f"{mix}: {done.stderr[-2000:]}"
        for t in GGUFReader(out).tensors:
            if len(t.shape) != 2:
                continue
            want = tensor_type(mix, t.name, n_layer, n_gqa=n_head // n_kv, tied_output=tied,
                               has_imatrix=with_imatrix, row_width=int(t.shape[0]), arch=arch)
            if t.tensor_type.name != want:
                wrong.append(f"{mix} imatrix={with_imatrix} {t.name}: llama.cpp {t.tensor_type.name}, ours {want}")
        out.unlink()
    assert not wrong, "\n".join(wrong[:40])


def test_every_mix_runs_on_some_model():
    runs = {run for shape in SHAPES for run in _runs(shape)}
    assert {m for m, _ in runs} == set(MIXES)
    assert {m for m, im in runs if im} >= set(IMATRIX_RULES)
