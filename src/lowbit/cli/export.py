"""`lowbit export`: a checkpoint in another engine's format (compressed-tensors, for vLLM and
transformers)."""

from __future__ import annotations

from lowbit.cli.common import _say
from lowbit.dtypes import DTYPES, dtype_help, dtype_name

TARGETS = ("compressed-tensors",)


def register(sub) -> None:
    x = sub.add_parser("export", help="write a checkpoint as compressed-tensors (vLLM, transformers)")
    x.add_argument("checkpoint", help="a lowbit checkpoint folder")
    x.add_argument("--to", choices=TARGETS, required=True, help="the format to write")
    x.add_argument("-o", "--output", required=True, help="the folder to write (must not exist)")
    x.add_argument("--dtype", type=dtype_name, default="auto", metavar="DTYPE",
                   help=f"dtype of the scales and unquantized tensors: {dtype_help()} (default auto: the dtype the "
                        "checkpoint was saved in)")
    x.add_argument("-q", "--quiet", action="store_true", help="print only errors")
    x.set_defaults(func=cmd_export)


def cmd_export(args) -> int:
    from lowbit.export.compressed_tensors import export_compressed_tensors

    dtype = None if args.dtype == "auto" else DTYPES[args.dtype]
    result = export_compressed_tensors(args.checkpoint, args.output, dtype)
    if not args.quiet:
        n = sum(len(v) for v in result.groups.values())
        dtype_text = str(result.dtype).removeprefix("torch.")
        _say(f"wrote {result.path}: {n} quantized layers in {len(result.groups)} config groups, "
             f"scales and dense tensors in {dtype_text}")
        for key, names in result.groups.items():
            _say(f"  {key.describe()}: {len(names)} layers")
        if result.ignored:
            _say(f"  kept dense: {', '.join(result.ignored)}")
        for note in result.notes:
            _say(f"Note: {note}")
    print(result.path)
    return 0
