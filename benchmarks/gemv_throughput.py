"""Weights per second of the packed bf16 decode product, by width, shape and group size.

    python benchmarks/gemv_throughput.py [--threads 1] [--shapes 8960x1536,1536x8960]
                                         [--group-size 128] [--bits 4,3,2,8]

One activation row times one random packed weight, called back to back, so the weight stays in
the caches when it fits (an 8960x1536 4-bit weight is 7.3 MB: L3 here) and comes from DRAM when
it does not. If G weights/s stay the same from L2-sized to DRAM-sized shapes, the product is
bound by the core, not by memory; the read bandwidth a width could reach is then this rate times
its bytes per weight. (A diagnostic script; its figures are not quoted in BENCHMARKS.md.)
"""

import argparse
import time

import torch

from lowbit.qtensor import QuantFormat, QuantizedWeight
from lowbit.runtime.packed import PackedLinear


def random_weight(out: int, k: int, bits: int, group: int) -> QuantizedWeight:
    """Uniformly random codes, float16 scales and integer zero points of one format."""
    g = torch.Generator().manual_seed(0)
    codes = torch.randint(0, 1 << bits, (out, k), generator=g, dtype=torch.uint8)
    scales = (torch.rand(out, k // group, generator=g) * 0.1 + 0.01).half()
    zeros = torch.randint(0, 1 << bits, (out, k // group), generator=g, dtype=torch.uint8)
    return QuantizedWeight(codes, scales, zeros, QuantFormat(bits, group, False))


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--shapes", default="512x1536,2048x1536,8960x1536,17920x1536,1536x8960")
    p.add_argument("--group-size", type=int, default=128)
    p.add_argument("--bits", default="4,3,2,8")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    widths = [int(b) for b in args.bits.split(",")]
    print(f"threads {args.threads}, group {args.group_size}: G weights/s (time per product)")
    for shape in args.shapes.split(","):
        out, k = map(int, shape.split("x"))
        if k % args.group_size:
            print(f"{shape:>11}: skipped ({k} columns are not a multiple of the group size {args.group_size})")
            continue
        row = []
        for bits in widths:
            lin = PackedLinear(random_weight(out, k, bits, args.group_size))
            x = torch.randn(1, k, dtype=torch.bfloat16)
            with torch.inference_mode():
                for _ in range(20):
                    lin(x)
                n = max(50, int(2e9 / (out * k)))
                t = time.perf_counter()
                for _ in range(n):
                    lin(x)
                dt = (time.perf_counter() - t) / n
            row.append(f"w{bits} {out * k / dt / 1e9:6.1f} ({dt * 1e6:.0f} us)")
        print(f"{shape:>11}: " + " | ".join(row))


if __name__ == "__main__":
    main()
