"""llama-imatrix on lowbit's calibration windows: the text it reads gives back the same token ids
(measured), the run is cached, and with the real tool the matrix covers every block weight."""

import json
import stat
import sys

import numpy as np
import pytest
import torch
from tiny_models import WORDS, word_tokenizer

from lowbit.peers.llamacpp import (
    LLAMA_CPP_PYTHON_VERSION,
    LlamaCppTools,
    built_tools,
    tools_dir,
)
from lowbit.peers.llamacpp_imatrix import (
    calibration_text,
    compute_imatrix,
    imatrix_chunks,
    write_calibration_text,
)


def _windows(vocab_ids, n, seqlen, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.tensor(vocab_ids)
    return ids[torch.randint(len(vocab_ids), (n, seqlen), generator=g)]  # [n, seqlen]


def _byte_bpe():
    """A small byte-level BPE (GPT-2 style, as SmolLM2 and Qwen2 use), trained here."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    words = ["lowbit", "quantizes", "weights", "of", "language", "models", "to", "few", "bits", "per", "weight"]
    corpus = [" ".join(words[(i * 7 + k) % len(words)] for k in range(12)) + (",." if i % 2 else ".")
              for i in range(200)]  # ",." becomes one token
    backend.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>"],
                                                            initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|endoftext|>")
    return tok, corpus


def _bos_word_tokenizer():
    """The word tokenizer of the tiny models, adding <s> first (as Llama 2 and Gemma do)."""
    from tokenizers.processors import TemplateProcessing

    tok = word_tokenizer(WORDS)
    tok.backend_tokenizer.post_processor = TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return tok


def test_whitespace_tokenizer_windows_come_back_exactly(tmp_path):
    tok = word_tokenizer(WORDS)
    samples = _windows(list(range(3, len(WORDS))), 6, 32)
    calib = write_calibration_text(tok, samples, tmp_path / "calib.txt")
    assert (calib.n_ctx, calib.n_chunks) == (32, 6)
    assert calib.agreement == 1.0 and calib.chunks_equal == 6
    torch.testing.assert_close(imatrix_chunks(tok, calib.path.read_text(), 32, 6), samples, rtol=0, atol=0)


def test_byte_level_bpe_windows_come_back_nearly_exactly(tmp_path):
    tok, corpus = _byte_bpe()
    stream = tok("".join(corpus))["input_ids"]
    starts = torch.randint(0, len(stream) - 40, (8,), generator=torch.Generator().manual_seed(1))
    samples = torch.tensor([stream[s:s + 40] for s in starts.tolist()])  # windows of running text
    calib = write_calibration_text(tok, samples, tmp_path / "calib.txt")
    # a window that starts inside a word can merge with the end of the one before; the joins
    # themselves add nothing, so the chunks stay aligned
    assert calib.agreement > 0.95
    assert calib.chunks_equal >= 6


def test_a_join_the_tokenizer_cannot_miss_costs_one_token_not_the_alignment(tmp_path):
    tok, _ = _byte_bpe()

    def enc(text):
        return tok(text)["input_ids"]

    assert len(enc(",.")) == 1 and enc(" .") != enc(".")  # "" and " " both change the ids
    left = enc("lowbit quantizes weights of language models to few bits per weight,")[-10:]
    right = enc(". lowbit quantizes weights of language models to few bits per weight")[:10]
    samples = torch.tensor([left, right, left])
    calib = write_calibration_text(tok, samples, tmp_path / "calib.txt")
    chunks = imatrix_chunks(tok, calib.path.read_text(), 10, 3)
    assert (chunks != samples).sum() == 1 and chunks[1, 0] != samples[1, 0]  # "." stood in for by "\n"
    assert calib.agreement == pytest.approx(1 - 1 / 30) and calib.chunks_equal == 2


def test_bos_tokenizer_gets_bos_on_each_chunk_and_nothing_else_changes(tmp_path):
    tok = _bos_word_tokenizer()
    samples = _windows(list(range(3, len(WORDS))), 5, 16)
    samples[2, 0] = 1  # a window that starts a document starts with <s>
    calib = write_calibration_text(tok, samples, tmp_path / "calib.txt")
    chunks = imatrix_chunks(tok, calib.path.read_text(), 16, 5)
    assert (chunks[:, 0] == 1).all()
    torch.testing.assert_close(chunks[:, 1:], samples[:, 1:], rtol=0, atol=0)
    assert calib.agreement == pytest.approx(1 - 4 / (5 * 16))  # the four first tokens that were not <s>
    assert calib.chunks_equal == 1


def test_the_text_fills_every_chunk_even_if_it_shrinks():
    tok = word_tokenizer(WORDS)
    samples = _windows(list(range(3, len(WORDS))), 3, 8)
    text = calibration_text(tok, samples)
    assert len(tok(text)["input_ids"]) == 4 * 8  # the first window once more at the end
    assert imatrix_chunks(tok, text, 8, 3).shape == (3, 8)


def _fake_tools(cache):
    """Tools whose llama-imatrix writes its arguments (as JSON) to its -o file."""
    root = tools_dir(cache) / f"llama-cpp-python-{LLAMA_CPP_PYTHON_VERSION}"
    root.mkdir(parents=True)
    imatrix = root / "llama-imatrix"
    imatrix.write_text(f"#!{sys.executable}\nimport json, sys\nargs = sys.argv[1:]\n"
                       "open(args[args.index('-o') + 1], 'w').write(json.dumps(args))\n")
    imatrix.chmod(imatrix.stat().st_mode | stat.S_IXUSR)
    return LlamaCppTools(root, LLAMA_CPP_PYTHON_VERSION, root / "convert_hf_to_gguf.py", root / "llama-quantize")


def test_compute_imatrix_runs_one_chunk_per_sample_and_caches(tmp_path):
    tools = _fake_tools(tmp_path)
    reference = tmp_path / "m.f32.gguf"
    reference.write_text("model")
    calib = write_calibration_text(word_tokenizer(WORDS), _windows(list(range(3, 60)), 4, 16), tmp_path / "c.txt")
    out = compute_imatrix(reference, calib, tmp_path / "m.imatrix.gguf", tools, progress=False)
    args = json.loads(out.read_text())
    flag = {a: args[i + 1] for i, a in enumerate(args[:-1]) if a.startswith("-")}
    assert (flag["-m"], flag["-f"], flag["-c"], flag["--chunks"]) == (str(reference), str(calib.path), "16", "4")
    assert "--parse-special" in args and "--no-ppl" in args
    assert sorted(p.name for p in tmp_path.glob("*imatrix*")) == ["m.imatrix.gguf"]  # no partial left
    tools.imatrix_bin.write_text("#!/bin/sh\nexit 1\n")  # a cached file is not recomputed
    assert compute_imatrix(reference, calib, out, tools, progress=False) == out


# --- real: llama-imatrix on a tiny GGUF ------------------------------------------------------

# SentencePiece vocabulary: unk, bos, eos, the 256 byte tokens, then words "▁w0" ..
SPM_VOCAB = [*WORDS[:3], *(f"<0x{b:02X}>" for b in range(256)), *(f"\u2581{w}" for w in WORDS[3:])]


def write_tiny_llama(path, n_layer=2, n_embd=256, n_ff=512, seed=0):
    """A float32 llama GGUF with random weights and a SentencePiece vocabulary of words (SPM_VOCAB;
    " w7" is one token), small enough for llama.cpp's tools to run in a second."""
    gguf = pytest.importorskip("gguf")
    rng = np.random.default_rng(seed)
    vocab = SPM_VOCAB
    w = gguf.GGUFWriter(str(path), "llama")
    for add, value in ((w.add_block_count, n_layer), (w.add_context_length, 512), (w.add_embedding_length, n_embd),
                       (w.add_feed_forward_length, n_ff), (w.add_head_count, 8), (w.add_head_count_kv, 2),
                       (w.add_layer_norm_rms_eps, 1e-6), (w.add_rope_freq_base, 10000.0)):
        add(value)
    w.add_tokenizer_model("llama")
    w.add_token_list(vocab)
    w.add_token_scores([0.0] * len(vocab))
    w.add_token_types([2, 3, 3] + [6] * 256 + [1] * (len(vocab) - 259))  # 6: byte token
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)

    def rand(*shape, scale=0.05):
        return (rng.standard_normal(shape) * scale).astype(np.float32)

    w.add_tensor("token_embd.weight", rand(len(vocab), n_embd, scale=1.0))
    w.add_tensor("output_norm.weight", np.ones(n_embd, dtype=np.float32))
    w.add_tensor("output.weight", rand(len(vocab), n_embd, scale=0.1))
    kv = 2 * n_embd // 8
    shapes = {"attn_q": (n_embd, n_embd), "attn_k": (kv, n_embd), "attn_v": (kv, n_embd),
              "attn_output": (n_embd, n_embd), "ffn_gate": (n_ff, n_embd), "ffn_up": (n_ff, n_embd),
              "ffn_down": (n_embd, n_ff)}
    for i in range(n_layer):
        w.add_tensor(f"blk.{i}.attn_norm.weight", np.ones(n_embd, dtype=np.float32))
        w.add_tensor(f"blk.{i}.ffn_norm.weight", np.ones(n_embd, dtype=np.float32))
        for role, shape in shapes.items():
            w.add_tensor(f"blk.{i}.{role}.weight", rand(*shape))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return {f"blk.{i}.{role}.weight": shape[1] for i in range(n_layer) for role, shape in shapes.items()}


def word_text(n_words, seed=0):
    rng = np.random.default_rng(seed)
    return " ".join(WORDS[k] for k in rng.integers(3, len(WORDS), n_words))


@pytest.fixture(scope="module")
def tools():
    found = built_tools()
    if found is None:
        pytest.skip(f"llama.cpp tools not built in {tools_dir()} (lowbit.peers.llamacpp.ensure_llamacpp)")
    return found


def test_real_imatrix_covers_every_block_weight(tools, tmp_path):
    from gguf import GGUFReader

    model = tmp_path / "tiny.f32.gguf"
    widths = write_tiny_llama(model)
    text = tmp_path / "calib.txt"
    text.write_text(word_text(800))
    from lowbit.peers.llamacpp_imatrix import CalibrationText

    calib = CalibrationText(text, n_ctx=64, n_chunks=3, agreement=1.0, chunks_equal=3)
    out = compute_imatrix(model, calib, tmp_path / "tiny.imatrix.gguf", tools, progress=False)
    reader = GGUFReader(out)
    sums = {t.name.removesuffix(".in_sum2"): t for t in reader.tensors if t.name.endswith(".in_sum2")}
    counts = {t.name.removesuffix(".counts"): t for t in reader.tensors if t.name.endswith(".counts")}
    assert set(sums) == set(widths) == set(counts)
    for name, width in widths.items():
        assert sums[name].data.size == width and (np.asarray(sums[name].data) > 0).all()
        assert float(np.asarray(counts[name].data).ravel()[0]) == 3 * 64  # every token of 3 chunks of 64
