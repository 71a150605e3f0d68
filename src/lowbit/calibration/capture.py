"""Capture what each decoder block receives, without running the blocks.

Every decoder layer is swapped for a stub that records its inputs and passes the hidden states
through unchanged, then the base model (no LM head) runs once per calibration sample. That gives
the embedding output (the first block's input) and, for each block, the keyword arguments the
model computes for it (attention mask, rotary embeddings...). Architectures that give blocks
different arguments (Gemma 3's sliding / global layers) are handled without special cases.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn


class _Recorder(nn.Module):
    def __init__(self, store: list):
        super().__init__()
        self.store = store

    def forward(self, hidden_states, *args, **kwargs):
        self.store.append((hidden_states, args, kwargs))
        return hidden_states


@dataclass
class BlockInputs:
    hidden: torch.Tensor                 # [n_samples, seqlen, hidden] input of the first block
    layer_kwargs: list[dict[str, Any]]   # per block: keyword arguments (identical for every sample)
    layer_args: list[tuple]              # per block: extra positional arguments (usually empty)


def base_model(model: nn.Module) -> nn.Module:
    """The decoder stack without the LM head (model.model for *ForCausalLM)."""
    return getattr(model, "model", model)


@torch.inference_mode()
def capture_block_inputs(model: nn.Module, layers: nn.ModuleList, input_ids: torch.Tensor) -> BlockInputs:
    """input_ids [n, seqlen] -> the first block's inputs [n, seqlen, hidden] and every block's kwargs."""
    originals = list(layers)
    stores: list[list] = [[] for _ in originals]
    hidden = None  # filled row by row: no list of rows beside the joined tensor
    try:
        for i, store in enumerate(stores):
            layers[i] = _Recorder(store)
        body = base_model(model)
        for j, row in enumerate(input_ids):
            for s in stores:
                s.clear()
            body(input_ids=row.unsqueeze(0), use_cache=False)
            h = stores[0][0][0]
            if hidden is None:
                hidden = h.new_empty((len(input_ids), *h.shape[1:]))
            hidden[j] = h[0]
    finally:
        for i, layer in enumerate(originals):
            layers[i] = layer
    kwargs = [dict(s[0][2]) for s in stores]
    for kw in kwargs:
        kw["use_cache"] = False
        kw.pop("past_key_values", None)
        kw.pop("past_key_value", None)
    return BlockInputs(hidden, kwargs, [s[0][1] for s in stores])
