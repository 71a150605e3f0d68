"""Time the small native passes around the products: per-token int8 activation quantization
(W8A8 / W4A8) and dequantize-to-bfloat16 (prefill), by shape and width.

    python benchmarks/kernel_ops.py [--threads 2]

Times quantize_rows 512x1536 bf16, and the
dequantize of an 8960x1536 weight at 2, 3, 4 and 8 bits.
"""

import argparse
import time

import torch

from lowbit.qtensor import QuantFormat, QuantizedWeight
from lowbit.runtime.packed import PackedLinear, _ext


def _ms(fn, n: int = 20) -> float:
    fn()
    t = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - t) / n * 1e3


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    ext = _ext()
    if ext is None:
        raise SystemExit("the qgemv kernel could not be built here (see `lowbit kernels`)")
    for m, k in ((512, 1536), (512, 8960)):
        x = torch.randn(m, k).bfloat16()
        print(f"quantize_rows {m}x{k} bf16: {_ms(lambda x=x: ext.quantize_rows(x, shifted=True)):.3f} ms")
    g = torch.Generator().manual_seed(0)
    out, k, group = 8960, 1536, 128
    for bits in (4, 3, 2, 8):
        qw = QuantizedWeight(torch.randint(0, 1 << bits, (out, k), generator=g, dtype=torch.uint8),
                             (torch.rand(out, k // group, generator=g) * 0.1 + 0.01).half(),
                             torch.randint(0, 1 << bits, (out, k // group), generator=g, dtype=torch.uint8),
                             QuantFormat(bits, group, False))
        lin = PackedLinear(qw)
        w = torch.empty(out, k, dtype=torch.bfloat16)
        ms = _ms(lambda w=w, lin=lin: ext.dequantize_into(w, lin.packed, lin.widths, lin.offsets, lin.scales, lin.zero_points,
                                             group, lin.interleave))
        print(f"dequantize {out}x{k} w{bits}g{group} -> bf16: {ms:.2f} ms")


if __name__ == "__main__":
    main()
