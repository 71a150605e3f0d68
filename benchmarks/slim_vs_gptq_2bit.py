"""First check of SliM-LLM against uniform GPTQ at 2 bits on smollm2-135m.

    LOWBIT_DATA=../shared/data python benchmarks/slim_vs_gptq_2bit.py

w2g128, 16 x 256 calibration tokens from C4, 4096 WikiText-2 tokens in windows of 1024; prints
method, bits per weight, perplexity, reference perplexity, KL and wall seconds.
"""

import os
import time

from lowbit.data import eval_tokens
from lowbit.eval import compare_to_reference
from lowbit.models import load_model
from lowbit.pipeline import quantize
from lowbit.recipes import CalibrationConfig, Recipe

DATA = os.environ.get("LOWBIT_DATA")
CALIB = CalibrationConfig(n_samples=16, seqlen=256)

ref = load_model("smollm2-135m", progress=False)
tokens = eval_tokens(ref.tokenizer, "wikitext2", 4096, DATA)
for method in ("gptq", "slim"):
    t0 = time.time()
    lm = load_model("smollm2-135m", progress=False)
    res = quantize(lm, Recipe(method=method, bits=2, group_size=128, calibration=CALIB), data_dir=DATA, progress=False)
    c = compare_to_reference(lm.model, ref.model, tokens, 1024, progress=False)
    print(f"{method}: {res.size.bits_per_weight:.3f} bpw, ppl {c.ppl:.2f} (reference {c.ref_ppl:.2f}), "
          f"KL {c.kl_mean:.4f}, {time.time() - t0:.0f} s", flush=True)
