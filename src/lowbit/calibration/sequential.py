"""The sequential calibration pipeline: one decoder block at a time.

For each block: feed it the calibration inputs, collect the Hessians of one group of its linear
layers (q/k/v, then o, then gate/up, then down, each after the ones before are quantized:
"true sequential"), let the caller quantize that group, and finally recompute the block's outputs
with its quantized weights as the next block's inputs. Memory holds one block's inputs and
outputs plus the Hessians of one group.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn
from tqdm.auto import tqdm

from lowbit.calibration.capture import capture_block_inputs
from lowbit.calibration.hessian import HessianAccumulator
from lowbit.calibration.replay import ChildReplay
from lowbit.models.arch import decoder_layers, sequential_linear_groups

if TYPE_CHECKING:
    from lowbit.calibration.distributed import Communicator

log = logging.getLogger(__name__)

# quantize_group(block_index, {name_in_block: linear}, {name_in_block: H}) -> {name_in_block: new module}
GroupQuantizer = Callable[[int, dict[str, nn.Linear], dict[str, torch.Tensor]], dict[str, nn.Module]]
# prepare_block(block_index, block, run) -> {name_in_block: new module}: called before the groups,
# with `run()` feeding every calibration input through the block (outputs discarded), so it can
# record activations, change the block (smoothing) or quantize layers itself.
BlockPreparer = Callable[[int, nn.Module, Callable[[], None]], dict[str, nn.Module]]


# replay tails kept in memory (calibration/replay.py): a 1.5B model's down_proj inputs at 128 x 512
# calibration tokens take 2.3 GB (this lets them in, the streamed job sets its own)
TAIL_BYTES = 4 * 2**30


class _GroupDone(Exception):
    """Raised by a pre-hook once the input of every group of the pass is seen: the rest of the
    block need not run for this sample."""


def _run_block(block: nn.Module, x: torch.Tensor, args: tuple, kwargs: dict) -> torch.Tensor | None:
    try:
        out = block(x, *args, **kwargs)
    except _GroupDone:
        return None
    return out[0] if isinstance(out, tuple) else out


@dataclass
class BlockSteps:
    """What calibrating one block does besides collecting Hessians: `quantize_group` may be None
    when `prepare_block` (run first: AWQ smoothing) quantizes the block itself. With `comm` (a
    rank of a distributed job), the block's inputs are this rank's shard of the samples and the
    Hessians are combined over the ranks (calibration/distributed.py)."""

    quantize_group: GroupQuantizer | None
    true_sequential: bool = True
    batch_size: int = 8
    prepare_block: BlockPreparer | None = None
    replay: bool = True  # keep and replay the outputs of children that no longer change (replay.py)
    tail_bytes: float = TAIL_BYTES  # at most this many bytes of layer inputs kept as replay tails
    lean: bool = False  # a tail, not its child's output as well (ChildReplay: less memory, a little more time)
    comm: Communicator | None = None


@torch.inference_mode()
def run_sequential(
    model: nn.Module,
    input_ids: torch.Tensor,
    quantize_group: GroupQuantizer | None,
    true_sequential: bool = True,
    progress: bool = True,
    batch_size: int = 8,
    prepare_block: BlockPreparer | None = None,
    dtype: str = "float32",
    replay: bool = True,
    tail_bytes: float = TAIL_BYTES,
    comm: Communicator | None = None,
    lean: bool = False,
) -> None:
    """Quantize `model` in place, block by block, on calibration input_ids [n, seqlen].

    `prepare_block`, if given, runs first on each block (AWQ smoothing); `quantize_group` may be
    None when the preparer quantizes the block itself.
    Samples go through each block `batch_size` at a time (the per-block arguments broadcast over
    the batch), which keeps the matmuls large enough to run efficiently on a CPU. `dtype`
    (recipes.CalibrationConfig.dtype) "bfloat16" runs the blocks under CPU autocast, matrix
    products in bfloat16; the weights, the residual stream and every Hessian stay float32.
    `replay` (BlockSteps.replay, .tail_bytes, .lean) keeps the outputs of block children that no longer change.
    A streamed job (lowbit.streaming) runs the same calibrate_block on one block in memory at a time.
    With `comm` (a rank of a distributed job) this rank runs its shard of the samples.
    """
    steps = BlockSteps(quantize_group, true_sequential, batch_size, prepare_block, replay, tail_bytes, lean, comm)
    with calibration_autocast(dtype):
        layers = decoder_layers(model)
        inputs = capture_block_inputs(model, layers, input_ids if comm is None else comm.shard(input_ids, batch_size))
        bar = tqdm(total=len(layers), desc="quantizing blocks", unit="block", disable=not progress)
        for i, block in enumerate(layers):
            t0 = time.perf_counter()
            calibrate_block(i, block, inputs.hidden, inputs.layer_args[i], inputs.layer_kwargs[i], steps)
            bar.set_postfix_str(f"block {i}: {time.perf_counter() - t0:.1f}s")
            bar.update(1)
        bar.close()


def calibration_autocast(dtype: str):
    """The context the calibration forward passes run in: CPU autocast to bfloat16 for "bfloat16"."""
    return torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bfloat16")


@torch.inference_mode()
def forward_block(block: nn.Module, x: torch.Tensor, args: tuple, kwargs: dict, batch_size: int = 8,
                  replay: ChildReplay | None = None) -> None:
    """Replace the block's inputs x [n, seqlen, hidden] by its outputs, `batch_size` samples at a time
    (with `replay`, the children whose outputs it keeps are not run again)."""
    with _replaying(replay, x.shape[0], batch_size, keep=False):
        for j in range(0, x.shape[0], batch_size):
            if replay is not None:
                replay.start(j // batch_size)
            x[j : j + batch_size] = _run_block(block, x[j : j + batch_size], args, kwargs)


@torch.inference_mode()
def calibrate_block(i: int, block: nn.Module, x: torch.Tensor, args: tuple, kwargs: dict, steps: BlockSteps) -> None:
    """Calibrate and quantize block `i` on its inputs x [n, seqlen, hidden] (prepare_block, then
    each group of linear layers by quantize_group on its Hessian), then replace x by the quantized
    block's outputs: the next block's inputs. The passes after the first replay the outputs of the
    block's children that no longer change (calibration/replay.py)."""
    batch_size = steps.batch_size
    groups = sequential_linear_groups(block) if steps.quantize_group is not None else []
    if steps.prepare_block is not None:

        def run_all() -> None:
            for j in range(0, x.shape[0], batch_size):
                _run_block(block, x[j : j + batch_size], args, kwargs)

        for name, module in steps.prepare_block(i, block, run_all).items():
            block.set_submodule(name, module)
    replay = (ChildReplay(block, [name for g in groups for name in g], steps.tail_bytes, steps.lean)
              if steps.replay else None)
    # true sequential: one pass per group, after the groups before it are quantized;
    # otherwise one pass collects every group's Hessian from the unquantized block
    passes = [[g] for g in groups] if steps.true_sequential else ([groups] if groups else [])
    for pass_groups in passes:
        accs = _collect_hessians(block, x, args, kwargs, pass_groups, batch_size, replay)
        if steps.comm is not None:
            steps.comm.combine_hessians(accs, i)
        for g in pass_groups:
            linears = {name: block.get_submodule(name) for name in g}
            replaced = steps.quantize_group(i, linears, {name: accs[g[0]].H for name in g})
            del accs[g[0]]
            for name, module in replaced.items():
                block.set_submodule(name, module)
            if replay is not None:
                replay.quantized(g)
    forward_block(block, x, args, kwargs, batch_size, replay)


def _replaying(replay: ChildReplay | None, n: int, batch_size: int, keep: bool = True):
    return replay.active(-(-n // batch_size), keep) if replay is not None else nullcontext()


def _collect_hessians(block: nn.Module, x: torch.Tensor, args: tuple, kwargs: dict, pass_groups: list[list[str]],
                      batch_size: int, replay: ChildReplay | None = None) -> dict[str, HessianAccumulator]:
    """{first layer of each group: the Hessian of its inputs} over every sample; the layers of a
    group read the same input (models/arch.py), so one Hessian serves all. The input is taken
    before the first layer runs, and the sample stops there once every group's input is seen:
    no layer of the pass's groups is computed."""
    firsts = [g[0] for g in pass_groups]
    accs = {name: HessianAccumulator(block.get_submodule(name).in_features) for name in firsts}
    seen: set[str] = set()

    def hook(module, hook_args, name=None) -> None:
        accs[name].add(hook_args[0])
        seen.add(name)
        if len(seen) == len(firsts):
            raise _GroupDone

    handles = [block.get_submodule(name).register_forward_pre_hook(functools.partial(hook, name=name))
               for name in firsts]
    try:
        with _replaying(replay, x.shape[0], batch_size):
            for j in range(0, x.shape[0], batch_size):
                seen.clear()
                if replay is not None:
                    replay.start(j // batch_size)
                _run_block(block, x[j : j + batch_size], args, kwargs)
    finally:
        for h in handles:
            h.remove()
    return accs
