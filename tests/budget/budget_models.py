"""Models and settings the budget tests share: a deeper tiny model than tiny_models' (six layers,
so that an allocation has room to differ), the levels it is allocated over, and the held-out KL
between two models."""

import torch
from tiny_models import loaded_tiny

from lowbit.recipes import CalibrationConfig, ClipConfig


def deep_tiny(seed=0, arch="llama", layers=6):
    """tiny_models.loaded_tiny with `layers` blocks and an untied head."""
    return loaded_tiny(arch, seed, tie=False, layers=layers)


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
