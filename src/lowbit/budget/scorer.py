"""What scores an allocation: KL divergence of the model with each layer fake-quantized at its
level to the unquantized model, window by window on held-out calibration windows; the probe's
replay of the decoder blocks from the changed one on; the paired test that confirms a result."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from lowbit.budget.rounding import AffineRounding, BlockRounding
from lowbit.calibration.capture import base_model, capture_block_inputs
from lowbit.levels import Level
from lowbit.models.arch import decoder_layers
from lowbit.recipes import Recipe

# The scorer's reference log-probabilities are held in float16: half the memory of float32 (2.5
# GB instead of 4.9 for qwen's confirmation set), about 3 decimal digits, and the same rounded
# reference for every allocation compared.
REF_DTYPE = torch.float16


class _FakeQuantModel:
    """The model with each layer's weight replaced by its rounding at a level (budget/rounding.py)."""

    def __init__(self, model: nn.Module, names: list[str], rounding: AffineRounding | BlockRounding,
                 cache_bytes: int = 2 << 30):
        self.model, self.names, self.rounding = model, names, rounding
        # set() swaps whole tensors in and never writes into one: the originals need no copy
        self.orig = {n: model.get_submodule(n).weight.detach() for n in names}
        self.current: dict[str, int | None] = {n: None for n in names}
        self.cache: dict[tuple[str, str], torch.Tensor] = {}
        self.cache_bytes, self.cached = cache_bytes, 0

    def weight(self, name: str, k: int) -> torch.Tensor:
        orig = self.orig[name]
        key = (name, str(self.rounding.option(k, orig.shape[1])))  # levels a layer holds alike share one entry
        if key not in self.cache:
            w = self.rounding.dequantized(name, orig, k, orig.dtype)
            size = w.numel() * w.element_size()
            if self.cached + size <= self.cache_bytes:
                self.cache[key] = w
                self.cached += size
            return w
        return self.cache[key]

    def held(self, choice: list[int]) -> tuple[str, ...]:
        """What each layer holds under `choice`, by name (str of its level for its width)."""
        return tuple(str(self.rounding.option(k, self.orig[n].shape[1])) for n, k in zip(self.names, choice))

    def set(self, choice: list[int | None]) -> None:
        """Each layer at its level; None keeps the layer's original weight."""
        for name, k in zip(self.names, choice):
            if self.current[name] != k:
                self.model.get_submodule(name).weight.data = self.orig[name] if k is None else self.weight(name, k)
                self.current[name] = k

    def restore(self) -> None:
        for name in self.names:
            self.model.get_submodule(name).weight.data = self.orig[name]


def _log_probs(model: nn.Module, row: torch.Tensor, dtype: str) -> torch.Tensor:
    """Next-token log-probabilities of one window; dtype "bfloat16" runs it under CPU autocast
    (the calibration's dtype: recipes.CalibrationConfig.dtype)."""
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bfloat16"):
        return F.log_softmax(model(row.unsqueeze(0)).logits[0].float(), -1)


def _kl(ref: torch.Tensor, logp: torch.Tensor) -> float:
    """Mean KL(ref || logp) per token of one window."""
    ref = ref.float()
    return float((ref.exp() * (ref - logp)).sum()) / ref.shape[0]


def _window_kls(model: nn.Module, ids: torch.Tensor, ref_logp: list[torch.Tensor], dtype: str) -> list[float]:
    """Mean KL per token of each window."""
    return [_kl(ref, _log_probs(model, row, dtype)) for row, ref in zip(ids, ref_logp)]


def _block_output(out: torch.Tensor | tuple) -> torch.Tensor:
    return out[0] if isinstance(out, tuple) else out


class _Tails:
    """The unquantized model's hidden state entering each decoder block, on a few windows, so a
    forward with layers of one block changed can start at that block: the blocks before it would
    compute exactly these states again. The probe changes one layer at a time, so this saves
    about half of its block forwards."""

    def __init__(self, model: nn.Module, ids: torch.Tensor, dtype: str):
        self.model, self.dtype = model, dtype
        self.layers = decoder_layers(model)
        self.block_of = {id(m): b for b, block in enumerate(self.layers) for m in block.modules()}
        with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bfloat16"):
            cap = capture_block_inputs(model, self.layers, ids)
            self.args, self.kwargs = cap.layer_args, cap.layer_kwargs
            h, self.inputs = cap.hidden, []
            for b, block in enumerate(self.layers):
                self.inputs.append(h)
                h = torch.cat([_block_output(block(h[j:j + 1], *self.args[b], **self.kwargs[b]))
                               for j in range(h.shape[0])])

    @staticmethod
    def usable(model: nn.Module) -> bool:
        """Whether the model's output is its final norm then its LM head (no logit soft-capping
        or other step this class would skip)."""
        return (isinstance(getattr(model, "lm_head", None), nn.Module)
                and isinstance(getattr(base_model(model), "norm", None), nn.Module)
                and getattr(getattr(model, "config", None), "final_logit_softcapping", None) is None)

    def log_probs(self, j: int, start: int) -> torch.Tensor:
        """Next-token log-probabilities of window j, running blocks from `start` on."""
        with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.dtype == "bfloat16"):
            h = self.inputs[start][j:j + 1]
            for b in range(start, len(self.layers)):
                h = _block_output(self.layers[b](h, *self.args[b], **self.kwargs[b]))
            logits = self.model.lm_head(base_model(self.model).norm(h))
            return F.log_softmax(logits[0].float(), -1)


def clearly_better(new: list[float], old: list[float], z: float = 2.0) -> bool:
    """Paired test over windows: is `new` lower than `old` by more than z standard errors?"""
    d = [o - n for n, o in zip(new, old)]
    if len(d) < 2:
        return sum(d) > 0
    mean = sum(d) / len(d)
    sd = math.sqrt(sum((x - mean) ** 2 for x in d) / (len(d) - 1))
    return mean > z * sd / math.sqrt(len(d))


class Scorer:
    """KL(model || model with each layer fake-quantized at its level) on sets of held-out windows."""

    def __init__(self, model: nn.Module, names: list[str], levels: list[Level], recipe: Recipe,
                 rounding: AffineRounding | BlockRounding | None = None, **sets: torch.Tensor):
        self.dtype = recipe.calibration.dtype
        self.ids = sets
        self._ref: dict[str, list[torch.Tensor]] = {}
        self._scores: dict[tuple[str, tuple[str, ...]], float] = {}
        self.model = model
        self.fq = _FakeQuantModel(model, names, rounding if rounding is not None else AffineRounding(recipe, levels))

    def _set(self, on: str) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """The windows of set `on` and the unquantized model's log-probabilities on them, computed
        on first use: a set's reference takes windows x tokens x vocabulary float16 values (0.6 GB
        for 2048 tokens of a 150k vocabulary), so only the sets in use are held (see drop)."""
        if on not in self._ref:
            keep = [self.fq.current[n] for n in self.fq.names]
            self.fq.set([None] * len(keep))
            self._ref[on] = [_log_probs(self.model, row, self.dtype).to(REF_DTYPE) for row in self.ids[on]]
            self.fq.set(keep)
        return self.ids[on], self._ref[on]

    def drop(self, on: str) -> None:
        self._ref.pop(on, None)
        self._scores = {k: v for k, v in self._scores.items() if k[0] != on}

    def __call__(self, choice: list[int], on: str = "search") -> float:
        """Mean KL per token over set `on`; an allocation whose layers hold what a scored one's
        held (the same levels, or block types that a layer's width turns into the same type) is
        not run again."""
        key = (on, self.fq.held(choice))
        if key not in self._scores:
            kls = self.windows(choice, on)
            self._scores[key] = sum(kls) / len(kls)
        return self._scores[key]

    def probe(self, k: int, tokens: int, progress: bool = True, reuse_prefix: bool = True) -> torch.Tensor:
        """[L] KL with one layer at a time quantized at level k, the others unquantized, on the
        first `tokens` tokens of the search set. With reuse_prefix (and a model _Tails can
        replay) each forward starts at the changed layer's block."""
        ids, ref_logp = self._set("search")
        n = max(1, min(len(ids), tokens // ids.shape[1]))
        names = self.fq.names
        self.fq.set([None] * len(names))
        tails = _Tails(self.model, ids[:n], self.dtype) if reuse_prefix and _Tails.usable(self.model) else None
        out = torch.empty(len(names))
        for i in tqdm(range(len(names)), desc="budget probes", unit="layer", disable=not progress):
            self.fq.set([k if j == i else None for j in range(len(names))])
            start = None if tails is None else tails.block_of.get(id(self.model.get_submodule(names[i])))
            if start is None:
                out[i] = sum(_window_kls(self.model, ids[:n], ref_logp[:n], self.dtype)) / n
            else:
                out[i] = sum(_kl(ref_logp[j], tails.log_probs(j, start)) for j in range(n)) / n
        self.fq.set([None] * len(names))
        return out

    def windows(self, choice: list[int], on: str = "search") -> list[float]:
        ids, ref_logp = self._set(on)
        self.fq.set(choice)
        return _window_kls(self.model, ids, ref_logp, self.dtype)

    def restore(self) -> None:
        self.fq.restore()
