"""quantize_to_gguf(loaded, recipe, mix, path): a model rounded by lowbit onto llama.cpp's block
types, written as one GGUF file that llama.cpp (and `lowbit eval`) loads like any other.

    loaded = load_model("smollm2-135m")
    out = quantize_to_gguf(loaded, Recipe(method="gptq"), "Q4_K_M", "smol.Q4_K_M.gguf")

The mix (a llama.cpp name such as Q4_K_M) decides each tensor's block type as llama.cpp's own
quantizer would (formats/ggml/mixes.py); the recipe's method decides how the decoder blocks'
linear layers are rounded on those types: rtn (the type's importance-weighted scale search), gptq
(error feedback on the type's grid, algorithms/ggml.py), awq / awq-gptq (AWQ smoothing folded into
the norms first). The embeddings and an untied output head are rounded data-free on their types;
norms stay float32. Tensors of the source GGUF that the transformers model does not hold (e.g.
rope_freqs) are copied through unchanged.

With a size budget (recipe.budget, levels that are block types: BudgetConfig.on_block_types) the
budget chooses the type of each decoder-block linear layer (budget.plan.plan_block_budget) and
the mix (default BUDGET_MIX) types only the other tensors, whose bytes count against a target
size as the file stores them. Such a file follows no llama.cpp mix, so general.file_type is left
out: llama.cpp then names the file by its most common tensor type, marked as guessed.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf
import torch
from torch import nn

from lowbit.algorithms.ggml import ggml_rtn
from lowbit.budget.plan import BudgetReport, plan_block_budget
from lowbit.errors import ConfigError
from lowbit.export.gguf import (
    GGUFMetadata,
    gguf_names,
    model_arch,
    to_gguf_layout,
    write_gguf,
)
from lowbit.formats.ggml import BLOCK_TYPES
from lowbit.formats.ggml.mixes import check_mix, fallback_type, tensor_type
from lowbit.levels import Allocation
from lowbit.models import KNOWN_MODELS
from lowbit.models.load import LoadedModel
from lowbit.outputs import rename_noreplace
from lowbit.paths import cache_dir
from lowbit.peers.llamacpp import ensure_llamacpp, vocab_gguf
from lowbit.pipeline import QuantizedModel, quantize, target_layers
from lowbit.qtensor import BlockWeight
from lowbit.recipes import Recipe

log = logging.getLogger(__name__)

GGUF_METHODS = ("rtn", "gptq", "awq", "awq-gptq")
DENSE_TYPES = {"F32": torch.float32, "F16": torch.float16}  # what a tensor llama.cpp keeps unquantized is stored as
WRITER_KEY = "lowbit.writer"  # marks a GGUF lowbit wrote (what --force may replace)
SOURCE_KEY = "lowbit.source"  # the model it was quantized from: `lowbit eval`'s reference
BUDGET_MIX = "Q4_K_M"  # with a budget and no mix: the mix whose rules type the embeddings and the output head


@dataclass
class GGUFResult:
    path: Path
    quantized: QuantizedModel                 # the decoder blocks' records and reports
    types: dict[str, str]                     # GGUF tensor name -> type written (F32 for dense)
    fallbacks: dict[str, tuple[str, str]]     # GGUF name -> (the mix's type, the type written instead)
    block_bytes: int                          # bytes of the decoder blocks' linear weights
    block_weights: int                        # their number of weights

    @property
    def bits_per_weight(self) -> float:
        return 8 * self.block_bytes / self.block_weights


def plan_types(model: nn.Module, mix: str, names: dict[str, str], has_imatrix: bool = False,
               ) -> tuple[dict[str, str], dict[str, tuple[str, str]]]:
    """transformers name -> type of every 2-D weight under `mix` (formats/ggml/mixes.py: llama.cpp's
    own choice, with its fallback where a row is not whole blocks), and those fallbacks (by GGUF
    name: (the mix's type, the type written)). A type lowbit does not write yet is refused, naming
    the tensor."""
    mix = check_mix(mix)
    cfg = model.config
    n_gqa = cfg.num_attention_heads // getattr(cfg, "num_key_value_heads", cfg.num_attention_heads)
    tied = "output.weight" not in names.values()
    types, fallbacks = {}, {}
    for full, p in model.named_parameters():
        if p.dim() != 2:
            continue
        gname = names[full]
        want = tensor_type(mix, gname, cfg.num_hidden_layers, n_gqa=n_gqa, tied_output=tied,
                           has_imatrix=has_imatrix, arch=model_arch(model))
        got = fallback_type(want, p.shape[1])
        if got not in BLOCK_TYPES and got not in DENSE_TYPES:
            raise ConfigError(f"{gname}: mix {mix} stores it as {got}, a type lowbit does not write yet; "
                              f"choose a mix of the types {', '.join(BLOCK_TYPES)}")
        if got != want:
            fallbacks[gname] = (want, got)
        types[full] = got
    return types, fallbacks


def source_metadata(loaded: LoadedModel, cache: Path | None = None, progress: bool = True) -> GGUFMetadata:
    """The GGUF keys of the source model: its own file when it came from one; for a Hugging Face
    folder, what llama.cpp's converter writes for it (--vocab-only; builds llama.cpp's tools once)."""
    src = loaded.source
    if src.gguf_file and src.path is not None:
        path = src.path if src.path.suffix.lower() == ".gguf" else src.path / src.gguf_file
        return GGUFMetadata.from_file(path)
    if src.kind == "hf_folder" and src.path is not None:
        tools = ensure_llamacpp(cache=cache, progress=progress)
        return GGUFMetadata.from_file(vocab_gguf(src.path, cache_dir(cache) / "gguf-metadata", tools, progress))
    raise ConfigError(f"{src.spec}: GGUF output needs the model's tokenizer and hyper-parameters in GGUF form; "
                      "give a local Hugging Face folder or a GGUF file")


def _source_tensors(loaded: LoadedModel) -> dict[str, Any]:
    src = loaded.source
    if not src.gguf_file or src.path is None:
        return {}
    path = src.path if src.path.suffix.lower() == ".gguf" else src.path / src.gguf_file
    return {t.name: t for t in gguf.GGUFReader(str(path)).tensors}


def quantize_to_gguf(loaded: LoadedModel, recipe: Recipe, mix: str | None, path: str | Path,
                     data_dir: str | None = None, progress: bool = True, overwrite: bool = False) -> GGUFResult:
    """Quantize `loaded` onto the block types of `mix`, or of a size budget (recipe.budget: then
    `mix`, default BUDGET_MIX, types only the tensors outside the decoder blocks), and write `path`
    (see the module docstring). The file appears complete or not at all; an existing `path` is
    replaced only with `overwrite` (the caller checks it is a file lowbit wrote: is_lowbit_gguf)."""
    if recipe.method not in GGUF_METHODS:
        raise ConfigError(f"method {recipe.method!r} has no llama.cpp block type; GGUF output takes "
                          f"{', '.join(GGUF_METHODS)}")
    if mix is None and recipe.budget is None:
        raise ConfigError("GGUF output needs each tensor's llama.cpp block type: give a mix (e.g. Q4_K_M) or a size "
                          "budget (target_bpw or target_bytes) that chooses them")
    if recipe.budget is not None:
        recipe = dataclasses.replace(recipe, budget=recipe.budget.on_block_types())
    model = loaded.model
    arch = model_arch(model)
    metadata = source_metadata(loaded, progress=progress)
    names = gguf_names(model, arch)
    types, fallbacks = plan_types(model, mix or BUDGET_MIX, names, has_imatrix=recipe.needs_calibration)
    recipe = dataclasses.replace(recipe, head_bits=0)
    layers, _ = target_layers(model, recipe)
    dense_layers = [n for n in layers if types[f"{n}.weight"] in DENSE_TYPES]
    if dense_layers:
        recipe = dataclasses.replace(recipe, skip=(*recipe.skip, *(f"^{re.escape(n)}$" for n in dense_layers)))
        layers, _ = target_layers(model, recipe)
    source_tensors = _source_tensors(loaded)
    budget = None
    if recipe.budget is not None:
        budget = _plan_budget(loaded, recipe, layers, types, source_tensors, data_dir, progress)
        types.update({f"{n}.weight": str(lv) for n, lv in budget[0].items()})
        chosen = {names[f"{n}.weight"] for n in layers}  # the mix's fallbacks there no longer apply
        fallbacks = {g: v for g, v in fallbacks.items() if g not in chosen}
    for (want, got), count in Counter(fallbacks.values()).items():
        log.warning("%d tensors have rows that are not whole %s blocks: written as %s, as llama.cpp does",
                    count, want, got)
    result = quantize(loaded, dataclasses.replace(recipe, budget=None), data_dir, progress,
                      block_types={n: types[f"{n}.weight"] for n in layers})
    if budget is not None:
        allocation, report = budget
        result = dataclasses.replace(result, recipe=recipe, budget=report, allocation=allocation,
                                     extra={**result.extra, "budget": report.to_dict()})
    tensors = _file_tensors(model, arch, names, types, result, source_tensors)
    _write(loaded, path, tensors, metadata, None if budget is not None else mix, overwrite)
    block_bytes = sum(r.nbytes() for r in result.weights.values())
    block_weights = sum(r.shape[0] * r.shape[1] for r in result.weights.values())
    written = {n: (v.block_type if isinstance(v, BlockWeight) else "F16" if v.dtype == torch.float16 else "F32")
               for n, v in tensors.items()}
    return GGUFResult(Path(path), result, written, fallbacks, block_bytes, block_weights)


def _plan_budget(loaded: LoadedModel, recipe: Recipe, layers: list[str], types: dict[str, str],
                 source_tensors: dict[str, Any], data_dir: str | None, progress: bool,
                 ) -> tuple[Allocation, BudgetReport]:
    """The budget's block type per layer of `layers`; every other tensor counted at its bytes in the
    file (`types`, dense float32 for norms and the source's extra tensors)."""
    budgeted = {f"{n}.weight" for n in layers}
    other = 0
    for full, p in loaded.model.named_parameters():
        if full in budgeted:
            continue
        kind = types.get(full, "F32")
        if kind in DENSE_TYPES:
            other += p.numel() * DENSE_TYPES[kind].itemsize
        else:
            bt = BLOCK_TYPES[kind]
            other += p.shape[0] * (p.shape[1] // bt.block) * bt.type_size
    names = set(gguf_names(loaded.model, model_arch(loaded.model)).values())
    other += sum(4 * int(t.n_elements) for n, t in source_tensors.items() if n not in names)
    allocation, report = plan_block_budget(loaded, recipe, layers, other, data_dir, progress)
    log.info(report.summary())
    return allocation, report


def _file_tensors(model: nn.Module, arch: str, names: dict[str, str], types: dict[str, str], result: QuantizedModel,
                  source_tensors: dict[str, Any]) -> dict[str, BlockWeight | torch.Tensor]:
    """GGUF name -> what the file holds: the decoder blocks' records, the other matrices rounded
    data-free on their types, dense tensors in their float type, the source's extra tensors."""
    tensors: dict[str, BlockWeight | torch.Tensor] = {}
    for full, p in model.named_parameters():
        gname = names[full]
        rec = result.weights.get(full.removesuffix(".weight"))
        if rec is None and types.get(full, "F32") not in DENSE_TYPES:
            rec = ggml_rtn(p.detach(), types[full], name=gname)
        dense = p.detach().to(DENSE_TYPES[types.get(full, "F32")]) if rec is None else None
        tensors[gname] = to_gguf_layout(arch, gname, rec if rec is not None else dense, model.config)
    for n, t in source_tensors.items():
        if n not in tensors:
            tensors[n] = _raw(t)
    return tensors


def _write(loaded: LoadedModel, path: str | Path, tensors: dict[str, BlockWeight | torch.Tensor],
           metadata: GGUFMetadata, file_type: str | None, overwrite: bool) -> None:
    """Write the file beside `path` and move it into place (replacing only with `overwrite`)."""
    fields = dict(metadata.fields)
    fields[WRITER_KEY] = ("lowbit", gguf.GGUFValueType.STRING, None)
    src = loaded.source
    source = src.spec if src.kind in ("known", "hub") else str(src.path)
    fields[SOURCE_KEY] = (source, gguf.GGUFValueType.STRING, None)
    path = Path(path)
    partial = path.with_name(f".{path.name}.lowbit-partial-{os.getpid()}")
    try:
        write_gguf(partial, tensors, GGUFMetadata(metadata.arch, fields), file_type)
        if overwrite:
            os.replace(partial, path)
        else:
            rename_noreplace(partial, path)
    finally:
        partial.unlink(missing_ok=True)


def is_lowbit_gguf(path: str | Path) -> bool:
    """True for a readable GGUF file that lowbit wrote (it carries WRITER_KEY)."""
    try:
        return WRITER_KEY in gguf.GGUFReader(str(path)).fields
    except Exception:  # noqa: BLE001 - anything unreadable is not ours
        return False


def written_from(path: str | Path) -> str | None:
    """The source model a GGUF lowbit wrote was quantized from (a known name or a path), None for
    other files or a source that is no longer there."""
    try:
        field = gguf.GGUFReader(str(path)).fields.get(SOURCE_KEY)
    except Exception:  # noqa: BLE001 - an unreadable file names nothing
        return None
    if field is None:
        return None
    source = str(field.contents())
    return source if source in KNOWN_MODELS or Path(source).exists() else None


def _raw(t: Any) -> torch.Tensor:
    """A source tensor copied through: dequantized to float32 (such tensors are small, e.g. rope_freqs)."""
    return torch.from_numpy(gguf.quants.dequantize(t.data, t.tensor_type).copy()).reshape(
        [int(x) for x in reversed(t.shape.tolist())])
