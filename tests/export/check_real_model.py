"""By hand, not in the suite (about two minutes on two cores): export an RTN 4-bit checkpoint of
smollm2-135m to compressed-tensors, load it in transformers, and compare its logits with
lowbit's on the first tokens of wikitext2.

    PYTHONPATH=src python tests/export/check_real_model.py [WORK_DIR] [--group-size 64] [--tokens 512]

Groups of 128 do not divide smollm2's 576-wide rows, which compressed-tensors needs: a w4g128
checkpoint is refused (naming g64), so g64 is the default here.

Prints the max abs logit difference for a float32 export (expected 0: the same weights, the same
arithmetic) and a bfloat16 one (scales and dense tensors rounded to bf16, compared in bf16), beside
what bf16 itself costs lowbit's model (its bf16 logits against its float32 ones).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("work", nargs="?", default=None)
    p.add_argument("--tokens", type=int, default=512)
    p.add_argument("--group-size", type=int, default=64)
    p.add_argument("--sym", action="store_true", help="symmetric RTN (transformers' default loader)")
    args = p.parse_args()
    import transformers

    from lowbit.cli import main as lowbit
    from lowbit.data import eval_text
    from lowbit.export.compressed_tensors import export_compressed_tensors
    from lowbit.loading import load_checkpoint

    work = Path(args.work or tempfile.mkdtemp(prefix="ct-real-"))
    ckpt = work / f"smol-rtn-w4g{args.group_size}{'-sym' if args.sym else ''}"
    if not ckpt.exists():
        flags = ["--sym"] if args.sym else []
        assert lowbit(["quantize", "smollm2-135m", "--method", "rtn", "--bits", "4", "--group-size", str(args.group_size),
                       "-o", str(ckpt), "-q", *flags]) == 0
    loaded = load_checkpoint(ckpt)
    ids = loaded.tokenizer(eval_text("wikitext2", None)[:20000], return_tensors="pt").input_ids[:, : args.tokens]
    logits = {}
    for dtype in (torch.float32, torch.bfloat16):
        out = work / f"{ckpt.name}-ct-{str(dtype).removeprefix('torch.')}"
        t0 = time.perf_counter()
        result = export_compressed_tensors(ckpt, out, dtype) if not out.exists() else None
        t1 = time.perf_counter()
        kw = {} if args.sym else {"quantization_config": transformers.CompressedTensorsConfig(dequantize=True)}
        hf = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=dtype, **kw).eval()
        t2 = time.perf_counter()
        ours = load_checkpoint(ckpt, dtype=dtype).model
        with torch.inference_mode():
            a, b = hf(ids).logits.float(), ours(ids).logits.float()
        logits[dtype] = b
        diff = (a - b).abs().max().item()
        agree = (a.argmax(-1) == b.argmax(-1)).float().mean().item()
        size = sum(f.stat().st_size for f in out.iterdir()) / 1e6
        groups = "" if result is None else f", groups {[k.describe() for k in result.groups]}"
        print(f"{dtype}: {ids.shape[1]} tokens, max abs logit diff {diff:.3g} (logits up to "
              f"{b.abs().max().item():.3g}), top-1 agreement {agree:.4f}; export {t1 - t0:.1f} s, "
              f"transformers load {t2 - t1:.1f} s, folder {size:.1f} MB{groups}")
    bf16_noise = (logits[torch.bfloat16] - logits[torch.float32]).abs().max().item()
    print(f"for scale: lowbit's own bfloat16 logits differ from its float32 ones by up to {bf16_noise:.3g}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
