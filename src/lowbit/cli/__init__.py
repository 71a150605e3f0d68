"""The `lowbit` command: argument parsing and printing only; the work happens in the library.

    lowbit models [--fetch NAME]
    lowbit quantize MODEL --method gptq --bits 4 --group-size 64 -o OUT [--eval wikitext2]
    lowbit eval MODEL_OR_CHECKPOINT --data wikitext2 --max-tokens 32768 [--json]
    lowbit info CHECKPOINT [--json]
    lowbit export CHECKPOINT --to compressed-tensors -o OUT
    lowbit bench accuracy [MODEL ...]

One module per command (models.py also holds kernels and recipes): each adds its subparser
(register) and holds its command function; common.py has what they share, checks.py the checks
of flags against each other. This module assembles the parser and runs a command, turning its
errors into one line and an exit code.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import traceback

from lowbit.cli import bench, export, generate, info, models, quantize
from lowbit.cli import eval as eval_command
from lowbit.cli.checks import check_args
from lowbit.cli.common import _Parser, kv_spec_from_args
from lowbit.errors import DistributedError, LowbitError

__all__ = ["build_parser", "main"]


def build_parser() -> _Parser:
    from lowbit import __version__

    p = _Parser(prog="lowbit", description="Compress LLMs after training; evaluate honestly.")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    p.add_argument("--version", action="version", version=f"lowbit {__version__}")
    sub = p.add_subparsers(dest="command", required=True)
    for command in (models, quantize, eval_command, generate, info, export, bench):  # the order `lowbit --help` lists
        command.register(sub)
    return p


@contextlib.contextmanager
def _quiet_libraries(quiet: bool):
    """With -q: no progress bars from transformers or huggingface_hub (weights loading, downloads)
    and none of their logs below errors; the previous settings are restored afterwards."""
    if not quiet:
        yield
        return
    import huggingface_hub.utils as hub_utils
    from transformers.utils import logging as hf_logging

    bars, hub_bars = hf_logging.is_progress_bar_enabled(), not hub_utils.are_progress_bars_disabled()
    levels = hf_logging.get_verbosity(), hub_utils.logging.get_verbosity()
    hf_logging.disable_progress_bar()  # transformers' bars and huggingface_hub's
    hub_utils.disable_progress_bars()
    hf_logging.set_verbosity_error()
    hub_utils.logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(levels[0])
        hub_utils.logging.set_verbosity(levels[1])
        if bars:
            hf_logging.enable_progress_bar()
        if not hub_bars:
            hub_utils.disable_progress_bars()
        elif not bars:
            hub_utils.enable_progress_bars()


# what each command can do with less memory, for an out-of-memory error
_LESS_MEMORY = {
    "quantize": "load the model at --dtype bf16, lower --calib-samples or --calib-seqlen, or use a smaller model",
    "generate": "lower --max-new-tokens, use --kv int4 or --dtype bf16, or a smaller model",
    "eval": "lower --seqlen, use --reference none or --dtype bf16, or a smaller model",
    "bench": "run fewer jobs or smaller models, or lower --max-tokens",
}


def _out_of_memory(e: BaseException) -> bool:
    if isinstance(e, MemoryError):
        return True
    text = str(e)
    return isinstance(e, RuntimeError) and ("can't allocate memory" in text or "DefaultCPUAllocator" in text
                                            or "out of memory" in text)


def _first_line(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return lines[0] if lines else type(e).__name__


def _os_error_message(e: OSError) -> str:
    import errno

    where = e.filename if e.filename2 is None else f"{e.filename} -> {e.filename2}"
    fix = {errno.ENOSPC: "free some disk space or write somewhere else (-o, --cache, $TMPDIR)",
           errno.EDQUOT: "free some disk space or write somewhere else (-o, --cache, $TMPDIR)",
           errno.EACCES: "check the file's permissions or choose another path",
           errno.EPERM: "check the file's permissions or choose another path",
           errno.EROFS: "the file system is read-only: choose another path",
           errno.ENOENT: "check the path",
           errno.EISDIR: "give a file, not a folder",
           errno.ENOTDIR: "a part of the path is a file, not a folder"}.get(e.errno, "check the path")
    return f"{e.strerror or type(e).__name__}: {where}; {fix}"


def main(argv: list[str] | None = None) -> int:
    """Run one command. Exit codes: 0 done, 2 refused (a one-line `lowbit: error:` naming the
    problem and the fix: bad flags or input, missing files, not enough memory or disk), 3 a
    distributed job stopped because one of its ranks failed (cli/workers.py), 1 a lowbit bug (one
    `lowbit: internal error:` line; -v prints the traceback), 130 interrupted."""
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # the command line, to say how to run it again
    for dest in ("eval", "data"):  # datasets may be given as "wikitext2 c4" or "wikitext2,c4"
        if isinstance(getattr(args, dest, None), list):
            setattr(args, dest, [d for item in getattr(args, dest) for d in item.split(",") if d])
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        with _quiet_libraries(getattr(args, "quiet", False)):
            if hasattr(args, "kv_policy"):  # eval, generate: the cache flags become one CacheSpec
                kv_spec_from_args(args)
            check_args(args)  # flags that contradict each other or that this command would ignore
            return args.func(args)
    except DistributedError as e:
        print(f"lowbit: error: {e}", file=sys.stderr)
        return 3
    except LowbitError as e:
        print(f"lowbit: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("lowbit: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # stdout closed early (| head): stop quietly
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except Exception as e:  # noqa: BLE001 - the last resort: one line, not a traceback (MemoryError, OSError...)
        if args.verbose:
            traceback.print_exc()
        if _out_of_memory(e):
            print(f"lowbit: error: out of memory ({_first_line(e)}); to need less: "
                  f"{_LESS_MEMORY.get(args.command, 'use a smaller model')}", file=sys.stderr)
            return 2
        if isinstance(e, OSError) and e.filename is not None:
            print(f"lowbit: error: {_os_error_message(e)}", file=sys.stderr)
            return 2
        hint = "" if args.verbose else f"; run `lowbit -v {args.command} ...` for the traceback"
        print(f"lowbit: internal error: {type(e).__name__}: {_first_line(e)} (a lowbit bug{hint})", file=sys.stderr)
        return 1
