"""Milliseconds per lean decode step of one packed checkpoint after a prompt, in a fresh process.

    python benchmarks/decode_step.py CKPT [--prompt 512] [--steps 60] [--threads 2]

Run it alternately for two builds or checkpoints (A B A B ...) to compare them on the same host
state.
"""

import argparse
import time

import torch
from transformers.cache_utils import StaticCache

from lowbit.loading import load_checkpoint
from lowbit.runtime.decode import LeanDecoder
from lowbit.runtime.generate import prefill


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("checkpoint")
    p.add_argument("--prompt", type=int, default=512)
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    model = load_checkpoint(args.checkpoint, dtype=torch.bfloat16, runtime="packed").model
    cache = StaticCache(model.config, max_cache_len=args.prompt + args.steps + 8)
    ids = torch.randint(100, 10000, (args.prompt,), generator=torch.Generator().manual_seed(0))
    prefill(model, ids, cache, chunk=512)
    dec = LeanDecoder(model, cache)
    pos = args.prompt
    for _ in range(5):
        dec.step(200, pos)
        pos += 1
    t = time.perf_counter()
    for i in range(args.steps):
        dec.step(200 + i, pos + i)
    print(f"{args.checkpoint}: {(time.perf_counter() - t) / args.steps * 1e3:.2f} ms/step "
          f"after {args.prompt} prompt tokens")


if __name__ == "__main__":
    main()
