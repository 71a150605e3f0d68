"""A size budget over llama.cpp block types, written as a GGUF file: the file's decoder-block bytes
meet the target from below and its types are the allocation's; a target between two types mixes
them; rows that are not whole blocks take llama.cpp's 32-weight replacement; the held-out KL is no
worse than one type everywhere at the same size; impossible targets are refused with the fix."""

import gguf
import pytest
import torch
from budget_models import held_out_kl
from tiny_models import WORDS, write_tiny_gguf_of

from lowbit.budget.costs import BudgetError, stored_level
from lowbit.budget.plan import held_out_ids
from lowbit.cli import main
from lowbit.errors import ConfigError, ShapeError
from lowbit.export.gguf import gguf_names, read_types
from lowbit.formats.ggml import BLOCK_TYPES
from lowbit.formats.ggml.mixes import fallback_type
from lowbit.levels import Level
from lowbit.models import load_model
from lowbit.pipeline import quantize, target_layers
from lowbit.recipes import BLOCK_LEVELS, BudgetConfig, Recipe
from lowbit.to_gguf import quantize_to_gguf

TEXT = " ".join(WORDS[3 + (i * 7) % (len(WORDS) - 3)] for i in range(3000))
CALIB = ["--calib-data", "text.txt", "--calib-samples", "4", "--calib-seqlen", "32"]


@pytest.fixture
def env(tmp_path, monkeypatch):
    monkeypatch.setenv("LOWBIT_CACHE", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    (tmp_path / "text.txt").write_text(TEXT)
    return tmp_path


def _recipe(method: str = "rtn", **budget) -> Recipe:
    return Recipe.from_dict({"method": method, "calibration": {"dataset": "text.txt", "n_samples": 4, "seqlen": 32},
                             "budget": {"generations": 2, "offspring": 2, "search_tokens": 64, **budget}})


def _load(env, hidden: int = 256):
    write_tiny_gguf_of(env / "src.gguf", "llama", hidden=hidden)
    return load_model("src.gguf", cache=env / "cache", progress=False)


def _tensors(path) -> dict[str, tuple[str, int]]:
    """GGUF name -> (type, bytes) of every tensor in the file."""
    return {t.name: (t.tensor_type.name, int(t.n_bytes)) for t in gguf.GGUFReader(str(path)).tensors}


def test_levels_name_block_types_and_a_row_that_is_not_whole_blocks_takes_llama_cpps_replacement():
    q4k = Level.parse("q4_k")
    assert q4k == Level.of_type("Q4_K") and str(q4k) == "Q4_K" and q4k.is_block_type
    for name, bt in BLOCK_TYPES.items():  # the geometry a name says is the type's
        assert (Level.of_type(name).bits, Level.of_type(name).group_size) == ((bt.n_levels - 1).bit_length(), bt.block)
    assert Level.parse("w3g64") == Level(3, 64) and not Level(3, 64).is_block_type
    assert stored_level(q4k, 512) == q4k and stored_level(Level(3, 64), 576) == Level(3, 64)
    for name in BLOCK_LEVELS:  # 576 (smollm2's rows) is 18 blocks of 32, not whole blocks of 256
        assert str(stored_level(Level.parse(name), 576)) == fallback_type(name, 576)
    with pytest.raises(ShapeError, match="100"):
        stored_level(q4k, 100)
    for bad in ("Q9_K", "Q4_XS", "IQ4_0"):
        with pytest.raises(ConfigError, match=bad):
            Level.parse(bad)
    with pytest.raises(ConfigError, match="IQ2_XS"):  # a llama.cpp type lowbit does not write
        BudgetConfig(target_bpw=4.0, levels=("IQ2_XS", "Q4_K"))
    with pytest.raises(ConfigError, match="w3g64"):
        BudgetConfig(target_bpw=4.0, levels=("w3g64", "Q4_K"))
    block = BudgetConfig(target_bpw=4.0, levels=("Q3_K", "Q4_K"))
    assert block.block_types and Recipe.from_dict(Recipe(budget=block).to_dict()).budget == block
    assert BudgetConfig(target_bpw=4.0).on_block_types().levels == tuple(map(Level.parse, BLOCK_LEVELS))
    with pytest.raises(ConfigError, match="w3g64"):  # affine levels someone chose are not replaced
        BudgetConfig(target_bpw=4.0, levels=("w3g64", "w4g64")).on_block_types()
    with pytest.raises(ConfigError, match="Q4_K"):  # nor does a checkpoint layer take a block type
        Recipe().layer_spec("model.layers.0.mlp.up_proj", 256, {"model.layers.0.mlp.up_proj": q4k})


@pytest.mark.parametrize("hidden,method,bpw", [(256, "rtn", 4.0), (256, "gptq", 4.0), (384, "rtn", 4.8)])
def test_the_file_meets_the_target_from_below_and_holds_the_allocations_types(env, hidden, method, bpw):
    """At a target between two types the layers mix them; at hidden 384 the rows of every layer
    but ffn_down (768 wide) are not whole 256-weight blocks and take the 32-weight replacements."""
    loaded = _load(env, hidden)
    names, _ = target_layers(loaded.model, Recipe())
    widths = {n: loaded.model.get_submodule(n).in_features for n in names}
    n_q = sum(loaded.model.get_submodule(n).weight.numel() for n in names)
    res = quantize_to_gguf(loaded, _recipe(method, target_bpw=bpw), None, env / "out.gguf", progress=False)
    allocation = res.quantized.allocation
    gnames = gguf_names(loaded.model)
    tensors = _tensors(env / "out.gguf")
    used = sum(tensors[gnames[f"{n}.weight"]][1] for n in names)
    target = bpw * n_q / 8
    assert 0.99 * target <= used <= target
    assert res.block_bytes == used == res.quantized.budget.used_bytes
    assert set(allocation) == set(names)
    for n in names:
        kind = str(allocation[n])
        assert tensors[gnames[f"{n}.weight"]][0] == kind == res.quantized.weights[n].block_type
        assert kind in {fallback_type(t, widths[n]) for t in BLOCK_LEVELS} and widths[n] % BLOCK_TYPES[kind].block == 0
    assert len({str(lv) for lv in allocation.values()}) > 1
    if hidden == 384:
        assert {BLOCK_TYPES[str(allocation[n])].block for n in names if widths[n] == 384} == {32}
    assert "general.file_type" not in gguf.GGUFReader(str(env / "out.gguf")).fields  # no llama.cpp mix
    back = load_model("out.gguf", cache=env / "cache", progress=False).model
    for n in names:
        assert torch.equal(back.get_parameter(f"{n}.weight"), res.quantized.weights[n].dequantize()), n


def test_a_target_size_counts_the_other_tensors_as_the_file_stores_them(env):
    loaded = _load(env)
    names, _ = target_layers(loaded.model, Recipe())
    n_q = sum(loaded.model.get_submodule(n).weight.numel() for n in names)
    target = int(4.0 * n_q / 8) + 40_000  # the embeddings, head and norms take about 28 kB at Q4_K_M's types
    quantize_to_gguf(loaded, _recipe(target_bytes=target), None, env / "out.gguf", progress=False)
    tensors = _tensors(env / "out.gguf")
    assert 0.99 * target <= sum(b for _, b in tensors.values()) <= target
    assert tensors["token_embd.weight"][0] == "Q4_K" and tensors["output.weight"][0] == "Q6_K"  # as in Q4_K_M


@pytest.mark.parametrize("uniform", ["Q3_K", "Q4_K"])
def test_the_budget_is_never_worse_than_one_type_everywhere_at_its_size(env, uniform):
    """Held-out KL of the decoder blocks as written (RTN on the block types), the embeddings and
    head unquantized in both models: the budget at the size of `uniform` everywhere is no worse."""
    ref = _load(env).model
    one = load_model("src.gguf", cache=env / "cache", progress=False)
    names, _ = target_layers(one.model, Recipe())
    records = quantize(one, Recipe(method="rtn", head_bits=0), progress=False, block_types=dict.fromkeys(names, uniform)).weights
    n_q = sum(r.shape[0] * r.shape[1] for r in records.values())
    bpw = 8 * sum(r.nbytes() for r in records.values()) / n_q
    loaded = load_model("src.gguf", cache=env / "cache", progress=False)
    recipe = _recipe(target_bpw=bpw)
    res = quantize_to_gguf(loaded, recipe, None, env / "out.gguf", progress=False)
    assert res.block_bytes <= sum(r.nbytes() for r in records.values())
    ids = held_out_ids(loaded, recipe)
    kl_uniform, kl_budget = held_out_kl(ref, one.model, ids), held_out_kl(ref, loaded.model, ids)
    assert kl_budget <= kl_uniform * (1 + 1e-4)
    rep = res.quantized.extra["budget"]
    built = rep["final_kl"] if rep["kept"] == "searched" else rep["start_kl"]
    assert kl_budget == pytest.approx(built, rel=1e-3)  # RTN: the search scored the weights the file holds


def test_impossible_targets_are_refused_with_the_fix_and_nothing_is_written(env):
    loaded = _load(env)
    for budget, named in (({"target_bpw": 2.0}, "2.625"),      # below Q2_K everywhere: the least target
                          ({"target_bpw": 9.0}, "8.50"),       # above Q8_0 everywhere
                          ({"target_bytes": 20_000}, "--target-size")):  # less than the embeddings and head
        with pytest.raises(BudgetError, match=named):
            quantize_to_gguf(loaded, _recipe(**budget), None, env / "out.gguf", progress=False)
        assert not (env / "out.gguf").exists()


def test_the_cli_writes_a_budgeted_gguf_and_refuses_gguf_without_a_mix_or_budget(env):
    _load(env)
    out = ["-o", "out.gguf", "-q"]
    assert main(["quantize", "src.gguf", "--method", "rtn", "--format", "gguf", "--target-bpw", "4",
                 "--search-generations", "1", *CALIB, *out]) == 0
    blocks = {t for name, (t, shape) in read_types(env / "out.gguf").items() if name.startswith("blk.") and len(shape) == 2}
    assert len(blocks) > 1 and blocks <= set(BLOCK_LEVELS)
    assert main(["quantize", "src.gguf", "--method", "rtn", "--format", "gguf", "-o", "a.gguf", "-q"]) == 2
    assert main(["quantize", "src.gguf", "--method", "rtn", "--format", "gguf", "--target-bpw", "4", "--levels",
                 "w3g64,w4g64", *CALIB, "-o", "b.gguf", "-q"]) == 2
    assert main(["quantize", "src.gguf", "--method", "rtn", "--target-bpw", "4", "--levels", "Q3_K,Q4_K", *CALIB,
                 "-o", "ck", "-q"]) == 2
    assert not any((env / p).exists() for p in ("a.gguf", "b.gguf", "ck"))
