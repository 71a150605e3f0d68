"""The `lowbit` command: argument parsing and printing only; the work happens in the library.

    lowbit models [--fetch NAME]
    lowbit quantize MODEL --method gptq --bits 4 --group-size 64 -o OUT [--eval wikitext2]
    lowbit eval MODEL_OR_CHECKPOINT --data wikitext2 --max-tokens 32768 [--json]
    lowbit info CHECKPOINT [--json]
    lowbit bench accuracy [MODEL ...]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import re
import sys
import traceback
from pathlib import Path

import torch

from lowbit.errors import ConfigError, LowbitError
from lowbit.recipes import CALIB_DTYPES

DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
          "fp16": torch.float16, "float16": torch.float16}


def cpu_has_fast_bf16() -> bool:
    """True when the CPU has native bf16 matmul (AVX512_BF16 or AMX); else bf16 is emulated and
    several times slower than fp32 (measured 8x on an AVX2-only EPYC)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_dtype(name: str) -> torch.dtype:
    """'auto' is bf16 where the CPU computes it natively, fp32 otherwise."""
    if name == "auto":
        return torch.bfloat16 if cpu_has_fast_bf16() else torch.float32
    return DTYPES[name]


def _say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _mb(n: float) -> str:
    return f"{n / 1e6:.1f} MB" if n < 1e9 else f"{n / 1e9:.2f} GB"


# ---------------------------------------------------------------- models
def cmd_models(args) -> int:
    from lowbit.models import KNOWN_MODELS, fetch_known_model, is_present
    from lowbit.models.fetch import known_model_path

    if args.fetch:
        for name in args.fetch:
            path = fetch_known_model(name, cache=args.cache)
            print(f"{name}: {path}")
        return 0
    rows = []
    for name, m in KNOWN_MODELS.items():
        present = is_present(name, cache=args.cache)
        rows.append({"name": name, "architecture": m.architecture, "params": m.params, "file": m.filename,
                     "bytes": m.size_bytes, "present": present,
                     "path": str(known_model_path(name, cache=args.cache)) if present else None})
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    print(f"{'name':<22} {'arch':<8} {'params':<26} {'size':>9}  present")
    for r in rows:
        print(f"{r['name']:<22} {r['architecture']:<8} {r['params']:<26} {_mb(r['bytes']):>9}  "
              f"{r['path'] if r['present'] else 'no (fetched on first use, or: lowbit models --fetch NAME)'}")
    return 0


def cmd_kernels(args) -> int:
    from lowbit import kernels

    failed = 0
    for name in kernels.NAMES:
        try:
            kernels.load(name, cache=args.cache)
            print(f"{name}: ready")
        except kernels.KernelUnavailable as e:
            failed += 1
            print(f"{name}: unavailable, the torch reference is used ({e})")
    return 1 if failed else 0


def cmd_recipes(args) -> int:
    from lowbit.recipes import PRESET_DIR, Recipe, presets

    for name in presets():
        path = PRESET_DIR / f"{name}.toml"
        about = " ".join(line.lstrip("# ").strip() for line in path.read_text().splitlines() if line.startswith("#"))
        if args.verbose_recipes:
            print(f"{name}: {about}\n  {Recipe.from_file(path).describe()}; file {path}")
        else:
            print(f"{name:<18} {about}")
    return 0


# ---------------------------------------------------------------- quantize
def _recipe_from_args(args):
    from lowbit.recipes import Recipe

    base = Recipe.load(args.recipe).to_dict() if args.recipe else Recipe().to_dict()
    flat = {"method": args.method, "bits": args.bits, "group_size": args.group_size, "symmetric": args.sym,
            "head_bits": args.head_bits}
    base.update({k: v for k, v in flat.items() if v is not None})
    for key, value in (("act_order", args.act_order), ("static_groups", args.static_groups), ("damp", args.damp),
                       ("true_sequential", args.true_sequential)):
        if value is not None:
            base["gptq"][key] = value
    for key, value in (("dataset", args.calib_data), ("n_samples", args.calib_samples),
                       ("seqlen", args.calib_seqlen), ("seed", args.seed), ("dtype", args.calib_dtype)):
        if value is not None:
            base["calibration"][key] = value
    if args.no_clip:
        base["clip"]["enabled"] = False
        if base["method"] == "awq":  # AWQ's RTN clips by its own output-error search
            base["awq"]["clip"] = False
    if args.integer_scale is not None:
        base["integer_scale"]["enabled"] = True
        base["integer_scale"]["bits"] = args.integer_scale
    if args.skip:
        base["skip"] = list(base["skip"]) + args.skip
    if args.target_bpw is not None or args.target_size is not None:
        budget = dict(base.get("budget") or {})
        budget.pop("target_bpw", None)
        budget.pop("target_bytes", None)
        if args.target_bpw is not None:
            budget["target_bpw"] = args.target_bpw
        if args.target_size is not None:
            budget["target_bytes"] = args.target_size
        base["budget"] = budget
    if args.levels is not None or args.search_generations is not None:
        if base.get("budget") is None:
            given = "--levels" if args.levels is not None else "--search-generations"
            raise ConfigError(f"{given} shapes a size budget, and there is none: add --target-bpw or --target-size "
                              f"(or a recipe with a [budget] table), or drop {given}")
        if args.levels is not None:
            base["budget"]["levels"] = [lv.strip() for lv in args.levels.split(",")]
        if args.search_generations is not None:
            base["budget"]["generations"] = args.search_generations
    return Recipe.from_dict(base)


def cmd_quantize(args) -> int:
    from lowbit.cli_checks import check_layer_groups
    from lowbit.data import calibration_documents, eval_text, eval_tokens
    from lowbit.eval.perplexity import default_seqlen
    from lowbit.eval.size import quantized_size
    from lowbit.evaluate import REFERENCE_NOTE, evaluate, format_table, reference_result
    from lowbit.memory import check_fits, rss_bytes
    from lowbit.models import KNOWN_MODELS, known_model_path, load_model
    from lowbit.outputs import check_output
    from lowbit.pipeline import (
        check_shapes,
        estimate,
        output_head,
        quantize,
        record_evaluation,
        save,
        target_layers,
    )

    # everything that can be checked is checked before the model is loaded, or right after:
    # nothing found wrong later may throw away finished quantization work
    recipe = _recipe_from_args(args)
    if args.eval:
        if args.max_tokens is not None and args.max_tokens <= 0:
            raise ConfigError(f"--max-tokens {args.max_tokens}: evaluation needs at least one window of tokens; "
                              "give a positive count or leave --max-tokens out to use all the text")
        if args.seqlen is not None and args.seqlen < 2:
            raise ConfigError(f"--seqlen {args.seqlen}: a window needs at least 2 tokens (a context and a target)")
        if args.max_tokens is not None and args.seqlen is not None and args.max_tokens < args.seqlen:
            raise ConfigError(f"--max-tokens {args.max_tokens} is less than one evaluation window (--seqlen "
                              f"{args.seqlen}); raise --max-tokens or lower --seqlen")
    if args.model in KNOWN_MODELS:
        inputs = [known_model_path(args.model, args.cache)]
    else:
        inputs = [Path(args.model).expanduser()] if Path(args.model).expanduser().exists() else []
    out = check_output(args.output, args.force, inputs)
    # fail on missing data now, not after minutes of work
    if recipe.needs_calibration:
        calibration_documents(recipe.calibration.dataset, args.data_dir)
    for ds in args.eval or ():
        eval_text(ds, args.data_dir)
    dtype = resolve_dtype(args.dtype)
    _say(f"loading {args.model} ({dtype}) ...")
    baseline = rss_bytes()  # the process before the model: torch, transformers, lowbit
    loaded = load_model(args.model, dtype=dtype, cache=args.cache)
    if recipe.head_bits:
        output_head(loaded.model)  # a tied head is refused now, not after quantizing
    names, _ = target_layers(loaded.model, recipe)
    check_shapes(loaded.model, names, recipe)
    check_layer_groups(loaded.model, names, recipe)
    if args.eval:
        seqlen = args.seqlen or default_seqlen(loaded.model)
        for ds in args.eval:
            n = eval_tokens(loaded.tokenizer, ds, args.max_tokens, args.data_dir).shape[1]
            if n < seqlen:
                raise ConfigError(f"--eval {ds}: {n} tokens to evaluate, fewer than one window of {seqlen}; "
                                  + ("raise --max-tokens or " if args.max_tokens is not None else "give more text or ")
                                  + "lower --seqlen")
    eval_seqlen = (args.seqlen or default_seqlen(loaded.model)) if args.eval else None
    est = estimate(loaded.model, recipe, baseline_bytes=baseline, eval_seqlen=eval_seqlen)
    _say(f"recipe: {recipe.describe()}; {len(names)} linear layers")
    _say(f"estimate: model {_mb(est['model_bytes'])}, calibration activations {_mb(est['calib_bytes'])}, "
         f"Hessians {_mb(est['hessian_bytes'])}, peak memory {_mb(est['peak_bytes'])}; "
         f"roughly {est['seconds'] / 60:.1f} min on a 2-core CPU")
    check_fits(est["peak_bytes"], f"quantizing {args.model}" + (" and evaluating it" if args.eval else ""),
               _memory_options(args, recipe, dtype))
    result = quantize(loaded, recipe, data_dir=args.data_dir, progress=not args.quiet)
    size = quantized_size(loaded.model)
    _say(f"quantized in {result.seconds:.1f}s; {size.bits_per_weight:.3f} bits/weight, model {_mb(size.model_bytes)}")
    if "budget" in result.extra:
        from lowbit.budget.plan import BudgetReport

        _say(BudgetReport(**result.extra["budget"]).summary())

    # saved before evaluating, so a failing evaluation costs only the evaluation
    try:
        path = save(result, out, overwrite=args.force)
    except ConfigError as e:  # the output changed while we worked (checked above): keep the work
        import os

        aside = out.with_name(f"{out.name}.lowbit-{os.getpid()}")
        save(result, aside)
        raise ConfigError(f"{e}; the new checkpoint was saved as {aside} instead: move it where you want it") from None
    stats = json.loads((path / "manifest.json").read_text()).get("stats", {})
    _say(f"saved {path}: model {_mb(stats['model_bytes'])} at 16 bits, {_mb(stats['disk_bytes'])} on disk "
         f"(report: {path / 'REPORT.md'})")
    evals = []
    if args.eval:
        try:
            ref = load_model(args.model, dtype=dtype, cache=args.cache)
            cand = evaluate(loaded, args.eval, recipe.describe(), args.max_tokens, args.seqlen, ref, args.data_dir,
                            not args.quiet)
            evals = [reference_result(cand, ref.model), cand]
            record_evaluation(path, evals)
        except LowbitError as e:
            raise type(e)(f"evaluation failed: {e}. The checkpoint was saved at {path} before evaluating; "
                          f"evaluate it with `lowbit eval {path}`") from None
        except BaseException:
            _say(f"lowbit: evaluation stopped; the checkpoint was saved at {path} before evaluating")
            raise
        print(format_table(evals))
        for note in cand.notes:
            print(f"\nNote: {note}")
        if loaded.source.kind in ("known", "gguf"):
            print(f"\nNote: {REFERENCE_NOTE}")
    if result.fallbacks and not args.allow_fallback:
        _say(f"lowbit: {result.fallback_summary()}; the checkpoint is saved, but it is not what the recipe asked "
             "for: check the weights and calibration data, or pass --allow-fallback to accept it (exit 0)")
        return 1
    if evals and evals[-1].non_finite:
        _say(f"lowbit: the evaluation of {path} is not finite: the checkpoint does not compute a usable model")
        return 1
    return 0


def _memory_options(args, recipe, dtype) -> list[str]:
    """What would make a quantize job need less memory, for the message that refuses it."""
    options = []
    if args.eval:
        options.append("evaluate later with `lowbit eval` (drop --eval) or a shorter --seqlen")
    if recipe.needs_calibration:
        options.append(f"fewer or shorter calibration samples (--calib-samples, now {recipe.calibration.n_samples}; "
                       f"--calib-seqlen, now {recipe.calibration.seqlen})")
    if dtype == torch.float32:
        options.append("--dtype bf16 (half the model's memory; its weights are rounded to bf16 first)")
    options.append("a machine or container with more memory")
    return options


# ---------------------------------------------------------------- generate
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


def cmd_generate(args) -> int:
    from lowbit.checkpoint import is_checkpoint, load_checkpoint
    from lowbit.models import load_model
    from lowbit.runtime.generate import generate
    from lowbit.runtime.kvcache import cache_nbytes, kv_cache_for, kv_label

    kv = kv_label(args.kv, args.kv_policy, args.kv_budget)
    prompt = _prompt_text(args)
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
        loaded = load_checkpoint(args.model, dtype=dtype, runtime=args.runtime or "packed",
                                 int8_activations=args.activations == "int8")
    else:
        from lowbit.runtime.attention import use_fast_attention

        loaded = load_model(args.model, dtype=dtype, cache=args.cache, progress=not args.quiet)
        use_fast_attention(loaded.model)
    model, tok = loaded.model, loaded.tokenizer
    model.eval()
    ids = torch.tensor(tok(prompt)["input_ids"])
    cache = kv_cache_for(model.config, kv, mode="prompt")
    printed = ""
    new: list[int] = []

    def stream(t: int) -> None:
        nonlocal printed
        new.append(t)
        text = tok.decode(new, skip_special_tokens=True)
        if not args.json and not text.endswith("\ufffd"):  # wait for a whole character
            sys.stdout.write(text[len(printed):])
            sys.stdout.flush()
            printed = text

    out = generate(model, ids, args.max_new_tokens, cache, args.temperature,
                   1.0 if args.top_p is None else args.top_p, 0 if args.seed is None else args.seed,
                   args.prefill_chunk, stop_ids={tok.eos_token_id} if tok.eos_token_id is not None else None,
                   on_token=stream, static=cache is None)
    stats = {"prompt_tokens": out.prompt_tokens, "new_tokens": len(out.tokens),
             "prefill_tokens_per_s": out.prompt_tokens / max(out.prefill_seconds, 1e-9),
             "decode_tokens_per_s": max(len(out.tokens) - 1, 0) / max(out.decode_seconds, 1e-9),
             "kv": kv, "kv_bytes": cache_nbytes(cache) if cache is not None else None}
    if args.json:
        print(json.dumps({"text": tok.decode(out.tokens, skip_special_tokens=True), "tokens": out.tokens, **stats}))
    else:
        print()
        if not args.quiet:
            print(f"[{stats['prompt_tokens']} prompt tokens at {stats['prefill_tokens_per_s']:.1f}/s, "
                  f"{stats['new_tokens']} new at {stats['decode_tokens_per_s']:.1f}/s"
                  + (f", KV cache {kv} holding {stats['kv_bytes'] / 1e6:.2f} MB" if kv else "") + "]", file=sys.stderr)
    return 0


# ---------------------------------------------------------------- eval
def cmd_eval(args) -> int:
    from lowbit.checkpoint import is_checkpoint, load_checkpoint
    from lowbit.data import eval_text
    from lowbit.evaluate import (
        REFERENCE_NOTE,
        check_no_overlap,
        evaluate,
        format_table,
        load_reference_for,
    )
    from lowbit.models import load_model

    dtype = resolve_dtype(args.dtype)
    reference = None
    from lowbit.runtime.kvcache import kv_label

    args.kv = kv_label(args.kv, args.kv_policy, args.kv_budget)  # bad names fail before any loading
    for ds in args.data:
        eval_text(ds, args.data_dir)  # fail on missing data before loading models
    if is_checkpoint(args.model):
        target = (load_checkpoint(args.model, dtype=dtype, runtime="packed", int8_activations=True)
                  if args.activations == "int8" else load_checkpoint(args.model, dtype=dtype))
        recipe = target.manifest.get("recipe", {})
        check_no_overlap((target.manifest.get("calibration") or {}).get("dataset"), args.data)
        if args.reference == "auto":
            reference = load_reference_for(target.manifest, dtype, args.cache)
    else:
        target = load_model(args.model, dtype=dtype, cache=args.cache)
        recipe = None
    if args.reference not in ("auto", "none"):
        reference = load_model(args.reference, dtype=dtype, cache=args.cache)
    label = args.model if not args.kv else f"{args.model} (kv {args.kv}, chunks of {args.kv_chunk})"
    res = evaluate(target, args.data, label, args.max_tokens, args.seqlen, reference, args.data_dir,
                   not args.quiet, kv=args.kv, kv_chunk=args.kv_chunk)
    if recipe:
        from lowbit.recipes import Recipe

        try:
            res.recipe = Recipe.from_dict(recipe).describe()
        except LowbitError:  # a manifest from another lowbit version: show what it says
            res.recipe = f"{recipe.get('method')} w{recipe.get('bits')} g{recipe.get('group_size')}"
    src_kind = ((target.manifest.get("source") or {}).get("kind") if hasattr(target, "manifest")
                else target.source.kind)
    if src_kind in ("known", "gguf"):
        res.notes.append(REFERENCE_NOTE)
    if args.json:  # strict JSON: a NaN or infinite number is written as null (the notes say which)
        print(json.dumps(_finite_or_none(res.to_dict()), indent=2, allow_nan=False))
    else:
        print(format_table([res]))
        for n in res.notes:
            print(f"\nNote: {n}")
    return 1 if res.non_finite else 0


def _finite_or_none(value):
    """`value` with every NaN or infinite float inside it replaced by None."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite_or_none(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite_or_none(v) for v in value]
    return value


# ---------------------------------------------------------------- info
def cmd_info(args) -> int:
    from lowbit.checkpoint import read_manifest, verify_checkpoint
    from lowbit.report import info_text, per_layer_summary

    if args.verify:  # every byte hashed now, whatever the stamps from earlier loads say
        manifest = verify_checkpoint(args.checkpoint)
        print(f"verified: {len(manifest['files'])} files match the sizes and sha256 in the manifest, and no "
              "other file is there; the config and tensor headers agree with it", file=sys.stderr)
    else:
        manifest = read_manifest(args.checkpoint)
    if args.json:
        print(json.dumps({**per_layer_summary(manifest), **manifest}, indent=2))
    else:
        print(info_text(manifest))
    return 0


# ---------------------------------------------------------------- bench
def cmd_bench(args) -> int:
    from lowbit.bench.accuracy import run_accuracy_bench

    run_accuracy_bench(args)
    return 0


def cmd_bench_speed(args) -> int:
    from lowbit.bench.speed import run_speed_bench

    run_speed_bench(args)
    return 0


def cmd_bench_kv(args) -> int:
    from lowbit.bench.kv import run_kv_bench

    run_kv_bench(args)
    return 0


def _size(text: str) -> int:
    """'300MB', '1.2GB', '500000000' -> bytes (decimal units, as file sizes are usually quoted)."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kKmMgG]?)(i?)[bB]?\s*", text)
    if not m:
        raise argparse.ArgumentTypeError(f"expected a size like 300MB or 1.2GB, got {text!r}")
    base = 1024 if m.group(3) else 1000
    return int(float(m.group(1)) * base ** " kmg".index(m.group(2).lower() or " "))


def _number(text: str) -> int | float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    return int(v) if v.is_integer() else v


def _int_from(low: int):
    """An argparse type: an integer of at least `low`."""
    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if v < low:
            raise argparse.ArgumentTypeError(f"must be at least {low}, got {v}")
        return v

    return parse


def _float_in(low: float, high: float, open_low: bool = False, open_high: bool = False):
    """An argparse type: a number in the interval from `low` to `high` (ends open as asked)."""
    interval = f"{'(' if open_low else '['}{low:g}, {high:g}{')' if open_high else ']'}"

    def parse(text: str) -> float:
        try:
            v = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if not (low < v if open_low else low <= v) or not (v < high if open_high else v <= high):
            raise argparse.ArgumentTypeError(f"must be in {interval}, got {text}")
        return v

    return parse


class _Parser(argparse.ArgumentParser):
    """A usage error is one line, `lowbit: error: ...`, and exit code 2 (argparse's own prints
    the whole usage first)."""

    def error(self, message: str):
        self.exit(2, f"lowbit: error: {message} (see `{self.prog} --help`)\n")


def _kv_arguments(p: argparse.ArgumentParser) -> None:
    from lowbit.runtime.kvcache import KV_HELP, POLICIES

    p.add_argument("--kv", help=f"compressed KV cache: {KV_HELP}")
    p.add_argument("--kv-policy", choices=POLICIES, help="evict cached tokens under --kv-budget: streaming "
                   "(attention sinks + recent), h2o (heavy hitters + recent), snapkv (observation-window votes)")
    p.add_argument("--kv-budget", help="tokens kept by --kv-policy: a fraction of those seen (0.2) or a count (512)")


def build_parser() -> argparse.ArgumentParser:
    from lowbit.recipes import METHODS

    p = _Parser(prog="lowbit", description="Compress LLMs after training; evaluate honestly.")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", required=True)

    def common(sp, data=True):
        sp.add_argument("--cache", help="cache directory for fetched models (default $LOWBIT_CACHE or ~/.cache/lowbit)")
        if data:
            sp.add_argument("--data-dir", help="directory with the datasets (default $LOWBIT_DATA, then <cache>/data, ./data)")
        sp.add_argument("-q", "--quiet", action="store_true",
                        help="no progress bars (lowbit's, transformers', huggingface_hub's) and no library info logs")

    m = sub.add_parser("models", help="list known models and whether they are present locally")
    m.add_argument("--fetch", nargs="+", metavar="NAME", help="fetch these known models into the cache")
    m.add_argument("--json", action="store_true")
    common(m, data=False)
    m.set_defaults(func=cmd_models)

    kn = sub.add_parser("kernels", help="build lowbit's native CPU kernels now (otherwise built on first use) and say which load")
    common(kn, data=False)
    kn.set_defaults(func=cmd_kernels)

    rp = sub.add_parser("recipes", help="list the built-in recipe presets (use with quantize --recipe NAME)")
    rp.add_argument("--long", dest="verbose_recipes", action="store_true", help="also show each resolved recipe")
    rp.set_defaults(func=cmd_recipes)

    q = sub.add_parser("quantize", help="quantize a model and save a checkpoint")
    q.add_argument("model", help="known name (see `lowbit models`), HF folder, .gguf file or hub id")
    q.add_argument("-o", "--output", required=True, help="checkpoint folder to write")
    q.add_argument("--recipe", help="recipe file (.toml/.yaml) or preset name (`lowbit recipes` lists them)"
                   "; flags given here override it")
    q.add_argument("--method", choices=list(METHODS),
                   help="rtn, gptq (default), awq (smoothing + RTN), awq-gptq, slim (mixed widths per group + GPTQ), "
                   "awq-slim (smoothing, then slim)")
    q.add_argument("--bits", type=_number, help="code width, 2-8 (default 4); with slim or awq-slim the average "
                   "width, e.g. 2.5")
    q.add_argument("--group-size", type=int, help="columns per group; -1 = per channel (default 128)")
    q.add_argument("--sym", action="store_true", default=None, help="symmetric (default asymmetric with zero points)")
    q.add_argument("--no-clip", action="store_true", help="disable the per-group clipping search")
    q.add_argument("--head-bits", type=int, help="also round an untied output head (lm_head) to this width "
                   "(RTN, groups of 128): it is read every decode step, as much as the rest of a small model")
    q.add_argument("--integer-scale", type=int, nargs="?", const=8, metavar="BITS",
                   help="store group scales as BITS-bit integers (default 8) times one float per row (Integer Scale)")
    q.add_argument("--target-bpw", type=float, help="size budget: average bits per weight (scales and zeros "
                   "counted); bit width and group size are then chosen per layer")
    q.add_argument("--target-size", type=_size, help="size budget for the whole model, e.g. 300MB (16-bit "
                   "embeddings and norms included)")
    q.add_argument("--levels", help="with a budget: comma list of w<bits>g<group> per-layer choices")
    q.add_argument("--search-generations", type=_int_from(0),
                   help="with a budget: evolutionary search steps (default 30; 0: the sensitivity greedy alone)")
    q.add_argument("--act-order", action=argparse.BooleanOptionalAction, default=None)
    q.add_argument("--static-groups", action=argparse.BooleanOptionalAction, default=None)
    q.add_argument("--true-sequential", action=argparse.BooleanOptionalAction, default=None)
    q.add_argument("--damp", type=_float_in(0, 1, open_low=True, open_high=True),
                   help="GPTQ dampening, fraction of mean diag(H), in (0, 1) (default 0.01)")
    q.add_argument("--calib-data", help="calibration dataset (default c4)")
    q.add_argument("--calib-samples", type=_int_from(1), help="calibration samples (default 128)")
    q.add_argument("--calib-seqlen", type=_int_from(2), help="tokens per calibration sample (default 512)")
    q.add_argument("--seed", type=int, help="calibration sampling seed (default 0)")
    q.add_argument("--calib-dtype", choices=CALIB_DTYPES,
                   help="dtype of the calibration forward passes (default float32; bfloat16 runs them under "
                        "autocast, several times faster on CPUs with native bf16, while weights, Hessians and "
                        "the quantization stay float32)")
    q.add_argument("--skip", action="append", help="regex of module names to keep in full precision (repeatable)")
    q.add_argument("--dtype", default="fp32", choices=["auto", *sorted(DTYPES)],
                   help="compute dtype for calibration and evaluation (default fp32; auto = bf16 where the CPU has it natively)")
    q.add_argument("--eval", nargs="+", metavar="DATASET", help="after quantizing, evaluate against the reference "
                   "(datasets separated by spaces or commas)")
    q.add_argument("--max-tokens", type=_int_from(1), default=None, help="with --eval: evaluate on the first N tokens")
    q.add_argument("--seqlen", type=_int_from(2), default=None,
                   help="with --eval: evaluation window (default min(2048, context))")
    q.add_argument("--force", action="store_true", help="replace an existing lowbit checkpoint at -o (never "
                   "another folder, the input model, or the current folder or its parents)")
    q.add_argument("--allow-fallback", action="store_true", help="exit 0 even when layers fell back to "
                   "round-to-nearest because their Hessian would not factorize (the report lists them)")
    common(q)
    q.set_defaults(func=cmd_quantize)

    e = sub.add_parser("eval", help="perplexity, KL divergence to the reference, size")
    e.add_argument("model", help="checkpoint folder, known name, HF folder, .gguf file or hub id")
    e.add_argument("--data", nargs="+", default=["wikitext2"], help="datasets: wikitext2, ptb, c4 or .txt/.jsonl paths")
    e.add_argument("--max-tokens", type=_int_from(1), default=None, help="evaluate on the first N tokens (default all)")
    e.add_argument("--seqlen", type=_int_from(2), default=None, help="window length (default min(2048, context))")
    e.add_argument("--dtype", default="auto", choices=["auto", *sorted(DTYPES)],
                   help="compute dtype for model and reference (default auto: bf16 where the CPU has native bf16, else fp32)")
    e.add_argument("--reference", default="auto",
                   help="'auto' (a checkpoint's source model), 'none', or a model to compare against")
    e.add_argument("--activations", choices=["float", "int8"], default="float",
                   help="int8: evaluate a checkpoint as it runs W8A8 (activations quantized per token)")
    _kv_arguments(e)
    e.add_argument("--kv-chunk", type=_int_from(1), default=128,
                   help="tokens per forward with --kv or --kv-policy: each window runs in chunks that attend to "
                        "earlier chunks only through the compressed cache (default 128)")
    e.add_argument("--json", action="store_true", help="print one JSON object")
    common(e)
    e.set_defaults(func=cmd_eval)

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
    g.add_argument("--seed", type=int, help="sampling seed (default 0; with --temperature > 0)")
    g.add_argument("--prefill-chunk", type=_int_from(1), default=512, help="prompt tokens per forward (default 512)")
    g.add_argument("--dtype", default="auto", choices=["auto", *sorted(DTYPES)],
                   help="compute dtype (default auto: bf16 where the CPU has native bf16, as the packed kernels want; else fp32)")
    _kv_arguments(g)
    g.add_argument("--json", action="store_true", help="print one JSON object instead of streaming")
    g.add_argument("--activations", choices=["float", "int8"], default="float",
                   help="int8: W8A8, activations quantized per token and int8 GEMMs (8-bit per-channel symmetric "
                        "checkpoints only)")
    g.add_argument("--runtime", choices=["packed", "reference"],
                   help="checkpoints: packed codes run by the native kernels (default), or the "
                        "dequantize-every-call reference modules")
    common(g, data=False)
    g.set_defaults(func=cmd_generate)

    i = sub.add_parser("info", help="recipe, per-layer formats, size and provenance of a checkpoint")
    i.add_argument("checkpoint")
    i.add_argument("--json", action="store_true")
    i.add_argument("--verify", action="store_true", help="hash every file and check it against the manifest "
                   "(loading trusts a file unchanged since it was last hashed)")
    i.set_defaults(func=cmd_info)

    b = sub.add_parser("bench", help="benchmarks that write BENCHMARKS.md")
    bsub = b.add_subparsers(dest="bench", required=True)
    ba = bsub.add_parser("accuracy", help="reference vs RTN / GPTQ / peers at several bit widths")
    from lowbit.bench.accuracy import add_arguments

    add_arguments(ba)
    common(ba)
    ba.set_defaults(func=cmd_bench)
    bk = bsub.add_parser("kv", help="compressed KV caches side by side: perplexity, needle, LAMBADA, bytes held")
    from lowbit.bench.kv import add_arguments as add_kv_arguments

    add_kv_arguments(bk)
    common(bk)
    bk.set_defaults(func=cmd_bench_kv)
    bs = bsub.add_parser("speed", help="checkpoints packed vs the bf16 model vs llama.cpp: load, prefill, decode, "
                                       "fraction of read bandwidth")
    from lowbit.bench.speed import add_arguments as add_speed_arguments

    add_speed_arguments(bs)
    common(bs, data=False)
    bs.set_defaults(func=cmd_bench_speed)
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
    problem and the fix: bad flags or input, missing files, not enough memory or disk), 1 a lowbit
    bug (one `lowbit: internal error:` line; -v prints the traceback), 130 interrupted."""
    parser = build_parser()
    args = parser.parse_args(argv)
    for dest in ("eval", "data"):  # datasets may be given as "wikitext2 c4" or "wikitext2,c4"
        if isinstance(getattr(args, dest, None), list):
            setattr(args, dest, [d for item in getattr(args, dest) for d in item.split(",") if d])
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        with _quiet_libraries(getattr(args, "quiet", False)):
            from lowbit.cli_checks import check_args

            check_args(args)  # flags that contradict each other or that this command would ignore
            return args.func(args)
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


if __name__ == "__main__":
    sys.exit(main())
