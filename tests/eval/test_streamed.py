"""A reference evaluated one block at a time (eval/streamed.py) gives the logits, perplexity and KL
the whole model gives, with one block's weights in memory at a time."""

from __future__ import annotations

import json

import pytest
import torch
from stream_helpers import (
    own_cache,  # noqa: F401 - the module's own lowbit cache
    tiny_folder,
)

from lowbit.cli import main
from lowbit.eval import compare_to_reference
from lowbit.eval import streamed as streamed_module
from lowbit.eval.streamed import StreamedModel
from lowbit.eval.windows import window_logits
from lowbit.models import load_model
from lowbit.models.skeleton import load_skeleton
from lowbit.paths import cache_dir

SEQLEN = 24


def _tokens(n: int = 5 * SEQLEN + 7, vocab: int = 60) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    return torch.randint(3, vocab, (1, n), generator=g)


@pytest.mark.parametrize(("arch", "tie"), [("llama", True), ("qwen2", False), ("gemma3", False)])
def test_streamed_windows_are_the_whole_models_windows(tmp_path, arch, tie):
    folder = tiny_folder(tmp_path / "m", arch, tie, layers=3)
    tokens = _tokens()
    whole = list(window_logits(load_model(str(folder)).model, tokens, SEQLEN, progress=False))
    streamed = list(StreamedModel(load_skeleton(str(folder))).window_logits(tokens, SEQLEN, progress=False))
    assert len(streamed) == len(whole) == 5
    for (ids_a, a), (ids_b, b) in zip(whole, streamed):
        assert torch.equal(ids_a, ids_b)
        torch.testing.assert_close(b, a, rtol=0, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_hidden_states_kept_on_disk_give_the_same_logits(tmp_path, dtype):
    """Hidden states in a temporary file (as when they do not fit in memory): the very logits of
    hidden states kept in memory, and the file is gone afterwards."""
    folder = tiny_folder(tmp_path / "m", "llama", False, layers=3)
    tokens = _tokens()
    runs = {}
    for on_disk in (False, True):
        ref = StreamedModel(load_skeleton(str(folder), dtype), hidden_on_disk=on_disk)
        runs[on_disk] = list(ref.window_logits(tokens, SEQLEN, progress=False))
    assert all(torch.equal(a, b) for (_, a), (_, b) in zip(runs[False], runs[True]))
    assert not any((cache_dir() / "tmp").iterdir())


def test_a_streamed_reference_compares_as_the_live_one(tmp_path):
    folder = tiny_folder(tmp_path / "m", "llama", False, layers=3)
    tokens = _tokens()
    candidate = load_model(str(folder)).model
    with torch.no_grad():
        for p in candidate.parameters():
            p.add_(0.01 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    live = compare_to_reference(candidate, load_model(str(folder)).model, tokens, SEQLEN, progress=False)
    streamed = compare_to_reference(candidate, StreamedModel(load_skeleton(str(folder))), tokens, SEQLEN,
                                    progress=False)
    assert live.kl_mean > 0
    for field in ("ppl", "ref_ppl", "kl_mean", "kl_p99", "top1_agreement"):
        assert getattr(streamed, field) == pytest.approx(getattr(live, field), rel=1e-5, abs=1e-9), field


def test_one_block_is_in_memory_at_a_time(tmp_path, monkeypatch):
    folder = tiny_folder(tmp_path / "m", "llama", True, layers=4)
    sk = load_skeleton(str(folder))
    seen = []
    forward = streamed_module.forward_block

    def watching(block, *args, **kwargs):
        blocks = list(sk.model.model.layers)
        real = [j for j, b in enumerate(blocks) if any(p.device.type != "meta" for p in b.parameters())]
        seen.append((blocks.index(block), real))
        return forward(block, *args, **kwargs)

    monkeypatch.setattr(streamed_module, "forward_block", watching)
    list(StreamedModel(sk).window_logits(_tokens(), SEQLEN, progress=False))
    assert [i for i, _ in seen] == sorted(i for i, _ in seen) and {i for i, _ in seen} == {0, 1, 2, 3}
    assert all(real == [i] for i, real in seen)


def test_lowbit_eval_stream_gives_the_numbers_of_the_whole_reference(tmp_path, capsys):
    folder = tiny_folder(tmp_path / "m", "llama", False, layers=3)
    ckpt = tmp_path / "ckpt"
    assert main(["quantize", str(folder), "-o", str(ckpt), "--method", "rtn", "--bits", "3", "--group-size", "32",
                 "-q"]) == 0
    text = tmp_path / "text.txt"
    text.write_text(" ".join(f"w{(i * 7) % 61}" for i in range(400)))
    results = []
    for extra in ([], ["--stream"]):
        capsys.readouterr()
        assert main(["eval", str(ckpt), "--data", str(text), "--seqlen", "32", "--dtype", "float32", "--json", "-q",
                     *extra]) == 0
        results.append(json.loads(capsys.readouterr().out)["datasets"][str(text)])
    whole, streamed = results
    assert whole["kl_mean"] > 0
    for key in ("ppl", "ref_ppl", "kl_mean", "top1_agreement"):
        assert streamed[key] == pytest.approx(whole[key], rel=1e-5), key


def test_eval_stream_without_a_reference_is_refused(tmp_path, capsys):
    folder = tiny_folder(tmp_path / "m", "llama", True, layers=2)
    assert main(["eval", str(folder), "--stream", "--data", "c4", "-q"]) == 2
    assert "--reference" in capsys.readouterr().err
