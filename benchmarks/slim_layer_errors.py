"""Per-layer output error of SliM-LLM against uniform GPTQ on a real model.

    LOWBIT_DATA=../shared/data python benchmarks/slim_layer_errors.py [--model smollm2-135m]
        [--blocks 0,5,15,29] [--bits 2,3] [--group-size 128]

For each linear layer of the chosen blocks (Hessians from 32 x 512 C4 calibration tokens, inputs
from the unquantized model, bfloat16 forwards), prints tr(D H D^T) of uniform GPTQ and, as ratios
to it: SliM with its table's widths and salience-weighted clipping alone ("unmeasured"), the same
with plain clipping, and SliM as it runs (every candidate measured, the lowest kept); plus the
number k of groups the table moved and which candidate was kept. A ratio above 1 is worse than GPTQ.
"""

import argparse
import os

from lowbit.algorithms.gptq import gptq_quantize
from lowbit.algorithms.slim import output_error, slim_quantize
from lowbit.calibration.sequential import run_sequential
from lowbit.data import calibration_samples
from lowbit.methods import width_range
from lowbit.models import load_model
from lowbit.qtensor import QuantFormat
from lowbit.recipes import ClipConfig, SlimConfig

p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
p.add_argument("--model", default="smollm2-135m")
p.add_argument("--blocks", default="0,5,15,29")
p.add_argument("--bits", default="2,3")
p.add_argument("--group-size", type=int, default=128)
args = p.parse_args()
blocks = {int(b) for b in args.blocks.split(",")}
widths = [int(b) for b in args.bits.split(",")]

lm = load_model(args.model, progress=False)
ids = calibration_samples(lm.tokenizer, "c4", 32, 512, 0, data_dir=os.environ.get("LOWBIT_DATA"))
clip = ClipConfig()
print("block layer bits | gptq tr(DHD^T) | unmeasured  plain-clip  measured | k kept")


def measure(i: int, linears: dict, hessians: dict) -> dict:
    if i not in blocks:
        return {}
    for name, lin in linears.items():
        w, H = lin.weight.detach().float(), hessians[name]
        for bits in widths:
            fmt = QuantFormat.resolved(w.shape[1], bits, args.group_size, False)
            widest = QuantFormat.resolved(w.shape[1], width_range(bits)[1], args.group_size, False)
            gptq = output_error(w, gptq_quantize(w, H, fmt, clip=clip).qweight.dequantize(), H)
            ratios = []
            for cfg in (SlimConfig(measure=False), SlimConfig(measure=False, salience_clip=False), SlimConfig()):
                r = slim_quantize(w, H, widest, bits, clip=clip, slim=cfg)
                ratios.append(output_error(w, r.gptq.qweight.dequantize(), H) / gptq)
            print(f"{i} {name} {bits} | {gptq:.4g} | " + "  ".join(f"{x:.3f}" for x in ratios)
                  + f" | {r.allocation.k} {r.chosen}", flush=True)
    return {}


run_sequential(lm.model, ids, measure, true_sequential=False, progress=False, dtype="bfloat16")
