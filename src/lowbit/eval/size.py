"""Size accounting that needs nothing but torch: parameter counts and bytes held by a model."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

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


@dataclass(frozen=True)
class QuantizedSize:
    """Size of a (partly) quantized model, as deployed.

    bits_per_weight: over the quantized linear layers, codes + scales (16 bit) + zeros (bits)
    per group + any permutation; None when nothing is quantized. model_bytes: quantized layers
    packed, every other unique tensor counted at 16 bits (how a float model ships).
    reference_bytes: every parameter at 16 bits (the unquantized model).
    """

    bits_per_weight: float | None
    n_quantized_params: int
    quantized_bytes: int
    model_bytes: int
    reference_bytes: int

    def to_dict(self) -> dict:
        return {"bits_per_weight": self.bits_per_weight, "n_quantized_params": self.n_quantized_params,
                "quantized_bytes": self.quantized_bytes, "model_bytes": self.model_bytes,
                "reference_bytes": self.reference_bytes}


def quantized_size(model: torch.nn.Module) -> QuantizedSize:
    from lowbit.runtime.qlinear import QuantLinear

    qmods = [m for m in model.modules() if isinstance(m, QuantLinear)]
    n_q = sum(m.in_features * m.out_features for m in qmods)
    q_bytes = sum(m.quantized_weight().nbytes() for m in qmods)
    qbuffers = {id(t) for m in qmods for t in m.buffers(recurse=False)}
    dense = [t for t in _unique([*model.parameters(), *model.buffers()]) if id(t) not in qbuffers and t.is_floating_point()]
    dense_elems = sum(t.numel() for t in _unique(model.parameters()))
    return QuantizedSize(
        bits_per_weight=8 * q_bytes / n_q if n_q else None,
        n_quantized_params=n_q,
        quantized_bytes=q_bytes,
        model_bytes=q_bytes + 2 * sum(t.numel() for t in dense if isinstance(t, torch.nn.Parameter)),
        reference_bytes=2 * (dense_elems + n_q),
    )
