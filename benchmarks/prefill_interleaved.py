"""Prefill of one prompt through several models loaded in one process, interleaved round by round.

The ratio BENCHMARKS.md quotes for W8A8 prefill against bf16 comes from this script: loading all
models in one process and alternating them removes the between-process noise `lowbit bench speed`
sees on a shared host.

    python benchmarks/prefill_interleaved.py out/qwen-w8a8@int8 out/qwen-w4g128-h8 \\
        --reference qwen2.5-coder-1.5b --tokens 512 --rounds 4 --threads 2 [--sdpa-too]

--sdpa-too also runs every model with transformers' "sdpa" attention (torch's CPU flash kernel) in
each round, beside lowbit's blocked prefill attention (runtime/attention.py).
"""

import argparse
import statistics
import time

import torch
from transformers import DynamicCache

from lowbit.loading import load_checkpoint
from lowbit.models import load_model
from lowbit.runtime.attention import NAME, use_fast_attention
from lowbit.runtime.generate import prefill


def _set_attention(model: torch.nn.Module, name: str) -> None:
    """Every config of the model to one attention implementation (lowbit's NAME or "sdpa")."""
    for m in model.modules():
        if hasattr(m, "config"):
            m.config._attn_implementation = name


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("checkpoints", nargs="+", help="checkpoint folders; CKPT@int8 runs it with int8 activations")
    p.add_argument("--reference", help="an unquantized model (known name or folder) run in bf16 beside them")
    p.add_argument("--tokens", type=int, default=512)
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--sdpa-too", action="store_true", help="also run each model with torch's sdpa attention")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    models = {}
    for spec in args.checkpoints:
        path = spec.removesuffix("@int8")
        models[spec] = load_checkpoint(path, dtype=torch.bfloat16, runtime="packed",
                                       int8_activations=spec.endswith("@int8")).model
    if args.reference:
        ref = load_model(args.reference, dtype=torch.bfloat16, progress=False).model
        use_fast_attention(ref)
        models[f"{args.reference} (bf16)"] = ref
    ids = torch.randint(100, 30000, (args.tokens,), generator=torch.Generator().manual_seed(0))
    runs = [(name, model, NAME) for name, model in models.items()]
    if args.sdpa_too:
        runs += [(f"{name} [sdpa]", model, "sdpa") for name, model in models.items()]
    seconds = {name: [] for name, _, _ in runs}
    for _ in range(args.rounds):
        for name, model, attention in runs:
            _set_attention(model, attention)
            t0 = time.perf_counter()
            prefill(model, ids, DynamicCache(), args.tokens)
            seconds[name].append(time.perf_counter() - t0)
    for name, s in seconds.items():
        base_name = f"{args.reference} (bf16)" + (" [sdpa]" if name.endswith("[sdpa]") else "")
        base = statistics.median(seconds[base_name]) if args.reference else None
        med = statistics.median(s)
        ratio = f"  {base / med:.2f}x bf16" if base else ""
        print(f"{name}: {args.tokens / med:.0f} tokens/s (rounds: {', '.join(f'{x:.2f}' for x in s)} s){ratio}")


if __name__ == "__main__":
    main()
