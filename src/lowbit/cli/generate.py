"""`lowbit generate`: continue a prompt with a model or checkpoint, streaming the text."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from lowbit.cli.common import (
    _float_in,
    _int_from,
    _kv_arguments,
    _nonempty,
    common_arguments,
)
from lowbit.dtypes import add_dtype_argument, resolve_dtype
from lowbit.errors import ConfigError

if TYPE_CHECKING:
    from lowbit.runtime.kvcache import CacheSpec


def register(sub) -> None:
    g = sub.add_parser("generate", help="continue a prompt with a model or checkpoint, streaming the text")
    g.add_argument("model", help="checkpoint folder, known model name, HF folder or GGUF file")
    g.add_argument("--prompt", help="prompt text")
    g.add_argument("--prompt-file", help="read the prompt from this file")
    g.add_argument("--max-new-tokens", type=_int_from(1), default=64,
                   help="tokens to generate (default 64); the prompt and these must fit in the model's context")
    g.add_argument("--temperature", type=_float_in(0, float("inf")), default=0.0,
                   help="0 (default): greedy; > 0: sampling")
    g.add_argument("--top-p", type=_float_in(0, 1, open_low=True),
                   help="nucleus sampling mass in (0, 1] (default 1; with --temperature > 0)")
    g.add_argument("--top-k", type=_int_from(1), help="sample among the K most likely tokens only (with "
                   "--temperature > 0)")
    g.add_argument("--seed", type=int, help="sampling seed (default 0; with --temperature > 0)")
    g.add_argument("--repetition-penalty", type=_float_in(0, float("inf"), open_low=True),
                   help="divide the scores of tokens already in the prompt or the output by this (> 1 discourages "
                        "repeats; default 1: off); greedy or sampled")
    g.add_argument("--stop", action="append", type=_nonempty("--stop"), metavar="STRING",
                   help="end the output before this text (repeatable); greedy or sampled")
    g.add_argument("--raw", action="store_true", help="use the prompt as it is; by default a tokenizer with a "
                   "chat template (instruct models) gets the prompt as one user turn of it")
    g.add_argument("--system", metavar="TEXT", help="a system message before the prompt, through the chat template")
    g.add_argument("--prefill-chunk", type=_int_from(1), default=512, help="prompt tokens per forward (default 512)")
    add_dtype_argument(g, "auto", "compute dtype (the packed kernels' fast path wants bfloat16)")
    _kv_arguments(g)
    g.add_argument("--json", action="store_true", help="print one JSON object instead of streaming")
    g.add_argument("--activations", choices=["float", "int8"], default="float",
                   help="int8: W8A8, activations quantized per token and int8 GEMMs (8-bit per-channel symmetric "
                        "checkpoints only)")
    g.add_argument("--runtime", choices=["packed", "reference"],
                   help="checkpoints: packed codes run by the native kernels (default), or the "
                        "dequantize-every-call reference modules")
    common_arguments(g, data=False)
    g.set_defaults(func=cmd_generate)


def _prompt_text(args) -> str:
    """The prompt from --prompt or --prompt-file, refused (ConfigError) when it is missing, empty
    or not UTF-8 text. Python hands invalid UTF-8 in argv over as lone surrogates."""
    from lowbit.data import read_text_file

    if args.prompt is not None and args.prompt_file is not None:
        raise ConfigError("give --prompt or --prompt-file, not both")
    if args.prompt_file is not None:
        path = Path(args.prompt_file).expanduser()
        if not path.exists():
            raise ConfigError(f"--prompt-file {args.prompt_file!r} does not exist")
        if not path.is_file():
            raise ConfigError(f"--prompt-file {args.prompt_file!r} is not a file")
        prompt = read_text_file(path, "--prompt-file")
    else:
        prompt = args.prompt
        try:
            (prompt or "").encode("utf-8")
        except UnicodeEncodeError as e:
            raise ConfigError(f"--prompt is not valid UTF-8 text (character {e.start} came from bytes that do not "
                              "decode); pass UTF-8 text, or put the prompt in a UTF-8 file for --prompt-file") from None
    if not prompt or not prompt.strip():
        raise ConfigError("give a prompt with some text: --prompt TEXT or --prompt-file FILE")
    return prompt


def _configured_context(model: str) -> int | None:
    """max_position_embeddings from a local folder's config.json, read before anything loads;
    None for other model arguments or when the file does not say."""
    path = Path(model).expanduser() / "config.json"
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    for cfg in (config, config.get("text_config") if isinstance(config, dict) else None):
        n = cfg.get("max_position_embeddings") if isinstance(cfg, dict) else None
        if isinstance(n, int) and n > 0:
            return n
    return None


def _until_stop(text: str, stops: list[str]) -> tuple[str, bool]:
    """`text` cut before the first stop string in it, and whether there was one."""
    hits = [i for i in (text.find(s) for s in stops) if i >= 0]
    return (text[:min(hits)], True) if hits else (text, False)


def _stop_prefix_length(text: str, stops: list[str]) -> int:
    """The length of the longest end of `text` that begins a stop string: held back from the
    stream until the next tokens show whether the stop string follows."""
    return max((k for s in stops for k in range(1, len(s)) if text.endswith(s[:k])), default=0)


def _load_for_generate(args, kv: CacheSpec | None):
    """The model or checkpoint to generate with, after the checks that need no loading: flags
    that apply to checkpoints only, and --max-new-tokens against a local folder's context."""
    from lowbit.checkpoint import is_checkpoint
    from lowbit.loading import load_checkpoint
    from lowbit.models import load_model

    checkpoint = is_checkpoint(args.model)
    if not checkpoint and (args.activations != "float" or args.runtime is not None):
        flag = "--activations int8" if args.activations != "float" else f"--runtime {args.runtime}"
        raise ConfigError(f"{flag} applies to a lowbit checkpoint, and {args.model!r} is not one; quantize it "
                          "first (lowbit quantize) or drop the flag")
    ctx = None if kv else _configured_context(args.model)
    if ctx is not None and args.max_new_tokens >= ctx:  # a full cache for all of them: refuse before loading
        raise ConfigError(f"--max-new-tokens {args.max_new_tokens}: the model's context is {ctx} tokens, prompt "
                          f"included; ask for fewer than {ctx}")
    dtype = resolve_dtype(args.dtype)
    if checkpoint:
        return load_checkpoint(args.model, dtype=dtype, runtime=args.runtime or "packed",
                               int8_activations=args.activations == "int8")
    from lowbit.runtime.attention import use_fast_attention

    loaded = load_model(args.model, dtype=dtype, cache=args.cache, progress=not args.quiet)
    use_fast_attention(loaded.model)
    return loaded


def _prompt_ids(args, tok, prompt: str) -> tuple[bool, torch.Tensor]:
    """Whether the chat template is used, and the prompt's token ids (through it, or raw)."""
    from lowbit.runtime.generate import chat_prompt_ids, has_chat_template

    chat = not args.raw and has_chat_template(tok)
    if args.system is not None and not chat:
        raise ConfigError(f"--system needs a chat template, and {args.model!r}'s tokenizer has none; put the "
                          "instructions in the prompt instead")
    return chat, torch.tensor(chat_prompt_ids(tok, prompt, args.system) if chat else tok(prompt)["input_ids"])


class _Stream:
    """on_token for generate(): decodes the tokens so far and writes what is new to stdout (unless
    `echo` is off), holding back what may be the start of a stop string, and half a character."""

    def __init__(self, tok, stops: list[str], echo: bool):
        self.tok, self.stops, self.echo = tok, stops, echo
        self.printed = ""
        self.stopped = False
        self.new: list[int] = []

    def __call__(self, t: int) -> None:
        self.new.append(t)
        text, self.stopped = _until_stop(self.tok.decode(self.new, skip_special_tokens=True), self.stops)
        if not self.stopped:
            text = text[:len(text) - _stop_prefix_length(text, self.stops)]
            if text.endswith("\ufffd"):
                return
        if self.echo:
            sys.stdout.write(text[len(self.printed):])
            sys.stdout.flush()
        self.printed = text


def _print_result(args, text: str, out, stats: dict) -> None:
    """One JSON object with --json; otherwise the end of the streamed line and, unless -q, the speeds."""
    if args.json:
        print(json.dumps({"text": text, "tokens": out.tokens, **stats}))
        return
    print()
    if not args.quiet:
        kv = stats["kv"]
        print(f"[{stats['prompt_tokens']} prompt tokens at {stats['prefill_tokens_per_s']:.1f}/s, "
              f"{stats['new_tokens']} new at {stats['decode_tokens_per_s']:.1f}/s"
              + (f", KV cache {kv} holding {stats['kv_bytes'] / 1e6:.2f} MB" if kv else "") + "]", file=sys.stderr)


def cmd_generate(args) -> int:
    from lowbit.runtime.generate import generate
    from lowbit.runtime.kvcache import cache_nbytes, kv_cache_for

    kv = args.kv_spec  # parsed by main() before any loading
    prompt = _prompt_text(args)
    loaded = _load_for_generate(args, kv)
    model, tok = loaded.model, loaded.tokenizer
    model.eval()
    chat, ids = _prompt_ids(args, tok, prompt)
    cache = kv_cache_for(model.config, kv, mode="prompt")
    stops = args.stop or []
    stream = _Stream(tok, stops, echo=not args.json)
    out = generate(model, ids, args.max_new_tokens, cache, args.temperature,
                   1.0 if args.top_p is None else args.top_p, 0 if args.seed is None else args.seed,
                   args.prefill_chunk, stop_ids={tok.eos_token_id} if tok.eos_token_id is not None else None,
                   on_token=stream, static=cache is None, top_k=args.top_k,
                   repetition_penalty=args.repetition_penalty, stop=(lambda _: stream.stopped) if stops else None)
    text, stopped = _until_stop(tok.decode(out.tokens, skip_special_tokens=True), stops)
    if not args.json and len(text) > len(stream.printed):  # what was held back and turned out not to stop
        sys.stdout.write(text[len(stream.printed):])
    stats = {"prompt_tokens": out.prompt_tokens, "chat_template": chat, "stopped_at_string": stopped,
             "new_tokens": len(out.tokens),
             "prefill_tokens_per_s": out.prompt_tokens / max(out.prefill_seconds, 1e-9),
             "decode_tokens_per_s": max(len(out.tokens) - 1, 0) / max(out.decode_seconds, 1e-9),
             "kv": kv.label if kv else None, "kv_bytes": cache_nbytes(cache) if cache is not None else None}
    _print_result(args, text, out, stats)
    return 0
