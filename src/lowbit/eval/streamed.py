"""A model evaluated one decoder block in memory at a time: every window runs through block i
before block i + 1 is read, for a model or reference that does not fit in memory.

    ref = StreamedModel(load_skeleton("smollm2-135m"))          # a model folder (models/skeleton.py)
    cand = StreamedModel(open_streamed("out/smol-w4g64"))      # a checkpoint (eval/streamed_checkpoint.py)
    for ids, logits in ref.window_logits(tokens, seqlen): ...   # as windows.window_logits

The tensors outside the blocks (embeddings, final norm, head) are read to take the first block's
inputs, freed while the blocks run, and read again for the tail. The windows' hidden states
[n_windows, seqlen, hidden] (float32 for a float32 model) are kept between blocks, beside one
block's weights: in memory, or, when they would take more than half the memory left, in a
temporary file under lowbit's cache folder, read and written one window at a time (the page cache
holds what fits; none of it counts as the process's own). The windows then go through the model's
own forward once more with every block replaced by a stub that hands over the stored output, so
the final norm, the head and whatever the architecture does after its blocks (Gemma's logit
soft-capping) run exactly as in the whole model. Each window goes through each block on its own
(batches of one), as window_logits runs the whole model: the logits are the whole model's, bit for
bit. Everything read is freed again when the windows are done.
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Iterator
from typing import Protocol

import torch
from torch import nn
from tqdm.auto import tqdm

from lowbit.calibration.capture import capture_block_inputs
from lowbit.calibration.sequential import forward_block
from lowbit.errors import ConfigError
from lowbit.eval.windows import count_windows, window_logits
from lowbit.memory import available_bytes, release_freed_memory
from lowbit.models.arch import decoder_layers
from lowbit.models.skeleton import materialize, parameters_under, release
from lowbit.models.weights import NamedTensors
from lowbit.paths import cache_dir
from lowbit.runtime.kvcache import CacheSpec

log = logging.getLogger(__name__)


class _Handover(nn.Module):
    """Stands for a decoder block: returns the stored output of the whole stack for the window."""

    def __init__(self, hidden: torch.Tensor | None):
        super().__init__()
        self.hidden = hidden

    def forward(self, hidden_states, *args, **kwargs):
        return hidden_states if self.hidden is None else self.hidden.to(hidden_states.dtype)


class _Hidden:
    """Hidden states of `n` windows, each [1, seqlen, hidden]: a tensor in memory, or a temporary
    file (deleted when closed) read and written one window at a time."""

    def __init__(self, n: int, shape: tuple[int, int], dtype: torch.dtype, on_disk: bool):
        self.shape, self.dtype = (1, *shape), dtype
        self.stride = shape[0] * shape[1] * dtype.itemsize
        self._file = None
        self._memory = None if on_disk else torch.empty(n, *shape, dtype=dtype)
        if on_disk:
            folder = cache_dir() / "tmp"
            folder.mkdir(parents=True, exist_ok=True)
            self._file = tempfile.TemporaryFile(dir=folder)  # noqa: SIM115 - closed by close()

    def __getitem__(self, w: int) -> torch.Tensor:
        if self._memory is not None:
            return self._memory[w : w + 1]
        out = torch.empty(self.shape, dtype=self.dtype)
        self._file.seek(w * self.stride)
        self._file.readinto(memoryview(out.view(-1).view(torch.uint8).numpy()))
        return out

    def __setitem__(self, w: int, t: torch.Tensor) -> None:
        if self._memory is not None:
            self._memory[w : w + 1] = t
            return
        self._file.seek(w * self.stride)
        self._file.write(memoryview(t.detach().to(self.dtype).contiguous().view(-1).view(torch.uint8).numpy()))

    def close(self) -> None:
        if self._file is not None:
            self._file.close()


class Streamable(Protocol):
    """What StreamedModel evaluates: a model whose parameters are on the meta device, the tensors
    to fill them from, and the dtype to read them as (a Skeleton, a StreamedCheckpoint)."""

    @property
    def model(self) -> nn.Module: ...

    weights: NamedTensors
    dtype: torch.dtype


class StreamedModel:
    """A Streamable evaluated block by block (see the module docstring). `hidden_on_disk`: keep the
    windows' hidden states in a file (True), in memory (False), or decide by the memory left (None)."""

    def __init__(self, source: Streamable, hidden_on_disk: bool | None = None):
        self.source = source
        self.hidden_on_disk = hidden_on_disk

    @property
    def model(self) -> nn.Module:
        return self.source.model

    def _on_disk(self, nbytes: int) -> bool:
        if self.hidden_on_disk is not None:
            return self.hidden_on_disk
        available = available_bytes()
        if available is None or nbytes <= available / 2:
            return False
        log.warning("keeping the hidden states of the evaluation windows (%.2f GB) on disk, under %s: they would "
                    "take more than half the %.2f GB of memory left", nbytes / 1e9, cache_dir() / "tmp",
                    available / 1e9)
        return True

    @torch.inference_mode()
    def window_logits(self, tokens: torch.Tensor, seqlen: int, progress: bool = True,
                      desc: str = "reference, block by block") -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """(ids [seqlen], logits [seqlen, vocab] float32) for each window of `tokens` [1, N]."""
        src, model = self.source, self.source.model
        n_windows = count_windows(tokens, seqlen)
        windows = tokens[0, : n_windows * seqlen].reshape(n_windows, seqlen)
        blocks = decoder_layers(model)
        stack = _prefix(model, 0).rsplit(".", 1)[0]  # model.layers
        outside = [n for n in parameters_under(model, "") if not n.startswith(stack + ".")]
        width = model.get_input_embeddings().embedding_dim
        hidden = _Hidden(n_windows, (seqlen, width), src.dtype,
                         self._on_disk(n_windows * seqlen * width * src.dtype.itemsize))
        try:
            materialize(model, outside, src.weights, src.dtype)
            inputs = None
            for w in range(n_windows):  # the embeddings' outputs, and what each block is passed besides
                captured = capture_block_inputs(model, blocks, windows[w : w + 1])
                inputs = inputs or captured
                hidden[w] = captured.hidden
            _release(model, outside)  # the blocks never read them: read again for the tail
            for i in tqdm(range(len(blocks)), desc=desc, unit="block", disable=not progress):
                names = parameters_under(model, f"{stack}.{i}")
                materialize(model, names, src.weights, src.dtype)
                for w in range(n_windows):
                    x = hidden[w]
                    forward_block(blocks[i], x, inputs.layer_args[i], inputs.layer_kwargs[i], batch_size=1)
                    hidden[w] = x
                _release(model, names)
            materialize(model, outside, src.weights, src.dtype)
            yield from _tail(model, blocks, windows, hidden)
        finally:
            hidden.close()
            _release(model, outside)


def _release(model: nn.Module, names: list[str]) -> None:
    """The parameters `names` back on the meta device (a head tied to them too), their memory freed."""
    release(model, names)
    model.tie_weights()
    release_freed_memory()  # the C allocator would keep the freed memory


def logits_of(model: nn.Module | StreamedModel, tokens: torch.Tensor, seqlen: int, progress: bool = True,
              desc: str = "eval", kv: CacheSpec | None = None, kv_chunk: int = 128,
              kv_stats: dict | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """windows.window_logits for a model in memory, StreamedModel.window_logits for a streamed one
    (which runs no compressed KV cache: ConfigError with `kv`)."""
    if not isinstance(model, StreamedModel):
        return window_logits(model, tokens, seqlen, progress, desc, kv, kv_chunk, kv_stats)
    check_no_kv(model, kv)
    return model.window_logits(tokens, seqlen, progress, desc)


def check_no_kv(model: nn.Module | StreamedModel, kv: CacheSpec | None) -> None:
    """ConfigError for a compressed KV cache on a streamed model: the cache runs the whole model's
    forward chunk by chunk, a streamed model one block at a time."""
    if kv is not None and isinstance(model, StreamedModel):
        raise ConfigError(f"the KV cache {kv.label} runs the whole model's forward chunk by chunk, and a streamed "
                          "model runs one block at a time: evaluate it without --stream, or without --kv and "
                          "--kv-policy")


def module_of(model: nn.Module | StreamedModel) -> nn.Module:
    """The nn.Module a model in memory or a streamed one runs."""
    return model.model if isinstance(model, StreamedModel) else model


def _tail(model: nn.Module, blocks: nn.ModuleList, windows: torch.Tensor, hidden: _Hidden):
    """Each window through the model's forward with its blocks' stored output handed over."""
    originals = list(blocks)
    try:
        for w in range(windows.shape[0]):
            for i in range(len(blocks)):
                blocks[i] = _Handover(hidden[w] if i == len(blocks) - 1 else None)
            out = model(input_ids=windows[w : w + 1], use_cache=False)
            yield windows[w], out.logits[0].float()
    finally:
        for i, block in enumerate(originals):
            blocks[i] = block


def _prefix(model: nn.Module, i: int) -> str:
    blocks = decoder_layers(model)
    return next(f"{name}.{i}" for name, m in model.named_modules() if m is blocks)
