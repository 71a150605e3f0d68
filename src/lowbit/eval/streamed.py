"""A model evaluated one decoder block in memory at a time: every window runs through block i
before block i + 1 is read (models/skeleton.py), for a reference that does not fit in memory.

    ref = StreamedModel(load_skeleton("smollm2-135m"))
    for ids, logits in ref.window_logits(tokens, seqlen): ...   # as windows.window_logits

The windows' hidden states [n_windows, seqlen, hidden] (float32 for a float32 model) stay in
memory between blocks, beside one block's weights and the embeddings. The windows then go through
the model's own forward once more with every block replaced by a stub that hands over the stored
output, so the final norm, the head and whatever the architecture does after its blocks (Gemma's
logit soft-capping) run exactly as in the whole model. Each window goes through each block on its
own (batches of one), as window_logits runs the whole model, so the logits are the same.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import nn
from tqdm.auto import tqdm

from lowbit.calibration.capture import capture_block_inputs
from lowbit.calibration.sequential import forward_block
from lowbit.eval.windows import count_windows
from lowbit.memory import release_freed_memory
from lowbit.models.arch import decoder_layers
from lowbit.models.skeleton import Skeleton, materialize, parameters_under, release


class _Handover(nn.Module):
    """Stands for a decoder block: returns the stored output of the whole stack for the window."""

    def __init__(self, hidden: torch.Tensor | None):
        super().__init__()
        self.hidden = hidden

    def forward(self, hidden_states, *args, **kwargs):
        return hidden_states if self.hidden is None else self.hidden.to(hidden_states.dtype)


class StreamedModel:
    """A Skeleton evaluated block by block (see the module docstring)."""

    def __init__(self, skeleton: Skeleton):
        self.skeleton = skeleton

    @property
    def model(self) -> nn.Module:
        return self.skeleton.model

    @torch.inference_mode()
    def window_logits(self, tokens: torch.Tensor, seqlen: int, progress: bool = True,
                      desc: str = "reference, block by block") -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """(ids [seqlen], logits [seqlen, vocab] float32) for each window of `tokens` [1, N]."""
        sk, model = self.skeleton, self.skeleton.model
        n_windows = count_windows(tokens, seqlen)
        windows = tokens[0, : n_windows * seqlen].reshape(n_windows, seqlen)
        blocks = decoder_layers(model)
        stack = _prefix(model, 0).rsplit(".", 1)[0]  # model.layers
        materialize(model, [n for n in parameters_under(model, "") if not n.startswith(stack + ".")], sk.weights,
                    sk.dtype)
        inputs = capture_block_inputs(model, blocks, windows)
        hidden = inputs.hidden  # [n_windows, seqlen, hidden]
        for i in tqdm(range(len(blocks)), desc=desc, unit="block", disable=not progress):
            names = parameters_under(model, f"{stack}.{i}")
            materialize(model, names, sk.weights, sk.dtype)
            forward_block(blocks[i], hidden, inputs.layer_args[i], inputs.layer_kwargs[i], batch_size=1)
            release(model, names)
            release_freed_memory()  # the C allocator would keep the block's freed memory
        originals = list(blocks)
        try:
            for w in range(n_windows):
                for i in range(len(blocks)):
                    blocks[i] = _Handover(hidden[w : w + 1] if i == len(blocks) - 1 else None)
                out = model(input_ids=windows[w : w + 1], use_cache=False)
                yield windows[w], out.logits[0].float()
        finally:
            for i, block in enumerate(originals):
                blocks[i] = block


def _prefix(model: nn.Module, i: int) -> str:
    blocks = decoder_layers(model)
    return next(f"{name}.{i}" for name, m in model.named_modules() if m is blocks)

