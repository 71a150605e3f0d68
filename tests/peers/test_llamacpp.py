"""llama.cpp peer: fast tests with fake tools, plus one real run when the tools are already built.

Nothing here builds llama.cpp. The real-model test needs `ensure_llamacpp()` to have been run
once into the same cache ($LOWBIT_CACHE), and smollm2-135m fetched there.
"""

import json
import re
import stat
import sys

import numpy as np
import pytest
import torch

from lowbit.errors import ConfigError
from lowbit.peers import llamacpp, llamacpp_build
from lowbit.peers.llamacpp import (
    LLAMA_CPP_PYTHON_VERSION,
    NEEDS_IMATRIX,
    SUPPORTED_QTYPES,
    LlamaCppError,
    LlamaCppTools,
    built_tools,
    check_qtype,
    ensure_llamacpp,
    gguf_bits_per_weight,
    quantize_with_llamacpp,
    tools_dir,
)

gguf = pytest.importorskip("gguf")


def _fake_tools(cache, version=LLAMA_CPP_PYTHON_VERSION):
    """A tools folder as ensure_llamacpp leaves it, with stand-in tools.

    The 'converter' writes its input folder's config.json to --outfile; the 'quantizer' copies
    its input and appends the type name (and the imatrix file's name, when given one), so the
    tests can see what ran on what.
    """
    root = tools_dir(cache) / f"llama-cpp-python-{version}"
    root.mkdir(parents=True)
    script = root / "convert_hf_to_gguf.py"
    script.write_text(
        "import shutil, sys\n"
        "args = sys.argv[1:]\n"
        "shutil.copy(args[0] + '/config.json', args[args.index('--outfile') + 1])\n"
        "assert args[args.index('--outtype') + 1] == 'f32'\n"
    )
    binary = root / "llama-quantize"
    binary.write_text(f'#!{sys.executable}\nimport os, sys, shutil\n'
                      "args = sys.argv[1:]\n"
                      "im = args[1] if args[0] == '--imatrix' else None\n"
                      "args = args[2:] if im else args\n"
                      "shutil.copy(args[0], args[1])\n"
                      "open(args[1], 'a').write(args[2] + (' imatrix ' + os.path.basename(im) if im else ''))\n")
    binary.chmod(binary.stat().st_mode | stat.S_IXUSR)
    for other in ("llama-bench", "llama-imatrix", "llama-perplexity"):
        (root / other).write_text("#!/bin/sh\nexit 0\n")
    (root / "lowbit-llamacpp.json").write_text(json.dumps({"llama_cpp_python": version}))
    return LlamaCppTools(root, version, script, binary)


def _hf_folder(tmp_path):
    folder = tmp_path / "tiny-hf"
    folder.mkdir()
    (folder / "config.json").write_text('{"model_type": "llama"}')
    return folder


# --- qtype validation ------------------------------------------------------------------------

def test_check_qtype_accepts_known_names_any_case():
    assert check_qtype("q4_k_m") == "Q4_K_M"
    assert check_qtype("Q2_K") == "Q2_K"
    assert check_qtype("iq4_xs") == "IQ4_XS"
    assert all(check_qtype(t, imatrix=True) == t for t in SUPPORTED_QTYPES)


@pytest.mark.parametrize("bad", ["Q9_0", "IQ1_S", "q4km", "", None])
def test_check_qtype_rejects_others(bad):
    with pytest.raises(ConfigError, match="Q4_K_M"):
        check_qtype(bad)


@pytest.mark.parametrize("qtype", NEEDS_IMATRIX)
def test_low_bit_i_quants_need_an_importance_matrix(qtype):
    with pytest.raises(ConfigError, match=f"llamacpp-imatrix:{qtype}"):
        check_qtype(qtype.lower())
    assert {"IQ2_XXS", "IQ3_XXS", "IQ3_M", "Q2_K_S"} <= set(NEEDS_IMATRIX)
    assert not {"IQ4_XS", "IQ4_NL", "Q2_K", "Q3_K_S"} & set(NEEDS_IMATRIX)


def test_quantize_rejects_bad_qtype_before_running_anything(tmp_path):
    tools = _fake_tools(tmp_path)
    with pytest.raises(ConfigError, match="'Q9_K'"):
        quantize_with_llamacpp(_hf_folder(tmp_path), "Q9_K", tmp_path / "out", tools)
    assert not (tmp_path / "out").exists()


def test_quantize_needs_a_hf_folder(tmp_path):
    with pytest.raises(ConfigError, match="config.json"):
        quantize_with_llamacpp(tmp_path, "Q4_K_M", tmp_path / "out", _fake_tools(tmp_path))


# --- convert + quantize flow with stand-in tools --------------------------------------------

def test_quantize_runs_convert_then_quantize_and_caches(tmp_path):
    tools, folder, out = _fake_tools(tmp_path), _hf_folder(tmp_path), tmp_path / "out"
    q4 = quantize_with_llamacpp(folder, "q4_k_m", out, tools, progress=False)
    assert q4 == out / "tiny-hf.Q4_K_M.gguf"
    assert q4.read_text() == '{"model_type": "llama"}Q4_K_M'
    assert (out / "tiny-hf.f32.gguf").is_file()  # kept for the next type
    assert sorted(p.name for p in out.iterdir()) == ["tiny-hf.Q4_K_M.gguf", "tiny-hf.f32.gguf"]

    # cached by name: the tools are not run again
    tools.quantize_bin.write_text("#!/bin/sh\nexit 1\n")
    assert quantize_with_llamacpp(folder, "Q4_K_M", out, tools, progress=False) == q4
    # a new type reuses the f32 file but runs the (now failing) quantizer, leaving no partial
    with pytest.raises(LlamaCppError, match="llama-quantize"):
        quantize_with_llamacpp(folder, "Q2_K", out, tools, progress=False)
    assert sorted(p.name for p in out.iterdir()) == ["tiny-hf.Q4_K_M.gguf", "tiny-hf.f32.gguf"]


def test_quantize_with_an_importance_matrix(tmp_path):
    tools, folder, out = _fake_tools(tmp_path), _hf_folder(tmp_path), tmp_path / "out"
    imatrix = tmp_path / "tiny-hf.imatrix-c4-s0-8x64.gguf"
    with pytest.raises(ConfigError, match="imatrix"):
        quantize_with_llamacpp(folder, "IQ3_XXS", out, tools, progress=False)  # needs one
    with pytest.raises(ConfigError, match=imatrix.name):
        quantize_with_llamacpp(folder, "IQ3_XXS", out, tools, progress=False, imatrix=imatrix)  # missing
    imatrix.write_text("synthetic")
    got = quantize_with_llamacpp(folder, "iq3_xxs", out, tools, progress=False, imatrix=imatrix)
    assert got == out / "tiny-hf.IQ3_XXS.imatrix-c4-s0-8x64.gguf"
    assert got.read_text() == '{"model_type": "llama"}IQ3_XXS imatrix ' + imatrix.name
    # with and without an imatrix are two files
    plain = quantize_with_llamacpp(folder, "Q4_K_M", out, tools, progress=False)
    weighted = quantize_with_llamacpp(folder, "Q4_K_M", out, tools, progress=False, imatrix=imatrix)
    assert plain != weighted and plain.read_text().endswith("Q4_K_M")


# --- bits per weight -------------------------------------------------------------------------

def _write_gguf(path):
    """A GGUF with two block linears (Q8_0 and F16) and tensors the count must leave out."""
    rng = np.random.default_rng(0)
    writer = gguf.GGUFWriter(path, "llama")
    q = gguf.quants.quantize(rng.standard_normal((64, 128)).astype(np.float32),
                             gguf.GGMLQuantizationType.Q8_0)
    writer.add_tensor("blk.0.attn_q.weight", q, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    writer.add_tensor("blk.0.ffn_down.weight", rng.standard_normal((32, 64)).astype(np.float16))
    writer.add_tensor("blk.0.attn_norm.weight", np.ones(128, dtype=np.float32))
    writer.add_tensor("token_embd.weight", np.zeros((16, 128), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def test_bits_per_weight_counts_only_block_linears(tmp_path):
    path = tmp_path / "fake.gguf"
    _write_gguf(path)
    bpw, types = gguf_bits_per_weight(path)
    q8_elems, f16_elems = 64 * 128, 32 * 64
    expected = (q8_elems * 34 / 32 * 8 + f16_elems * 16) / (q8_elems + f16_elems)  # Q8_0: 34 B/32
    assert bpw == pytest.approx(expected)
    assert types == {"Q8_0": 1, "F16": 1}


def test_bits_per_weight_without_block_linears_is_an_error(tmp_path):
    path = tmp_path / "empty.gguf"
    writer = gguf.GGUFWriter(path, "llama")
    writer.add_tensor("token_embd.weight", np.zeros((16, 128), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ConfigError, match=re.escape(str(path))):
        gguf_bits_per_weight(path)


def _write_tensors(path, tensors):
    writer = gguf.GGUFWriter(path, "llama")
    for name, (data, qtype) in tensors.items():
        if qtype is None:
            writer.add_tensor(name, data)
        else:
            writer.add_tensor(name, gguf.quants.quantize(data, qtype), raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def test_tensors_on_reference_counts_those_that_land_back_on_its_values(tmp_path):
    """A reference whose weight is a dequantized Q8_0 tensor: re-quantizing it to Q8_0 gives its
    values back exactly, a 4-bit type does not, and neither does Q8_0 of a weight off that grid."""
    from lowbit.peers.llamacpp import tensors_on_reference

    rng = np.random.default_rng(0)
    Q8, Q4 = gguf.GGMLQuantizationType.Q8_0, gguf.GGMLQuantizationType.Q4_0
    on_grid = gguf.quants.dequantize(gguf.quants.quantize(rng.standard_normal((8, 64)).astype(np.float32), Q8), Q8)
    off_grid = rng.standard_normal((8, 64)).astype(np.float32)
    ref = tmp_path / "ref.f32.gguf"
    _write_tensors(ref, {"blk.0.attn_q.weight": (on_grid, None), "blk.0.attn_k.weight": (on_grid, None),
                         "blk.0.ffn_up.weight": (off_grid, None)})
    quant = tmp_path / "q.gguf"
    _write_tensors(quant, {"blk.0.attn_q.weight": (on_grid, Q8), "blk.0.attn_k.weight": (on_grid, Q4),
                           "blk.0.ffn_up.weight": (off_grid, Q8)})
    assert tensors_on_reference(quant, ref) == (1, 3)
    other = tmp_path / "other.gguf"
    _write_tensors(other, {"blk.0.attn_v.weight": (on_grid, Q8)})
    with pytest.raises(ConfigError, match="attn_v"):
        tensors_on_reference(other, ref)


# --- building: cached path and missing prerequisites -----------------------------------------

def _no_build(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("ensure_llamacpp tried to download or build")

    monkeypatch.setattr(llamacpp_build, "_download_sdist", refuse)
    monkeypatch.setattr(llamacpp_build, "_build_tools", refuse)


def test_tools_dir_follows_the_cache(tmp_path, monkeypatch):
    assert tools_dir(tmp_path) == tmp_path / "llamacpp"
    monkeypatch.setenv("LOWBIT_CACHE", str(tmp_path / "env"))
    assert tools_dir() == tmp_path / "env" / "llamacpp"


def test_ensure_returns_built_tools_at_once(tmp_path, monkeypatch):
    _no_build(monkeypatch)
    fake = _fake_tools(tmp_path)
    assert ensure_llamacpp(cache=tmp_path, progress=False) == fake
    assert built_tools(tmp_path) == fake
    assert built_tools(tmp_path, version="0.0.1") is None  # another version is not built
    assert fake.imatrix_bin.is_file() and fake.perplexity_bin.is_file() and fake.bench_bin.is_file()


def test_a_folder_missing_a_tool_is_not_built(tmp_path):
    fake = _fake_tools(tmp_path)
    fake.perplexity_bin.unlink()  # built before llama-perplexity was one of the targets
    assert built_tools(tmp_path) is None


def test_folder_without_record_is_not_built(tmp_path, monkeypatch):
    fake = _fake_tools(tmp_path)
    (fake.root / "lowbit-llamacpp.json").unlink()  # as after an interrupted copy
    assert built_tools(tmp_path) is None
    monkeypatch.setattr(llamacpp_build.shutil, "which", lambda *a, **k: None)
    with pytest.raises(LlamaCppError, match="pip install cmake"):
        ensure_llamacpp(cache=tmp_path, progress=False)


def test_the_log_flush_is_added_to_llama_perplexity_once(tmp_path):
    source = tmp_path / "llama.cpp"
    tool = source / "tools" / "perplexity" / "perplexity.cpp"
    tool.parent.mkdir(parents=True)
    body = "    LOG(\"\\n\");\n    common_memory_breakdown_print(ctx);\n\n    llama_backend_free();\n    return 0;\n}\n"
    tool.write_text(body)
    assert llamacpp_build._patch_sources(source, progress=False) == ["tools/perplexity/perplexity.cpp"]
    lines = tool.read_text().splitlines()
    flush = lines.index(next(line for line in lines if "common_log_flush(common_log_main());" in line))
    assert lines[flush - 1].strip() == "common_memory_breakdown_print(ctx);"
    assert lines[flush + 2].strip() == "llama_backend_free();"
    assert len(lines) == len(body.splitlines()) + 1
    tool.write_text("int main() { return 0; }\n")  # another llama.cpp: left as it is
    assert llamacpp_build._patch_sources(source, progress=False) == []
    assert tool.read_text() == "int main() { return 0; }\n"


def test_missing_compiler_is_named(tmp_path, monkeypatch):
    monkeypatch.setattr(llamacpp_build, "_find_cmake", lambda: "/usr/bin/cmake")
    monkeypatch.setattr(llamacpp_build.shutil, "which", lambda *a, **k: None)
    monkeypatch.delenv("CXX", raising=False)
    with pytest.raises(LlamaCppError, match="C\\+\\+17 compiler"):
        ensure_llamacpp(cache=tmp_path, progress=False)
    assert not tools_dir(tmp_path).exists() or not any(tools_dir(tmp_path).iterdir())


# --- real: llama.cpp's Q4_K_M of smollm2-135m ------------------------------------------------

@pytest.mark.real_model
def test_real_q4_k_m_of_smollm2():
    from lowbit.models import is_present, load_model, resolve_model
    from lowbit.models.convert import ensure_converted

    tools = built_tools()
    if tools is None:
        pytest.skip(f"llama.cpp tools not built in {tools_dir()}; build them once with "
                    "`python -c 'from lowbit.peers.llamacpp import ensure_llamacpp; "
                    "ensure_llamacpp()'` (several minutes)")
    if not is_present("smollm2-135m"):
        pytest.skip("smollm2-135m is not in the cache; `lowbit models --fetch smollm2-135m`")
    source = resolve_model("smollm2-135m", fetch=False, progress=False)
    folder = ensure_converted(source.path, source.sha256, progress=False)

    gguf_path = quantize_with_llamacpp(folder, "Q4_K_M", tools_dir() / "quants", tools,
                                       progress=False)
    quant = llamacpp.load_llamacpp_quant(gguf_path, progress=False)
    assert 4.3 < quant.bits_per_weight < 6.0
    # smollm2's rows of 576 are not a multiple of 256: those tensors fall back to Q5_0 / Q8_0,
    # only ffn_down (rows of 1536) holds k-quants
    assert "Q4_K" in quant.tensor_types
    assert set(quant.tensor_types) <= {"Q4_K", "Q5_K", "Q6_K", "Q5_0", "Q8_0"}

    reference = load_model(str(folder), progress=False)
    text = "The quick brown fox jumps over the lazy dog. def f(x): return x ** 2"
    ids = reference.tokenizer(text, return_tensors="pt").input_ids
    assert quant.tokenizer(text, return_tensors="pt").input_ids.tolist() == ids.tolist()
    with torch.no_grad():
        ref = reference.model(ids).logits
        got = quant.model(ids).logits
    assert got.shape == ref.shape and torch.isfinite(got).all()
    # close to the reference, but really quantized
    rel = float((got - ref).norm() / ref.norm())
    assert 0.0 < rel < 0.5
