"""`lowbit eval`: perplexity, KL divergence to the reference, and size of a model or checkpoint."""

from __future__ import annotations

import json
import math

from lowbit.cli.common import _int_from, _kv_arguments, common_arguments
from lowbit.dtypes import add_dtype_argument, resolve_dtype
from lowbit.errors import ConfigError, LowbitError


def register(sub) -> None:
    e = sub.add_parser("eval", help="perplexity, KL divergence to the reference, size")
    e.add_argument("model", help="checkpoint folder, known name, HF folder, .gguf file or hub id")
    e.add_argument("--data", nargs="+", default=["wikitext2"], help="datasets: wikitext2, ptb, c4 or .txt/.jsonl paths")
    e.add_argument("--max-tokens", type=_int_from(1), default=None, help="evaluate on the first N tokens (default all)")
    e.add_argument("--seqlen", type=_int_from(2), default=None, help="window length (default min(2048, context))")
    add_dtype_argument(e, "auto", "compute dtype of the model and the reference (always the same)")
    e.add_argument("--reference", default="auto",
                   help="'auto' (a checkpoint's source model), 'none', or a model to compare against")
    e.add_argument("--stream", action="store_true",
                   help="evaluate one decoder block in memory at a time (every window runs through a block before "
                        "the next is read): a checkpoint and its reference, for models that do not fit in memory "
                        "(a model given instead of a checkpoint is loaded whole; its --reference streams)")
    e.add_argument("--activations", choices=["float", "int8"], default="float",
                   help="int8: evaluate a checkpoint as it runs W8A8 (activations quantized per token)")
    _kv_arguments(e)
    e.add_argument("--kv-chunk", type=_int_from(1), default=128,
                   help="tokens per forward with --kv or --kv-policy: each window runs in chunks that attend to "
                        "earlier chunks only through the compressed cache (default 128)")
    e.add_argument("--json", action="store_true", help="print one JSON object")
    common_arguments(e)
    e.set_defaults(func=cmd_eval)


def cmd_eval(args) -> int:
    from contextlib import ExitStack

    from lowbit.checkpoint import is_checkpoint
    from lowbit.data import eval_text
    from lowbit.eval.evaluate import REFERENCE_NOTE, evaluate, format_table
    from lowbit.models.skeleton import load_skeleton

    _check_stream(args, is_checkpoint(args.model))
    dtype = resolve_dtype(args.dtype)
    kv = args.kv_spec  # parsed by main() before any loading
    for ds in args.data:
        eval_text(ds, args.data_dir)  # fail on missing data before loading models
    with ExitStack() as open_files:
        target, recipe, reference = _target(args, dtype, open_files)
        if args.reference not in ("auto", "none"):
            from lowbit.models import load_model

            reference = (load_skeleton(args.reference, dtype=dtype, cache=args.cache, progress=not args.quiet)
                         if args.stream else load_model(args.reference, dtype=dtype, cache=args.cache))
        label = args.model if kv is None else f"{args.model} (kv {kv.label}, chunks of {args.kv_chunk})"
        res = evaluate(target, args.data, label, args.max_tokens, args.seqlen, reference, args.data_dir,
                       not args.quiet, kv=kv, kv_chunk=args.kv_chunk)
    if recipe:
        from lowbit.recipes import Recipe

        try:
            res.recipe = Recipe.from_dict(recipe).describe()
        except LowbitError:  # a manifest from another lowbit version: show what it says
            res.recipe = f"{recipe.get('method')} w{recipe.get('bits')} g{recipe.get('group_size')}"
    src_kind = target.manifest.source.kind if hasattr(target, "manifest") else target.source.kind
    if src_kind == "gguf":  # the file's own storage of the decoder blocks, as stored (scales included)
        from lowbit.peers.llamacpp import gguf_bits_per_weight

        res.size["bits_per_weight"], res.size["gguf_types"] = gguf_bits_per_weight(target.source.path)
    if src_kind in ("known", "gguf"):
        res.notes.append(REFERENCE_NOTE)
    if args.json:  # strict JSON: a NaN or infinite number is written as null (the notes say which)
        print(json.dumps(_finite_or_none(res.to_dict()), indent=2, allow_nan=False))
    else:
        print(format_table([res]))
        for n in res.notes:
            print(f"\nNote: {n}")
    return 1 if res.non_finite else 0


def _target(args, dtype, open_files):
    """(the model to evaluate, its recipe as the manifest records it or None, the reference 'auto'
    finds or None). A checkpoint with --stream is opened to be read one block at a time; its
    files stay open until `open_files` (an ExitStack) closes."""
    from lowbit.checkpoint import is_checkpoint
    from lowbit.eval.evaluate import check_no_overlap, load_reference_for
    from lowbit.models import load_model

    reference = None
    if is_checkpoint(args.model):
        if args.stream:
            from lowbit.eval.streamed_checkpoint import open_streamed

            target = open_files.enter_context(open_streamed(args.model, dtype=dtype))
        else:
            from lowbit.loading import load_checkpoint

            target = (load_checkpoint(args.model, dtype=dtype, runtime="packed", int8_activations=True)
                      if args.activations == "int8" else load_checkpoint(args.model, dtype=dtype))
        check_no_overlap((target.manifest.calibration or {}).get("dataset"), args.data)
        if args.reference == "auto":
            reference = load_reference_for(target.manifest.source, dtype, args.cache, stream=args.stream)
        return target, target.manifest.recipe, reference
    target = load_model(args.model, dtype=dtype, cache=args.cache)
    if args.reference == "auto" and target.source.kind == "gguf":
        from lowbit.to_gguf import written_from

        source = written_from(target.source.path)  # a GGUF lowbit wrote names its source model
        if source is not None:
            reference = load_model(source, dtype=dtype, cache=args.cache)
    return target, None, reference


def _check_stream(args, checkpoint: bool) -> None:
    """--stream streams a checkpoint and its reference, or a model's reference: there must be
    something to stream, and nothing asked that needs the whole checkpoint in memory."""
    if not args.stream:
        return
    if not checkpoint and args.reference in ("none", "auto"):
        raise ConfigError("--stream reads a checkpoint, or the reference of a model, one block at a time, and there "
                          "is neither here: evaluate a checkpoint, or name a reference with --reference MODEL")
    if checkpoint and args.activations == "int8":
        raise ConfigError("--activations int8 runs the checkpoint on the packed runtime, loaded whole; --stream "
                          "reads it one block at a time: use one of the two")
    if checkpoint and args.kv_spec is not None:
        raise ConfigError(f"--kv and --kv-policy ({args.kv_spec.label}) run the whole model's forward chunk by "
                          "chunk through the compressed cache; --stream runs the checkpoint one block at a time: "
                          "use one of the two")


def _finite_or_none(value):
    """`value` with every NaN or infinite float inside it replaced by None."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite_or_none(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite_or_none(v) for v in value]
    return value
