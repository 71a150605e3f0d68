"""Runs inside kvpress's own virtual environment (see peers/kvpress.py); imports no lowbit code.

Reads a JSON job from the file named by argv[1], writes a JSON answer to argv[2]:
  job:    {"model": HF folder, "press": streaming | h2o | snapkv, "keep": fraction kept,
           "prompts": [[token ids], ...], "max_new_tokens": n}
  answer: {"tokens": [[new token ids], ...], "kept": [cache tokens after the prompt, ...], "versions": {...}}

Each prompt is prefilled in one forward inside the press's context (kvpress compresses during
the prefill forward), then decoded greedily with the compressed cache.
"""

import json
import sys

import torch


def main(job_path: str, out_path: str) -> None:
    import kvpress
    import transformers
    from kvpress import ObservedAttentionPress, SnapKVPress, StreamingLLMPress
    from transformers import AutoModelForCausalLM, DynamicCache

    with open(job_path) as f:
        job = json.load(f)
    ratio = 1.0 - float(job["keep"])  # kvpress's compression_ratio is the fraction removed
    press = {"streaming": lambda: StreamingLLMPress(compression_ratio=ratio),
             "snapkv": lambda: SnapKVPress(compression_ratio=ratio),
             "h2o": lambda: ObservedAttentionPress(compression_ratio=ratio)}[job["press"]]()
    attn = "eager" if job["press"] == "h2o" else "sdpa"  # observed attention needs the weights
    model = AutoModelForCausalLM.from_pretrained(job["model"], dtype=torch.float32, attn_implementation=attn,
                                                 trust_remote_code=False).eval()
    answers, kept = [], []
    with torch.inference_mode():
        for ids in job["prompts"]:
            cache = DynamicCache()
            x = torch.tensor([ids])
            with press(model):
                out = model(input_ids=x, past_key_values=cache, use_cache=True)
            kept.append(int(cache.layers[0].keys.shape[-2]))
            new = []
            pos = x.shape[1]
            for _ in range(job["max_new_tokens"]):
                tok = int(out.logits[0, -1].argmax())
                new.append(tok)
                out = model(input_ids=torch.tensor([[tok]]), past_key_values=cache, use_cache=True,
                            position_ids=torch.tensor([[pos]]), cache_position=torch.tensor([pos]))
                pos += 1
            answers.append(new)
    versions = {"kvpress": getattr(kvpress, "__version__", "0.5.5"), "transformers": transformers.__version__,
                "torch": torch.__version__}
    with open(out_path, "w") as f:
        json.dump({"tokens": answers, "kept": kept, "versions": versions}, f)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
