"""Size accounting that needs nothing but torch: parameter counts and bytes, and the deployed size
of a quantized model computed from its records (never from its module types)."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

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

    bits_per_weight: over the quantized decoder-block layers, codes + scales (16 bit) + zeros
    (bits) per group + any permutation; None when nothing is quantized. An output head's record
    counts in model_bytes, not in bits_per_weight or n_quantized_params (the rate a recipe's
    width and group size give, and what a size budget targets). model_bytes: quantized layers
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


def quantized_size(weights: Mapping[str, Any], dense: Mapping[str, torch.Tensor],
                   head: str | None = None) -> QuantizedSize:
    """The size of a model given as records and dense tensors: `weights` {layer name: record}
    (QuantizedWeight or PackedWeight, anything with .shape and .nbytes(); tensors on the meta
    device do), `dense` every other parameter once (dense_tensors), biases of quantized layers
    included; `head` the output head's name (head_name), whose record is left out of the rate.
    The same numbers whatever runtime the model is later loaded for."""
    blocks = {n: r for n, r in weights.items() if n != head}
    n_q = sum(r.shape[0] * r.shape[1] for r in blocks.values())
    q_bytes = sum(r.nbytes() for r in blocks.values())
    head_rec = weights.get(head) if head is not None else None
    head_bytes, head_elems = (head_rec.nbytes(), head_rec.shape[0] * head_rec.shape[1]) if head_rec is not None else (0, 0)
    dense_elems = sum(t.numel() for t in dense.values())
    return QuantizedSize(
        bits_per_weight=8 * q_bytes / n_q if n_q else None,
        n_quantized_params=n_q,
        quantized_bytes=q_bytes,
        model_bytes=q_bytes + head_bytes + 2 * dense_elems,
        reference_bytes=2 * (dense_elems + n_q + head_elems),
    )


def head_name(model: torch.nn.Module) -> str | None:
    """The qualified name of the model's output head (get_output_embeddings), or None."""
    get = getattr(model, "get_output_embeddings", None)
    head = get() if get is not None else None
    if head is None:
        return None
    return next((n for n, m in model.named_modules() if m is head), None)


def dense_tensors(model: torch.nn.Module, quantized: Iterable[str] = ()) -> dict[str, torch.Tensor]:
    """The model's parameters, each once (tied weights counted once), but the weights of the
    `quantized` layers (their records stand for them)."""
    skip = {f"{name}.weight" for name in quantized}
    out: dict[str, torch.Tensor] = {}
    seen: set[object] = set()
    for name, p in model.named_parameters(remove_duplicate=False):
        key = (str(p.device), p.data_ptr()) if p.device.type != "meta" and p.data_ptr() else id(p)
        if key in seen:
            continue
        seen.add(key)
        if name not in skip:
            out[name] = p
    return out


def model_size(model: torch.nn.Module) -> QuantizedSize:
    """The size of a model with nothing quantized (a reference): every parameter dense."""
    return quantized_size({}, dense_tensors(model))


def stored_size(model: torch.nn.Module, records: Mapping[str, Any], dense: Mapping[str, torch.Tensor],
                biases: Mapping[str, torch.Tensor | None]) -> QuantizedSize:
    """Size of the stored model: its records, and as dense tensors the stored tensors that are
    parameters of the model (buffers aside, as for a model in memory) plus the records' biases."""
    params = {n for n, _ in model.named_parameters(remove_duplicate=False)}
    tensors = {k: t for k, t in dense.items() if k in params}
    tensors.update({f"{n}.bias": b for n, b in biases.items() if b is not None})
    return quantized_size(records, tensors, head_name(model))
