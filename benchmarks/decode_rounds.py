"""Decode tokens/s of several packed checkpoints in one process, alternating round by round.

    python benchmarks/decode_rounds.py CKPT [CKPT ...] [--rounds 4] [--new-tokens 48]

Each round generates from a 16-token prompt with every checkpoint in turn (static cache, the
lean decode loop, 2 threads), so a host that speeds up or slows down during the run touches all
checkpoints alike. This is an in-process 3-bit-against-4-bit comparison;
`lowbit bench speed` is the full benchmark (fresh processes, llama.cpp and bf16 beside).
"""

import argparse

import torch

from lowbit.loading import load_checkpoint
from lowbit.runtime.generate import generate


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("checkpoints", nargs="+")
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--new-tokens", type=int, default=48)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    models = {c: load_checkpoint(c, dtype=torch.bfloat16, runtime="packed").model for c in args.checkpoints}
    ids = torch.randint(100, 30000, (16,), generator=torch.Generator().manual_seed(0))
    rates: dict[str, list[float]] = {c: [] for c in models}
    for _ in range(args.rounds):
        for c, m in models.items():
            out = generate(m, ids, args.new_tokens, static=True)
            rates[c].append((len(out.tokens) - 1) / out.decode_seconds)
    for c, v in rates.items():
        print(f"{c}: " + " / ".join(f"{x:.1f}" for x in v) + " tokens/s")


if __name__ == "__main__":
    main()
