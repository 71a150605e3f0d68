"""A packed checkpoint's decode step against the host's read rate, in one process, interleaved.

    python benchmarks/decode_bandwidth.py CKPT [--rounds 4] [--steps 40] [--threads 2]

Each round measures, back to back: the read rate (`lowbit.bench.speed.read_bandwidth`, summing
1 GiB), `--steps` lean decode steps (the native loop when it applies), and the same step's packed
products alone (every layer's four products and the head, called one after another on fixed
inputs). Bytes are the packed codes, scales and zero points of every packed linear (what a step
reads, less the one embedding row and the KV cache). The step's rate over the read rate is the
fraction `lowbit bench speed` reports; the products' rate separates the kernels from the rest of
the step. The host's read rate swings from minute to minute, so only numbers of one round are
compared with each other.
"""

import argparse
import time

import torch
from transformers.cache_utils import StaticCache

from lowbit.bench.speed import read_bandwidth
from lowbit.loading import load_checkpoint
from lowbit.runtime.decode import LeanDecoder
from lowbit.runtime.generate import prefill


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("checkpoint")
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--prompt", type=int, default=64)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    model = load_checkpoint(args.checkpoint, dtype=torch.bfloat16, runtime="packed").model
    cache = StaticCache(model.config, max_cache_len=args.prompt + args.rounds * args.steps + 8)
    prefill(model, torch.arange(100, 100 + args.prompt), cache)
    dec = LeanDecoder(model, cache)
    products = [(pr, torch.randn(1, pr.in_features).bfloat16())
                for plan in dec.plans for pr in (plan.qkv_p, plan.o_p, plan.gate_up_p, plan.down_p) if pr is not None]
    nbytes = sum(t.numel() * t.element_size() for m in model.modules() if hasattr(m, "packed")
                 for t in (m.packed, m.scales, m.zero_points))
    head_x = torch.randn(1, 1, model.config.hidden_size).bfloat16()
    print(f"{args.checkpoint}: {nbytes / 1e6:.0f} MB of packed weights, native loop: {dec.native is not None}")
    pos = args.prompt
    with torch.inference_mode():
        for _ in range(args.rounds):
            bw = read_bandwidth(args.threads)
            t = time.perf_counter()
            for _ in range(args.steps):
                dec.step(5, pos)
                pos += 1
            step = (time.perf_counter() - t) / args.steps
            t = time.perf_counter()
            for _ in range(args.steps):
                for pr, x in products:
                    pr(x)
                model.lm_head(head_x)
            prods = (time.perf_counter() - t) / args.steps
            print(f"read {bw / 1e9:.1f} GB/s | step {step * 1e3:.2f} ms, {nbytes / step / 1e9:.1f} GB/s, "
                  f"{nbytes / step / bw:.0%} | products alone {prods * 1e3:.2f} ms, {nbytes / prods / 1e9:.1f} GB/s, "
                  f"{nbytes / prods / bw:.0%}", flush=True)


if __name__ == "__main__":
    main()
