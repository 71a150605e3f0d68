"""Hessians of linear layers' reconstruction loss, H = 2/n * sum over tokens of x x^T."""

from __future__ import annotations

import torch
from torch import nn


class HessianAccumulator:
    """Forward hook on an nn.Linear that accumulates H (float32, [in, in]) over every token seen."""

    def __init__(self, in_features: int):
        self.H = torch.zeros(in_features, in_features, dtype=torch.float32)
        self.n_tokens = 0

    def add(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).float()          # [tokens, in]
        n = x.shape[0]
        total = self.n_tokens + n
        self.H.mul_(self.n_tokens / total)
        self.H.addmm_(x.T, x, alpha=2.0 / total)
        self.n_tokens = total

    def hook(self, module: nn.Module, args: tuple, output) -> None:
        self.add(args[0])

    @classmethod
    def attach(cls, linear: nn.Linear) -> tuple["HessianAccumulator", torch.utils.hooks.RemovableHandle]:
        acc = cls(linear.in_features)
        return acc, linear.register_forward_hook(acc.hook)
