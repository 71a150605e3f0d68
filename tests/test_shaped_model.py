"""benchmarks/make_shaped_model.py: a model of a given shape, drawn to match a source's statistics,
written as a Hugging Face folder that transformers and lowbit load."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from tiny_models import CHAT_WORDS, FOLDER_POSITIONS, build_tiny, save_tiny_folder

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "make_shaped_model.py"
_spec = importlib.util.spec_from_file_location("make_shaped_model", SCRIPT)
msm = importlib.util.module_from_spec(_spec)
sys.modules["make_shaped_model"] = msm
_spec.loader.exec_module(msm)

# a small target: wider and deeper than the source (3 layers from 2), vocabulary above the tokenizer's
SHAPE = {"model_type": "qwen2", "hidden_size": 96, "intermediate_size": 160, "num_hidden_layers": 3,
         "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 80, "tie_word_embeddings": False,
         "max_position_embeddings": FOLDER_POSITIONS}
LAYER_SCALE = (1.0, 4.0)   # source layer i's matrices are LAYER_SCALE[i] times the init
OUTLIER = 8.0              # rows 0 and 1 of the source's layer-0 q_proj are this much larger


def _source_model(arch: str = "qwen2"):
    """A tiny model whose statistics differ by layer and kind: scaled layers, outlier rows, norms
    and biases that are not their init constants."""
    model = build_tiny(arch, seed=0, tie=False, vocab=len(CHAT_WORDS), max_positions=FOLDER_POSITIONS)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            kind, layer = msm.split_name(name)
            if "norm" in kind:
                p.copy_(1.0 + (layer or 0) + 0.2 * torch.randn(p.shape, generator=gen))
            elif kind.endswith(".bias"):
                p.copy_(0.05 * torch.randn(p.shape, generator=gen))
            elif layer is not None:
                p.mul_(LAYER_SCALE[layer])
        model.model.layers[0].self_attn.q_proj.weight[:2] *= OUTLIER
    return model


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    return save_tiny_folder(tmp_path_factory.mktemp("src") / "tiny", model=_source_model())


@pytest.fixture(scope="module")
def shaped(source, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("out") / "shaped"
    return msm.make_shaped_model(source, SHAPE, out, dtype=torch.bfloat16, seed=0, shard_bytes=40_000,
                                 log=lambda _: None)


def _tensors(folder: Path) -> dict[str, torch.Tensor]:
    found = {}
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(file, framework="pt") as f:
            names = f.keys()
            found.update({n: f.get_tensor(n).float() for n in names})
    return found


def _row_std_ratio(w: torch.Tensor) -> float:
    s = w.std(dim=1)
    return (s.max() / s.median()).item()


def test_the_folder_loads_in_transformers_and_lowbit_with_every_weight(shaped, tmp_path):
    from transformers import AutoModelForCausalLM

    from lowbit.models import load_model

    model, info = AutoModelForCausalLM.from_pretrained(shaped, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    expected = msm.target_tensors(msm.target_config(SHAPE, torch.bfloat16))
    assert {n: p.shape for n, p in model.named_parameters()} == expected
    assert model.config.hidden_size == 96 and model.config.num_hidden_layers == 3
    lm = load_model(str(shaped), cache=tmp_path, progress=False)   # the tokenizer was copied: 65 <= 80
    assert len(lm.tokenizer) <= 80
    ids = torch.tensor([[3, 17, 79]])
    logits = lm.model(ids).logits
    assert logits.shape == (1, ids.shape[1], 80) and torch.isfinite(logits).all()


def test_every_generated_tensor_matches_the_statistics_of_its_source_tensor(source, shaped):
    src, gen = _tensors(source), _tensors(shaped)
    for name, w in gen.items():
        kind, layer = msm.split_name(name)
        src_name = name if layer is None else f"model.layers.{msm.source_layer(layer, 2, 3)}.{kind}"
        s = src[src_name]
        assert w.std().item() == pytest.approx(s.std().item(), rel=0.15), name
        assert abs(w.mean().item() - s.mean().item()) < 0.1 * s.std().item() + 0.01, name


def test_depth_and_outlier_rows_carry_over(shaped):
    gen = _tensors(shaped)
    q = [gen[f"model.layers.{i}.self_attn.q_proj.weight"] for i in range(3)]
    # first to first, last to last: the last target layer has the scaled source layer's spread
    assert (q[2].std() / q[0].std()).item() > 0.5 * LAYER_SCALE[1]
    # the outlier rows of the source's layer-0 q_proj reappear in the target's, and only there
    assert _row_std_ratio(q[0]) > OUTLIER / 2
    assert _row_std_ratio(q[2]) < 1.5
    norms = [gen[f"model.layers.{i}.input_layernorm.weight"] for i in (0, 2)]
    assert norms[0].mean().item() == pytest.approx(1.0, abs=0.1)
    assert norms[1].mean().item() == pytest.approx(2.0, abs=0.1)


def test_the_same_seed_gives_the_same_bytes_and_another_seed_others(source, shaped, tmp_path):
    again = msm.make_shaped_model(source, SHAPE, tmp_path / "again", seed=0, shard_bytes=40_000, log=lambda _: None)
    other = msm.make_shaped_model(source, SHAPE, tmp_path / "other", seed=1, shard_bytes=40_000, log=lambda _: None)
    files = sorted(p.name for p in shaped.glob("*.safetensors"))
    assert files == sorted(p.name for p in again.glob("*.safetensors"))
    assert all((shaped / f).read_bytes() == (again / f).read_bytes() for f in files)
    assert all((shaped / f).read_bytes() != (other / f).read_bytes() for f in files)


def test_shards_respect_the_limit_and_the_index_lists_every_tensor(shaped):
    index = json.loads((shaped / "model.safetensors.index.json").read_text())
    shards = sorted(shaped.glob("*.safetensors"))
    assert len(shards) > 1
    held, total = {}, 0
    for file in shards:
        with safe_open(file, framework="pt") as f:
            names = f.keys()
            sizes = [f.get_tensor(n).nbytes for n in names]
            held.update(dict.fromkeys(names, file.name))
        assert sum(sizes) <= 40_000, file.name
        total += sum(sizes)
    assert index["weight_map"] == held
    assert set(held) == set(msm.target_tensors(msm.target_config(SHAPE, torch.bfloat16)))
    assert index["metadata"]["total_size"] == total


def test_an_existing_output_is_refused_and_left_alone(source, tmp_path):
    out = tmp_path / "taken"
    out.mkdir()
    (out / "mine.txt").write_text("keep")
    with pytest.raises(FileExistsError, match="already exists"):
        msm.make_shaped_model(source, SHAPE, out, log=lambda _: None)
    assert [p.name for p in out.iterdir()] == ["mine.txt"]
    with pytest.raises(SystemExit):
        msm.main(["--like", str(source), "--shape", "qwen2.5-7b", "-o", str(out)])


def test_a_failed_draw_leaves_no_folder(tmp_path):
    llama = save_tiny_folder(tmp_path / "llama", arch="llama")   # no attention biases for a qwen2 target
    with pytest.raises(ValueError, match="self_attn.q_proj.bias"):
        msm.make_shaped_model(llama, SHAPE, tmp_path / "out", log=lambda _: None)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["llama"]


def test_no_tokenizer_is_copied_when_it_does_not_fit_the_vocabulary(source, tmp_path):
    lines = []
    out = msm.make_shaped_model(source, {**SHAPE, "vocab_size": 48}, tmp_path / "small", log=lines.append)
    assert not (out / "tokenizer.json").exists() and not (out / "generation_config.json").exists()
    assert any("no tokenizer written" in line for line in lines)
    from transformers import AutoModelForCausalLM

    assert AutoModelForCausalLM.from_pretrained(out).get_input_embeddings().weight.shape == (48, 96)


def test_bad_shapes_are_refused_with_the_choices():
    with pytest.raises(ValueError, match="qwen2.5-7b"):
        msm.target_config("qwen-7b", torch.bfloat16)
    with pytest.raises(ValueError, match="model_type 'gpt2'"):
        msm.target_config({**SHAPE, "model_type": "gpt2"}, torch.bfloat16)


def test_the_built_in_shapes_have_the_published_sizes():
    for shape, billions in (("qwen2.5-7b", 7.62), ("llama-2-7b", 6.74)):
        n = sum(s.numel() for s in msm.target_tensors(msm.target_config(shape, torch.bfloat16)).values())
        assert n / 1e9 == pytest.approx(billions, abs=0.01), shape


def test_fewer_layers_keep_every_width_of_the_shape():
    full = msm.target_tensors(msm.target_config("qwen2.5-7b", torch.bfloat16))
    four = msm.target_tensors(msm.target_config(msm.with_layers("qwen2.5-7b", 4), torch.bfloat16))
    assert {n for n in full if ".layers." not in n} == {n for n in four if ".layers." not in n}
    assert {n.split(".layers.")[1].split(".", 1)[0] for n in four if ".layers." in n} == {"0", "1", "2", "3"}
    assert all(full[n] == s for n, s in four.items())  # block 3 of four is shaped as block 3 of 28
