"""Models and settings the budget tests share: a deeper tiny model than tiny_models' (six layers,
so that an allocation has room to differ), the levels it is allocated over, and the held-out KL
between two models."""

import torch
from test_pipeline import ByteTokenizer

from lowbit.models.load import LoadedModel, ModelSource
from lowbit.recipes import CalibrationConfig, ClipConfig


def deep_tiny(seed=0, arch="llama", layers=6):
    import transformers

    config, model = {"llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
                     "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM)}[arch]
    cfg = config(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                 num_attention_heads=4, num_key_value_heads=2, initializer_range=0.1)
    torch.manual_seed(seed)
    src = ModelSource(spec="tiny", kind="hf_folder", path=None, gguf_file=None, name="tiny", sha256=None)
    return LoadedModel(model(cfg).eval(), ByteTokenizer(), src)


LEVELS = ("w2g16", "w2g32", "w3g16", "w3g32", "w4g16", "w4g32", "w5g32", "w6g32", "w8g32")
CALIB = CalibrationConfig(n_samples=8, seqlen=64)
FAST = {"calibration": CALIB, "clip": ClipConfig(grid=4)}  # a coarse clip search keeps these tests quick


@torch.inference_mode()
def held_out_kl(ref: torch.nn.Module, model: torch.nn.Module, ids: torch.Tensor) -> float:
    total = 0.0
    for row in ids:
        p = torch.log_softmax(ref(row[None]).logits[0].float(), -1)
        q = torch.log_softmax(model(row[None]).logits[0].float(), -1)
        total += float((p.exp() * (p - q)).sum())
    return total / ids.numel()
