"""Size accounting that needs nothing but torch: parameter counts and bytes held by a model."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable

import torch


def _unique(tensors: Iterable[torch.Tensor]) -> list[torch.Tensor]:
    """Drop repeats of the same memory (tied weights): keyed by (device, data_ptr).

    Tensors without storage of their own (meta device, empty) are keyed by identity instead,
    since they all report data_ptr 0.
    """
    seen: set[object] = set()
    out = []
    for t in tensors:
        ptr = t.data_ptr() if t.device.type != "meta" else 0
        key = (str(t.device), ptr) if ptr else id(t)
        if key not in seen:
            seen.add(key)
            out.append(t)
    return out


def count_linear_params(
    model: torch.nn.Module, include: Callable[[str], bool] | None = None
) -> int:
    """Weight elements of the nn.Linear modules whose qualified name passes `include`.

    Biases are not counted (they stay in full precision). A weight shared by two modules (a
    tied lm_head) is counted once. Example: include=lambda name: name != "lm_head".
    """
    weights = (
        module.weight
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear) and (include is None or include(name))
    )
    return sum(w.numel() for w in _unique(weights))


def tensor_bytes(model: torch.nn.Module) -> int:
    """Bytes of all unique parameters and buffers (tied weights counted once)."""
    tensors = _unique([*model.parameters(), *model.buffers()])
    return sum(t.numel() * t.element_size() for t in tensors)


@dataclass(frozen=True)
class ModelSize:
    """What a model holds: all parameter elements, the linear weights among them, and bytes."""

    n_params: int  # unique parameter elements
    n_linear_params: int  # weight elements of the nn.Linear modules selected by `include`
    tensor_bytes: int  # bytes of unique parameters and buffers

    @classmethod
    def of(cls, model: torch.nn.Module, include: Callable[[str], bool] | None = None) -> ModelSize:
        return cls(
            n_params=sum(p.numel() for p in _unique(model.parameters())),
            n_linear_params=count_linear_params(model, include),
            tensor_bytes=tensor_bytes(model),
        )
