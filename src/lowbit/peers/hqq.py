"""HQQ peer: Half-Quadratic Quantization (mobiusml/hqq), data-free, as simulated quantization.

Each named nn.Linear weight goes through HQQ's own `Quantizer.quantize` and `Quantizer.dequantize`
and the dequantized weight is written back in place, so the benchmark measures HQQ's accuracy
with lowbit's evaluators; HQQ's runtime backends are not involved.

Settings are HQQ's defaults for weights, taken from its `BaseQuantizeConfig(nbits, group_size,
axis=1)`: groups of `group_size` along the input dimension (as GPTQ's), optimize=True (the
half-quadratic solver refines each group's zero point), round_zero only at 4 bits. Everything
runs on CPU (device="cpu"); HQQ solves in float32 and dequantizes in the weight's dtype.

What the written-back weight is, per group g of row r (HQQ's own formula):

    w'[r, g*gs + j] = (code[r, g*gs + j] - zero[r, g]) * scale[r, g]      # code in [0, 2**bits)

with float (not integer) zero points. scale and zero are kept in a 16-bit dtype, as HQQ stores
them (its compute dtype): the model's dtype when it is 16-bit, else float16.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from torch import nn
from tqdm import tqdm

from lowbit.errors import ConfigError

HQQ_BITS = (8, 4, 3, 2, 1)  # what HQQ bit-packs; it also lists 6, 5 and 1.58 without packing


@dataclass(frozen=True)
class PeerResult:
    """What a peer method did to a model, for the benchmark table."""

    method: str
    bits: int
    group_size: int
    bits_per_weight: float  # code bits plus stored per-group metadata, averaged over all weights
    seconds: float          # wall time of the quantization
    n_layers: int


def hqq_quantize_model(
    model: nn.Module, layer_names: list[str], bits: int, group_size: int, progress: bool = True
) -> PeerResult:
    """Quantize-dequantize each named nn.Linear with HQQ, in place.

    bits_per_weight = (sum over layers of bits * numel + 8 * (scale bytes + zero bytes)) / sum numel,
    i.e. bits + 32 / group_size with HQQ's 16-bit scale and zero per group (HQQ's 8-bit quantized
    metadata is deprecated there and not used here). Code bits are nominal: HQQ's own 3-bit
    packing spends 32 bits per 10 codes, 3.2 bits each.
    """
    quantizer, weight_params = _hqq_settings(bits, group_size)
    modules = dict(model.named_modules())
    linears = [_linear(modules, name, group_size) for name in layer_names]  # all checked first

    start = time.perf_counter()
    n_weights = n_bits = 0
    for linear in tqdm(linears, desc=f"hqq w{bits}g{group_size}", disable=not progress):
        w = linear.weight.detach()
        w_hat, meta_bytes = _hqq_roundtrip(quantizer, weight_params, w.cpu())
        with torch.no_grad():
            linear.weight.copy_(w_hat)
        n_weights += w.numel()
        n_bits += bits * w.numel() + 8 * meta_bytes
    return PeerResult(
        method="hqq",
        bits=bits,
        group_size=group_size,
        bits_per_weight=n_bits / n_weights if n_weights else float(bits),
        seconds=time.perf_counter() - start,
        n_layers=len(linears),
    )


def _hqq_settings(bits: int, group_size: int) -> tuple[type, dict]:
    """HQQ's Quantizer and its default weight settings for (bits, group_size, axis=1)."""
    if not isinstance(bits, int) or bits not in HQQ_BITS:
        raise ConfigError(f"bits={bits!r} is not supported by the HQQ peer; use one of {HQQ_BITS}")
    if not isinstance(group_size, int) or group_size <= 0 or group_size % 8:
        raise ConfigError(f"group_size={group_size!r}: HQQ needs a positive multiple of 8")
    try:
        from hqq.core.quantize import BaseQuantizeConfig, Quantizer
    except ImportError as e:
        raise ImportError("the HQQ peer needs the hqq package: pip install 'lowbit[peers]'") from e
    params = BaseQuantizeConfig(nbits=bits, group_size=group_size, axis=1)["weight_quant_params"]
    # Packing is lossless, and HQQ packs along the group count, which silently needs it to be a
    # multiple of 2, 4 or 8; unpacked codes give the same weight without that constraint.
    return Quantizer, {**params, "bitpack": False, "device": "cpu"}


def _linear(modules: dict[str, nn.Module], name: str, group_size: int) -> nn.Linear:
    module = modules.get(name)
    if not isinstance(module, nn.Linear):
        found = "not found" if module is None else f"a {type(module).__name__}"
        raise ConfigError(f"layer {name!r} is {found}; the HQQ peer quantizes nn.Linear modules")
    return module


def _hqq_roundtrip(quantizer: type, params: dict, w: torch.Tensor) -> tuple[torch.Tensor, int]:
    """w [out, in] -> (HQQ-dequantized w [out, in] in w's dtype, bytes of stored scale + zero).

    HQQ groups the flattened weight, so a width not divisible by the group size would run groups
    across rows. As lowbit's own formats do (formats/affine.py), the row is zero-padded to whole
    groups and the padding dropped afterwards: the last group of each row is short. (HQQ's float
    zero point need not represent the padded zeros exactly, which can only cost HQQ accuracy in
    that short group.)
    """
    n_in = w.shape[1]
    pad = -n_in % params["group_size"]
    if pad:
        w_hat, meta_bytes = _hqq_roundtrip(quantizer, params, torch.nn.functional.pad(w, (0, pad)))
        return w_hat[:, :n_in].contiguous(), meta_bytes
    meta_dtype = w.dtype if w.element_size() == 2 else torch.float16
    codes, meta = quantizer.quantize(w, **params)  # codes: [out * in // gs, gs], w's dtype
    meta["scale"] = meta["scale"].to(meta_dtype)  # [out * in // gs, 1]
    meta["zero"] = meta["zero"].to(meta_dtype)    # [out * in // gs, 1]
    meta["compute_dtype"] = w.dtype
    w_hat = quantizer.dequantize(codes, meta)     # [out, in]
    meta_bytes = meta["scale"].nbytes + meta["zero"].nbytes
    return w_hat.to(w.dtype), meta_bytes
