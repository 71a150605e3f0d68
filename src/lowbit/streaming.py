"""Quantize a model larger than memory: one decoder block in memory at a time, resumable.

    quantize_streamed("smollm2-135m", Recipe(method="gptq", bits=4), "out/smol-w4")
    quantize_streamed("smollm2-135m", Recipe(method="gptq", bits=4), "out/smol-w4", resume=True)

The model is built without weights (models/skeleton.py); the tensors outside the decoder blocks
but the output head (embeddings, final norm) are read first, and the calibration samples run
through them to give the first block's inputs. Then for each block: its weights are read from the
model's safetensors files, it is calibrated and quantized by the very steps the in-memory job runs
(blockwise.block_steps, calibration/sequential.py: calibrate_block), its records and other tensors
are written to the output folder as one file (checkpoint/partial.py), and its weights go back to
the meta device. The head is read and rounded last, then the block files are joined into the
checkpoint (one tensor at a time: checkpoint/tensors.py, write_tensors), which replaces the
unfinished folder in one rename. Peak memory: the embeddings (and final norm), one block in
float32 with its Hessians, and the calibration activations; the head at the end.
The checkpoint is bit-identical to the one quantize() + save() write (tests/test_streaming.py).

Resuming (`resume=True`, the same job) skips the blocks the folder holds, but block k's
calibration inputs are the outputs of the quantized blocks before it. They are recomputed, not
stored: each finished block is rebuilt from its file (its records dequantized, as the job ran it)
and the samples are run through it, one forward pass per finished block, which is a fraction of
the passes calibrating it took. Storing them instead would write the full activations (float32,
n_samples x seqlen x hidden: 400 MB per block for a 1.5B model at 128 x 512) at every block of
every run to save that pass on a resume, and would only serve the block right after them: with
recomputation, a damaged block anywhere is redone from the blocks before it.

Every method streams but a budget (the allocation searches over the whole model's forward
passes): that is refused.

Distributed (`comm`, calibration/distributed.py): every rank holds one block at a time and runs
its shard of the samples; rank 0 alone owns the folder (checks it, writes the blocks, joins the
checkpoint). On a resume it tells the other ranks how many blocks are finished and sends them each
finished block's tensors, so the ranks need not share a file system.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from tqdm.auto import tqdm

import lowbit
from lowbit.blockwise import (
    LayerQuantizer,
    LayerReport,
    block_prefix,
    block_steps,
    calibration_ids,
    calibration_report,
    quantize_data_free,
    quantize_head,
)
from lowbit.calibration.capture import capture_block_inputs
from lowbit.calibration.sequential import (
    calibrate_block,
    calibration_autocast,
    forward_block,
)
from lowbit.checkpoint.manifest import LayerEntry
from lowbit.checkpoint.partial import PartialCheckpoint, folder_lock
from lowbit.checkpoint.write import split_state, write_checkpoint
from lowbit.errors import ConfigError, ResourceError
from lowbit.eval.report import quantize_report
from lowbit.eval.size import QuantizedSize
from lowbit.marks import MANIFEST, partial_record
from lowbit.memory import peak_rss_bytes, release_freed_memory
from lowbit.models.arch import decoder_layers
from lowbit.models.load import ModelSource, resolve_model
from lowbit.models.skeleton import (
    Skeleton,
    assign,
    load_skeleton,
    materialize,
    parameters_under,
    release,
)
from lowbit.outputs import check_output, is_lowbit_folder, remove_tree
from lowbit.pipeline import (
    QuantizedModel,
    check_finite_weights,
    layer_specs,
    output_head,
    target_layers,
    with_head,
)
from lowbit.qtensor import PackedWeight, QuantizedWeight
from lowbit.recipes import METHODS, Recipe

if TYPE_CHECKING:
    from lowbit.calibration.distributed import Communicator

log = logging.getLogger(__name__)


@dataclass
class StreamedResult:
    """What a streamed job wrote and what it cost."""

    path: Path
    seconds: float
    peak_rss_bytes: int
    size: QuantizedSize
    resumed_blocks: int          # blocks a resumed job found finished
    fallbacks: list[str]         # layers GPTQ quantized round-to-nearest (QuantizedModel.fallbacks)


def check_streamable(recipe: Recipe) -> None:
    """Refuse, before any work, a recipe the streamed job cannot run."""
    if recipe.budget is not None:
        raise ConfigError("a size budget (--target-bpw / --target-size) cannot be streamed: its search runs the "
                          "whole model many times over; quantize without --stream, or give --bits and "
                          "--group-size instead of a budget")


def check_stream_output(out: str | Path, resume: bool, force: bool, inputs: list) -> Path:
    """The output folder of a streamed job, resolved: new (resume=False), or the unfinished folder
    of the job to resume. An unfinished folder is started over only with `force`; a finished
    checkpoint is never replaced, as the job writes its blocks into the folder as it goes."""
    out = Path(out).expanduser().resolve()
    if not out.exists():
        if resume:
            raise ConfigError(f"-o {out}: nothing to resume there; run the command without --resume")
        return check_output(out, False, inputs)
    unfinished = out.is_dir() and partial_record(out) is not None
    if unfinished and resume:
        return out
    if unfinished and force:
        check_output(out, True, inputs)
        with folder_lock(out):
            remove_tree(out)
        return out
    if unfinished:
        raise ConfigError(f"-o {out} holds an unfinished streamed job; add --resume to continue it, or --force to "
                          "start it over")
    if resume:
        what = "a finished checkpoint" if (out / MANIFEST).is_file() else "not an unfinished streamed job"
        raise ConfigError(f"-o {out} is {what}: there is nothing to resume; choose another -o")
    if force and is_lowbit_folder(out):
        raise ConfigError(f"-o {out} is a checkpoint: a streamed job writes its blocks into -o as it goes, so it "
                          "does not replace one; remove it first or choose another -o")
    return check_output(out, force, inputs)  # refuses what exists, with the reason


def quantize_streamed(model: str | ModelSource | Skeleton, recipe: Recipe, out: str | Path, *,
                      dtype: torch.dtype = torch.float32, data_dir: str | None = None, cache: Path | None = None,
                      resume: bool = False, force: bool = False, progress: bool = True,
                      command: str | None = None, comm: Communicator | None = None) -> StreamedResult | None:
    """Quantize `model` (a spec load_model takes, its ModelSource, or the Skeleton load_skeleton
    gave, whose dtype then stands) by `recipe` one block at a time into the checkpoint folder `out`
    (see the module docstring). `resume` continues the unfinished folder of the same job (ConfigError if another
    job started it); `force` starts an unfinished one over. `command` is what a user runs again to
    resume, without --resume (the CLI's command line); by default this call is named. A disk that
    fills up is a ResourceError: the finished blocks stay, to be resumed. With `comm`, this call
    is one rank of a distributed job (see the module docstring); the ranks but 0 return None."""
    t0 = time.perf_counter()
    check_streamable(recipe)
    if isinstance(model, Skeleton):
        sk, source = model, model.loaded.source
    else:
        source = model if isinstance(model, ModelSource) else resolve_model(model, cache=cache, progress=progress)
        sk = None
    protect = [source.path] if source.path is not None else []
    lead = comm is None or comm.lead
    out = check_stream_output(out, resume, force, protect) if lead else Path(out).expanduser().resolve()
    sk = sk or load_skeleton(source, dtype, cache, progress=progress)
    recipe = with_head(sk.model, recipe)
    names, skipped = target_layers(sk.model, recipe)
    if not names:
        raise ConfigError("the recipe's skip list excludes every linear layer; nothing to quantize")
    layers = LayerQuantizer(sk.model, recipe, layer_specs(sk.model, names, recipe), comm)
    ids = calibration_ids(sk.loaded, recipe, data_dir) if METHODS[recipe.method].needs_data else None
    if not lead:
        return _follow(sk, layers, ids)
    command = command or f"quantize_streamed({source.spec!r}, ..., {str(out)!r})"
    job = _job(sk, recipe, ids)
    started = None if resume else PartialCheckpoint.start(out, job, command, len(decoder_layers(sk.model)))
    with folder_lock(out):
        partial = started or PartialCheckpoint.resume(out, job, command)
        resumed = partial.n_finished
        if comm is not None:
            comm.broadcast_object(resumed, 0, "the number of finished blocks")
        with _disk_full_says_resume(partial):
            _load_outside_blocks(sk)
            if ids is None:
                _run_data_free(sk, layers, partial, progress)
            else:
                _run_calibrated(sk, layers, partial, ids, progress)
            head = _quantize_head(sk, layers)
            _load_outside_blocks(sk)  # the embeddings again (freed for the blocks), for the checkpoint
            return _finish(sk, layers, partial, head, skipped, ids, protect, t0, resumed)


@contextmanager
def _disk_full_says_resume(partial: PartialCheckpoint) -> Iterator[None]:
    """A full disk (ENOSPC, EDQUOT) as a ResourceError that says how to go on: the blocks finished
    before it stay in the folder."""
    try:
        yield
    except OSError as e:
        if e.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        raise ResourceError(f"the disk filled up while writing {e.filename or partial.path} ({e.strerror}); "
                            f"{partial.n_finished} of {partial.n_blocks} blocks are finished and kept in "
                            f"{partial.path}: free some space and resume with `{partial.command} --resume`") from None


def _job(sk: Skeleton, recipe: Recipe, ids: torch.Tensor | None) -> dict[str, Any]:
    """What makes two runs the same job, as the progress record keeps it (JSON values)."""
    s = sk.loaded.source
    job = {"source": {"kind": s.kind, "name": s.name, "sha256": s.sha256},
           "recipe": recipe.used_dict(None), "dtype": str(sk.dtype).removeprefix("torch."),
           "calibration_sha256": None if ids is None else hashlib.sha256(ids.numpy().tobytes()).hexdigest(),
           "lowbit": lowbit.__version__}
    return json.loads(json.dumps(job))


def _load_outside_blocks(sk: Skeleton) -> None:
    """The tensors outside the decoder blocks (embeddings, final norm), but an untied head, which
    is read at the end."""
    model = sk.model
    blocks = block_prefix(model, 0).rsplit(".", 1)[0]
    head = _untied_head(model)
    names = [n for n in parameters_under(model, "") if not n.startswith(blocks + ".")
             and not (head and n.startswith(head + "."))]
    materialize(model, names, sk.weights, sk.dtype)
    check_finite_weights(model)  # what is in memory now: the blocks and head are checked as they are read


def _untied_head(model) -> str | None:
    """The name of the output head when it holds its own weight, else None."""
    head = model.get_output_embeddings()
    if head is None or head.weight is model.get_input_embeddings().weight:
        return None
    return next(n for n, m in model.named_modules() if m is head)


def _load_block(sk: Skeleton, i: int) -> str:
    """Block i's weights read from the model's files (and checked finite); returns its prefix."""
    prefix = block_prefix(sk.model, i)
    materialize(sk.model, parameters_under(sk.model, prefix), sk.weights, sk.dtype)
    check_finite_weights(sk.model.get_submodule(prefix), prefix)
    return prefix


def _save_block(sk: Skeleton, layers: LayerQuantizer, partial: PartialCheckpoint, i: int, prefix: str) -> None:
    """Block i's records and other tensors written as a finished block, then freed."""
    block = sk.model.get_submodule(prefix)
    state = {f"{prefix}.{k}": v for k, v in block.state_dict().items()}
    records = {n: qw for n, qw in layers.weights.items() if n.startswith(prefix + ".")}
    quant, dense, entries = split_state(records, state)
    partial.write_block(i, quant, dense, {n: {"entry": entries[n].to_dict(), "report": layers.reports[n].to_dict()}
                                          for n in records})
    for n in records:
        del layers.weights[n], layers.reports[n]
    _free(sk, prefix)


def _free(sk: Skeleton, prefix: str) -> None:
    """The block `prefix` back on the meta device, and the memory it held handed back to the
    system (the C allocator would otherwise keep the freed blocks, and the process grow by one
    block's worth of fragments each time)."""
    release(sk.model, parameters_under(sk.model, prefix))
    release_freed_memory()


def _restore_block(sk: Skeleton, layers: LayerQuantizer, partial: PartialCheckpoint, i: int) -> str:
    """Finished block i rebuilt from its file as the job ran it: each quantized layer's weight
    dequantized from its record (blockwise.dense_twin's numbers), every other tensor as written."""
    prefix = block_prefix(sk.model, i)
    quant, dense, finished = _finished_block(partial, i, layers.comm)
    tensors = dict(dense)
    for name, layer in finished.items():
        entry = LayerEntry.from_dict(layer["entry"])
        parts = _parts_of(quant, name)
        bias = quant.get(f"{name}.bias")
        tensors[f"{name}.weight"] = QuantizedWeight.from_packed(parts, entry.fmt, entry.shape).dequantize(layers.dtype)
        if bias is not None:
            tensors[f"{name}.bias"] = bias.to(layers.dtype)
    assign(sk.model, tensors)
    return prefix


def _run_calibrated(sk: Skeleton, layers: LayerQuantizer, partial: PartialCheckpoint, ids: torch.Tensor,
                    progress: bool) -> None:
    """Every block calibrated on the samples in turn; finished blocks only run them forward."""
    model = sk.model
    steps = block_steps(layers, int(ids.numel()))
    blocks = decoder_layers(model)
    with calibration_autocast(layers.recipe.calibration.dtype):
        inputs = capture_block_inputs(model, blocks, ids if layers.comm is None else layers.comm.shard(ids, steps.batch_size))
        x = inputs.hidden
        _free_embeddings(sk)
        # replay tails (calibration/replay.py) up to the size of the block inputs: the attention's, not a
        # wide MLP's, whose inputs would raise the peak this job exists to keep low; lean: the tail is
        # kept instead of the attention's output, not beside it
        steps = replace(steps, tail_bytes=x.numel() * x.element_size(), lean=True)
        bar = tqdm(total=len(blocks), desc="quantizing blocks (streamed)", unit="block", disable=not progress)
        for i in range(len(blocks)):
            args, kwargs = inputs.layer_args[i], inputs.layer_kwargs[i]
            if i < partial.n_finished:
                prefix = _restore_block(sk, layers, partial, i)
                forward_block(blocks[i], x, args, kwargs, steps.batch_size)
                _free(sk, prefix)
            else:
                prefix = _load_block(sk, i)
                calibrate_block(i, blocks[i], x, args, kwargs, steps)
                _save_block(sk, layers, partial, i, prefix)
            bar.update(1)
        bar.close()


def _free_embeddings(sk: Skeleton) -> None:
    """The input embeddings back on the meta device once the first block's inputs are taken: the
    blocks never read them (a 1.5B model's are 0.9 GB in float32); _load_outside_blocks reads them
    again at the end."""
    model = sk.model
    embed = model.get_input_embeddings()
    name = next(n for n, m in model.named_modules() if m is embed)
    release(model, parameters_under(model, name))
    model.tie_weights()  # a head tied to them goes to the meta device too
    release_freed_memory()


class _Follower:
    """A rank but 0's stand-in for the unfinished folder, which rank 0 alone reads and writes: how
    many blocks are finished comes from rank 0, and a finished block's tensors (_finished_block)."""

    def __init__(self, comm: Communicator):
        self.n_finished = comm.broadcast_object(None, 0, "the number of finished blocks")

    def write_block(self, *args) -> None:
        pass


def _follow(sk: Skeleton, layers: LayerQuantizer, ids: torch.Tensor | None) -> None:
    """A rank but 0's part of the job: every block calibrated (or resumed) as rank 0 does, nothing written."""
    partial = _Follower(layers.comm)
    _load_outside_blocks(sk)
    if ids is None:
        _run_data_free(sk, layers, partial, progress=False)
    else:
        _run_calibrated(sk, layers, partial, ids, progress=False)


def _finished_block(partial: PartialCheckpoint | _Follower, i: int, comm: Communicator | None):
    """Finished block i's (quantized parts, dense tensors, {layer: entry and report}), read by rank
    0 and sent to the other ranks."""
    got = None
    if not isinstance(partial, _Follower):
        quant, dense = partial.read_block(i)
        got = (quant, dense, partial.blocks[i].layers)
    return got if comm is None else comm.broadcast_object(got, 0, f"finished block {i}")


def _run_data_free(sk: Skeleton, layers: LayerQuantizer, partial: PartialCheckpoint, progress: bool) -> None:
    """Every unfinished block's layers quantized from their weights alone."""
    n = len(decoder_layers(sk.model))
    for i in tqdm(range(partial.n_finished, n), desc=f"{layers.recipe.method.upper()} (streamed)", unit="block",
                  disable=not progress):
        prefix = _load_block(sk, i)
        quantize_data_free(layers, [n for n in layers.specs if n.startswith(prefix + ".")], progress=False)
        _save_block(sk, layers, partial, i, prefix)


def _quantize_head(sk: Skeleton, layers: LayerQuantizer) -> str | None:
    """An untied head read (and rounded when the recipe asks); returns its name when rounded.
    Called before the embeddings are read again, and a rounded head's float weight is freed (its
    record is what the checkpoint stores): a 7B model's head and embeddings are 2.2 GB each in
    float32, and would otherwise be held together with the rounding's temporaries."""
    head = _untied_head(sk.model)
    if head is None:
        return None
    materialize(sk.model, parameters_under(sk.model, head), sk.weights, sk.dtype)
    check_finite_weights(sk.model.get_submodule(head), head)
    if not layers.recipe.head_bits:
        return None
    quantize_head(layers, *output_head(sk.model))
    release(sk.model, [f"{head}.weight"])
    release_freed_memory()
    return head


def _finish(sk: Skeleton, layers: LayerQuantizer, partial: PartialCheckpoint, head: str | None, skipped: list[str],
            ids: torch.Tensor | None, protect: list, t0: float, resumed: int) -> StreamedResult:
    """The block files joined into the checkpoint, which replaces the unfinished folder; the
    tensors go from the block files to the checkpoint's one at a time."""
    model, recipe = sk.model, layers.recipe
    blocks = block_prefix(model, 0).rsplit(".", 1)[0]
    rest = {k: v for k, v in model.state_dict().items() if not k.startswith(blocks + ".")}
    head_quant, rest_dense, entries = split_state({head: layers.weights[head]} if head else {}, rest)
    reports = {head: layers.reports[head]} if head else {}
    for block in partial.blocks:
        for name, layer in block.layers.items():
            entries[name] = LayerEntry.from_dict(layer["entry"])
            reports[name] = LayerReport.from_dict(layer["report"])
    with partial.joined() as (block_quant, block_dense):
        quant, dense = block_quant.with_tensors(head_quant), block_dense.with_tensors(rest_dense)
        records = {n: PackedWeight(e.fmt, e.shape, _parts_of(quant.layout, n)) for n, e in entries.items()}
        calibration = None if ids is None else calibration_report(recipe, ids)
        result = QuantizedModel(sk.loaded, recipe, records, reports, skipped, calibration, time.perf_counter() - t0,
                                peak_rss_bytes())
        if result.fallbacks:
            result.extra["fallbacks"] = result.fallbacks
            log.warning(result.fallback_summary())
        dtype = str(sk.dtype).removeprefix("torch.")
        path = write_checkpoint(quant, dense, entries, model.config, sk.loaded.tokenizer, dtype, partial.path,
                                result.manifest_info(), report=lambda m: quantize_report(m, []), overwrite=True,
                                protect=protect)
    return StreamedResult(path, result.seconds, peak_rss_bytes(), result.size, resumed, result.fallbacks)


def _parts_of(quant: Mapping[str, torch.Tensor], name: str) -> dict[str, torch.Tensor]:
    """Layer `name`'s packed record parts among split_state's quantized tensors (its bias aside)."""
    return {k[len(name) + 1:]: t for k, t in quant.items() if k.startswith(name + ".") and k != f"{name}.bias"}
