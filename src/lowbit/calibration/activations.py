"""Input statistics of linear layers: mean |x| per channel and an evenly spaced token sample.

Activation-aware methods (AWQ) need both: the per-channel magnitude sets the smoothing scales,
the token sample measures output error during their searches.
"""

from __future__ import annotations

import torch
from torch import nn


class InputRecorder:
    """Forward pre-hook recording a linear layer's inputs.

    Keeps every `stride`-th token over the whole stream (so the sample spans all calibration
    samples) and the running mean of |x| per channel over all tokens. `offset`: the tokens before
    the first one this recorder sees (a rank's shard of the samples: calibration/distributed.py).
    """

    def __init__(self, in_features: int, stride: int, offset: int = 0):
        self.stride = max(1, int(stride))
        self.offset = offset
        self.abs_sum = torch.zeros(in_features, dtype=torch.float64)
        self.n_tokens = 0
        self._sample: list[torch.Tensor] = []

    def add(self, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1, x.shape[-1]).float()
        self.abs_sum += x.abs().sum(0, dtype=torch.float64)
        start = -(self.offset + self.n_tokens) % self.stride
        self._sample.append(x[start :: self.stride].clone())
        self.n_tokens += x.shape[0]

    def hook(self, module: nn.Module, args: tuple) -> None:
        self.add(args[0])

    def set_totals(self, abs_sum: torch.Tensor, n_tokens: int, sample: torch.Tensor) -> None:
        """Replace what was recorded by the totals of every rank (calibration/distributed.py)."""
        self.abs_sum, self.n_tokens, self._sample, self.offset = abs_sum, n_tokens, [sample], 0

    @property
    def mean_abs(self) -> torch.Tensor:
        return (self.abs_sum / max(self.n_tokens, 1)).float()

    @property
    def sample(self) -> torch.Tensor:
        """[n_sampled, in] float32."""
        return torch.cat(self._sample, 0)


def record_inputs(
    linears: dict[str, nn.Linear], run: callable, total_tokens: int, max_tokens: int, offset: int = 0
) -> dict[str, InputRecorder]:
    """Run `run()` (which feeds the calibration data through) with recorders on `linears`;
    `offset`: the tokens before the first one `run` feeds (InputRecorder)."""
    stride = -(-total_tokens // max_tokens)
    recs = {name: InputRecorder(lin.in_features, stride, offset) for name, lin in linears.items()}
    handles = [lin.register_forward_pre_hook(recs[name].hook) for name, lin in linears.items()]
    try:
        run()
    finally:
        for h in handles:
            h.remove()
    return recs
