"""Long-context decode with a compressed KV cache: tokens/s and peak RSS, full cache beside each.

    python benchmarks/kv_decode.py --model smollm2-135m --context 4096 --new 32 --caches full,kivi4,kivi2

Each cache runs in its own process (so peak RSS is that run's own): prefill `--context` tokens
of WikiText-2 in chunks of 512, then decode `--new` tokens greedily. Runs are interleaved
(full, kivi4, full, kivi4, ...) `--repeats` times and the median decode rate is reported with its
ratio to the full cache's. Peak RSS is the process's maximum resident set (ru_maxrss), the model
included, so the difference between rows is what the cache saves.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time


def one(model: str, cache_name: str, context: int, new: int) -> dict:
    import torch

    from lowbit.data import eval_tokens
    from lowbit.models import load_model
    from lowbit.runtime.generate import generate
    from lowbit.runtime.kvcache import cache_nbytes, kv_cache_for

    lm = load_model(model, dtype=torch.float32, progress=False)
    ids = eval_tokens(lm.tokenizer, "wikitext2", context)[0]
    kv = None if cache_name == "full" else cache_name
    from transformers.cache_utils import DynamicCache

    cache = kv_cache_for(lm.model.config, kv, mode="prompt") or DynamicCache()
    t0 = time.perf_counter()
    out = generate(lm.model, ids, new, cache)
    total = time.perf_counter() - t0
    held = cache_nbytes(cache)
    return {"cache": cache_name, "prefill_s": out.prefill_seconds, "decode_tok_s": (len(out.tokens) - 1) / out.decode_seconds,
            "total_s": total, "kv_bytes": held, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "tokens": out.tokens}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--context", type=int, default=4096)
    p.add_argument("--new", type=int, default=32)
    p.add_argument("--caches", default="full,kivi4,kivi2")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--one", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.one:
        print(json.dumps(one(a.model, a.one, a.context, a.new)))
        return
    runs: dict[str, list[dict]] = {}
    for _ in range(a.repeats):
        for c in a.caches.split(","):
            r = subprocess.run([sys.executable, __file__, "--one", c, "--model", a.model, "--context", str(a.context),
                                "--new", str(a.new)], capture_output=True, text=True, check=True)
            runs.setdefault(c, []).append(json.loads(r.stdout.strip().splitlines()[-1]))
    full = statistics.median(r["decode_tok_s"] for r in runs["full"]) if "full" in runs else None
    print(f"| cache | decode tok/s (median of {a.repeats}) | vs full | prefill s | KV MB held | peak RSS MB |")
    print("|---|---|---|---|---|---|")
    for c, rs in runs.items():
        d = statistics.median(r["decode_tok_s"] for r in rs)
        kv = rs[0]["kv_bytes"]
        print(f"| {c} | {d:.2f} | {d / full:.2f}x | {statistics.median(r['prefill_s'] for r in rs):.1f} | "
              f"{'-' if kv is None else f'{kv / 1e6:.1f}'} | {max(r['peak_rss_mb'] for r in rs):.0f} |"
              if full else f"| {c} | {d:.2f} | - |")


if __name__ == "__main__":
    main()
