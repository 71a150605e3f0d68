"""A checkpoint evaluated one decoder block at a time (eval/streamed_checkpoint.py, `lowbit eval
CKPT --stream`) gives the numbers of the checkpoint loaded whole, with one block of one model in
memory at a time.

Every comparison here is exact: the streamed model's parameters are the very tensors the reference
runtime computes with (the same dequantize function, the same dtype conversions), and both paths
run each window through each block on its own (batches of one), so the logits are bit for bit
the same."""

from __future__ import annotations

import json
from dataclasses import asdict

import pytest
import torch
from stream_helpers import (
    own_cache,  # noqa: F401 - the module's own lowbit cache
    tiny_folder,
)
from tiny_models import build_tiny, quantize_all, records_of

from lowbit.algorithms.rtn import rtn_quantize
from lowbit.checkpoint import QUANT_FILE, save_checkpoint
from lowbit.cli import main
from lowbit.errors import CheckpointError, ConfigError
from lowbit.eval import compare_to_reference, perplexity
from lowbit.eval import streamed as streamed_module
from lowbit.eval.evaluate import evaluate
from lowbit.eval.streamed import StreamedModel
from lowbit.eval.streamed_checkpoint import open_streamed
from lowbit.loading import load_checkpoint
from lowbit.models import load_model
from lowbit.models.skeleton import load_skeleton
from lowbit.qtensor import QuantFormat
from lowbit.runtime.qlinear import QuantLinear

SEQLEN = 24
FIELDS = ("ppl", "ref_ppl", "kl_mean", "kl_p99", "top1_agreement", "n_tokens_scored")


def _tokens(n: int = 4 * SEQLEN + 5, vocab: int = 256) -> torch.Tensor:
    return torch.randint(0, vocab, (1, n), generator=torch.Generator().manual_seed(2))


def _saved(tmp_path, arch: str):
    """A checkpoint of a tiny untied `arch` model: every decoder linear quantized (some with an
    act-order permutation, qwen2's with biases) and the head at 8 bits; and the float model."""
    model = build_tiny(arch, tie=False)
    reference = build_tiny(arch, tie=False)
    quantize_all(model)
    head = model.lm_head
    fmt = QuantFormat.resolved(head.in_features, 8, 32, False)
    model.lm_head = QuantLinear.from_quantized(rtn_quantize(head.weight.detach(), fmt))
    return save_checkpoint(records_of(model), model, None, tmp_path / "ck", {}), reference


def _text(tmp_path):
    text = tmp_path / "text.txt"
    text.write_text(" ".join(f"w{(i * 7) % 61}" for i in range(400)))
    return text


def _quantized(folder, out, *extra: str):
    assert main(["quantize", str(folder), "-o", str(out), "--method", "rtn", "--bits", "3", "--group-size", "32",
                 "-q", *extra]) == 0
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_every_tensor_is_the_one_the_reference_runtime_runs(tmp_path, arch, dtype):
    ck, _ = _saved(tmp_path, arch)
    whole = load_checkpoint(ck, dtype=dtype).model
    with open_streamed(ck, dtype) as streamed:
        names = [n for n, _ in streamed.model.named_parameters()]
        tensors = streamed.weights.get_many(names, dtype)
    assert all(p.device.type == "meta" for p in streamed.model.parameters())
    assert isinstance(whole.lm_head, QuantLinear)
    for name in names:
        layer, _, part = name.rpartition(".")
        module = whole.get_submodule(layer)
        if isinstance(module, QuantLinear) and part == "weight":
            want = module.dequantized_weight(dtype)
        else:
            want = getattr(module, part)
        assert tensors[name].dtype == want.dtype and torch.equal(tensors[name], want), name


def test_a_streamed_checkpoint_scores_as_the_whole_one(tmp_path, arch):
    ck, reference = _saved(tmp_path, arch)
    tokens = _tokens()
    whole = load_checkpoint(ck).model
    streamed = StreamedModel(open_streamed(ck))
    assert perplexity(streamed, tokens, SEQLEN, progress=False) == perplexity(whole, tokens, SEQLEN, progress=False)
    a = compare_to_reference(whole, reference, tokens, SEQLEN, progress=False)
    b = compare_to_reference(streamed, reference, tokens, SEQLEN, progress=False)
    assert a.kl_mean > 0
    assert a == b


@pytest.mark.parametrize(("arch", "tie"), [("llama", True), ("gemma3", False)])
@pytest.mark.parametrize("with_reference", [True, False])
def test_evaluate_streams_checkpoint_and_reference_to_the_whole_numbers(tmp_path, arch, tie, with_reference):
    """A tied head stays dense, an untied one is quantized (8 bits by default)."""
    folder = tiny_folder(tmp_path / "m", arch, tie, layers=3)
    ck = _quantized(folder, tmp_path / "ck")
    text = str(_text(tmp_path))
    whole = evaluate(load_checkpoint(ck, dtype=torch.float32), [text], "ck", seqlen=32, progress=False,
                     reference=load_model(str(folder)) if with_reference else None)
    with open_streamed(ck, torch.float32) as target:
        streamed = evaluate(target, [text], "ck", seqlen=32, progress=False,
                            reference=load_skeleton(str(folder), progress=False) if with_reference else None)
    assert streamed.size == whole.size
    a, b = asdict(whole.datasets[text]), asdict(streamed.datasets[text])
    assert a.pop("seconds") >= 0 and b.pop("seconds") >= 0
    assert a == b
    assert (a["kl_mean"] is not None and a["kl_mean"] > 0) == with_reference


def test_one_block_of_one_model_is_in_memory_at_a_time(tmp_path, monkeypatch):
    folder = tiny_folder(tmp_path / "m", "llama", False, layers=3)
    ck = _quantized(folder, tmp_path / "ck")
    target, reference = open_streamed(ck), load_skeleton(str(folder), progress=False)
    models = {"checkpoint": target.model, "reference": reference.model}
    seen = []
    forward = streamed_module.forward_block

    def watching(block, *args, **kwargs):
        real = {(who, j) for who, m in models.items() for j, b in enumerate(m.model.layers)
                if any(p.device.type != "meta" for p in b.parameters())}
        running = next((who, j) for who, m in models.items() for j, b in enumerate(m.model.layers) if b is block)
        outside = [who for who, m in models.items() if m.model.embed_tokens.weight.device.type != "meta"]
        seen.append((running, real, outside))
        return forward(block, *args, **kwargs)

    monkeypatch.setattr(streamed_module, "forward_block", watching)
    evaluate(target, [str(_text(tmp_path))], "ck", seqlen=32, progress=False, reference=reference)
    assert {running for running, _, _ in seen} == {(who, j) for who in models for j in range(3)}
    assert all(real == {running} for running, real, _ in seen)
    assert all(outside == [] or outside == ["checkpoint"] for _, _, outside in seen)  # its tail, while the reference runs
    assert all(p.device.type == "meta" for m in models.values() for p in m.parameters())  # all freed at the end


@pytest.mark.parametrize("reference", ["auto", "none"])
def test_lowbit_eval_stream_gives_the_json_of_the_whole_checkpoint(tmp_path, capsys, reference):
    folder = tiny_folder(tmp_path / "m", "gemma3", False, layers=3)
    ck = _quantized(folder, tmp_path / "ck")
    text = _text(tmp_path)
    results = []
    for extra in ([], ["--stream"]):
        capsys.readouterr()
        assert main(["eval", str(ck), "--data", str(text), "--seqlen", "32", "--dtype", "float32", "--json", "-q",
                     "--reference", reference, *extra]) == 0
        results.append(json.loads(capsys.readouterr().out))
    for r in results:
        r["datasets"][str(text)].pop("seconds")
    whole, streamed = results
    assert streamed == whole
    assert (whole["datasets"][str(text)]["kl_mean"] is not None) == (reference == "auto")


def _damage_a_block(ck) -> None:
    """One byte of block 1's packed codes flipped in the checkpoint's file."""
    f = ck / QUANT_FILE
    raw = bytearray(f.read_bytes())
    n = int.from_bytes(raw[:8], "little")
    start, _ = json.loads(raw[8 : 8 + n])["model.layers.1.mlp.down_proj.codes"]["data_offsets"]
    raw[8 + n + start] ^= 0xFF
    f.write_bytes(bytes(raw))


@pytest.mark.parametrize("damage", [_damage_a_block, lambda ck: (ck / QUANT_FILE).unlink()])
def test_a_damaged_or_missing_block_file_is_refused_as_when_loaded_whole(tmp_path, capsys, damage):
    folder = tiny_folder(tmp_path / "m", "llama", False, layers=2)
    ck = _quantized(folder, tmp_path / "ck")
    damage(ck)
    with pytest.raises(CheckpointError) as whole:
        load_checkpoint(ck)
    with pytest.raises(CheckpointError) as streamed:
        open_streamed(ck)
    assert str(streamed.value) == str(whole.value)
    capsys.readouterr()
    assert main(["eval", str(ck), "--stream", "--data", str(_text(tmp_path)), "--seqlen", "32", "-q"]) == 2
    assert capsys.readouterr().out == ""


@pytest.mark.parametrize(("option", "args"), [("--activations", ["--activations", "int8"]),
                                              ("--kv", ["--kv", "int4"])])
def test_what_needs_the_whole_checkpoint_is_refused_with_stream(tmp_path, capsys, option, args):
    folder = tiny_folder(tmp_path / "m", "llama", False, layers=2)
    ck = _quantized(folder, tmp_path / "ck")
    capsys.readouterr()
    assert main(["eval", str(ck), "--stream", "--data", str(_text(tmp_path)), "-q", *args]) == 2
    assert option in capsys.readouterr().err
    with open_streamed(ck) as target, pytest.raises(ConfigError):
        evaluate(target, [str(_text(tmp_path))], "ck", seqlen=32, progress=False, kv="int4")
