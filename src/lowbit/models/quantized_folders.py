"""Model folders another tool quantized, read as plain float models: GPTQ, AWQ and
compressed-tensors folders become the dequantized model lowbit evaluates like any other.

transformers would hand GPTQ and AWQ folders to gptqmodel / autoawq (GPU kernels, not installed
here); their layouts are simple, so they are dequantized here, once, at load:

GPTQ (quant_method "gptq"), per quantized linear of shape [out, in]:
    qweight  int32 [in * bits / 32, out]   codes packed down the input dimension: one little-endian
                                           bit stream per output column, 32 bits a word
    qzeros   int32 [G, out * bits / 32]    zero points, packed the same way along the outputs
    scales   float16 [G, out]
    g_idx    int32 [in]                    the group of each input column (act-order); optional
    w[o, i] = (q[i, o] - z[g_idx[i], o]) * scales[g_idx[i], o]
The original format ("checkpoint_format": "gptq", the default) stores each zero point minus
one; "gptq_v2" stores it as it is.

AWQ (quant_method "awq", version "gemm", 4 bits), per quantized linear:
    qweight  int32 [in, out / 8]   eight 4-bit codes a word along the outputs, nibble k holding
                                   output column 8j + (0, 2, 4, 6, 1, 3, 5, 7)[k]
    qzeros   int32 [G, out / 8]    the same packing
    scales   float16 [G, out]
    w[o, i] = (q[i, o] - z[i // group_size, o]) * scales[i // group_size, o]

compressed-tensors (quant_method "compressed-tensors") folders: each quantized layer is
decompressed by the compressed-tensors library's own compressor for its config group's scheme
(an optional dependency: lowbit[export]). Not by transformers' loader: its dequantizing path applies
one scheme to every layer, and its compressed path does not take asymmetric packed zero points.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lowbit.errors import ConfigError
from lowbit.marks import read_json_or_none

QUANT_METHODS = ("gptq", "awq", "compressed-tensors")
_PACKED_PARTS = ("qweight", "qzeros", "scales", "g_idx")
_AWQ_NIBBLE_OF_COLUMN = (0, 4, 1, 5, 2, 6, 3, 7)  # output column j of a word sits in nibble [j]


def quant_method(folder: Path) -> str | None:
    """The quantization method of a model folder's config.json when it is one this module reads
    (QUANT_METHODS), else None (a plain folder, or one transformers handles itself)."""
    config = read_json_or_none(folder / "config.json")
    q = config.get("quantization_config") if isinstance(config, dict) else None
    method = q.get("quant_method") if isinstance(q, dict) else None
    return method if method in QUANT_METHODS else None


# ---------------------------------------------------------------- packed integers
def unpack_int32_rows(words: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """words int32 [W, C], each column one little-endian bit stream of `bits`-bit values in 32-bit
    words -> int32 [n, C], the first n values of each stream."""
    if words.dtype != torch.int32 or words.dim() != 2:
        raise ConfigError(f"packed codes must be a 2-D int32 tensor, got {words.dtype} {tuple(words.shape)}")
    if words.shape[0] * 32 < n * bits:
        raise ConfigError(f"{words.shape[0]} packed rows cannot hold {n} values of {bits} bits")
    mask = (1 << bits) - 1
    if 32 % bits == 0:
        shifts = torch.arange(0, 32, bits, dtype=torch.int32).view(1, -1, 1)
        return ((words.unsqueeze(1) >> shifts) & mask).reshape(-1, words.shape[1])[:n]   # [W * 32 / bits, C]
    stream = ((words.unsqueeze(1) >> torch.arange(32, dtype=torch.int32).view(1, -1, 1)) & 1).to(torch.uint8)
    stream = stream.reshape(-1, words.shape[1])[: n * bits].reshape(n, bits, -1)       # [n, bits, C]
    weights = (1 << torch.arange(bits, dtype=torch.int32)).view(1, -1, 1)
    return (stream.to(torch.int32) * weights).sum(1, dtype=torch.int32)


def _check_parts(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor) -> None:
    """Packed parts must be 2-D int32 tensors and scales 2-D floats."""
    for name, t in (("qweight", qweight), ("qzeros", qzeros), ("scales", scales)):
        want = "float" if name == "scales" else "int32"
        ok = t.is_floating_point() if name == "scales" else t.dtype == torch.int32
        if t.dim() != 2 or not ok:
            raise ConfigError(f"{name} is {t.dtype} {tuple(t.shape)}, not a 2-D {want} tensor")


def dequantize_gptq(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, g_idx: torch.Tensor | None,
                    bits: int, group_size: int, zero_offset: int = 1) -> torch.Tensor:
    """One GPTQ linear's tensors (module docstring) -> its float32 weight [out, in]. `zero_offset`:
    1 for the original format (zero points stored minus one), 0 for gptq_v2."""
    _check_parts(qweight, qzeros, scales)
    groups, out = scales.shape
    n_in = qweight.shape[0] * 32 // bits
    if g_idx is None:
        g_idx = torch.arange(n_in) // (n_in if group_size <= 0 else group_size)
    n_in = g_idx.shape[0]
    if (qweight.shape[1] != out or -(-n_in * bits // 32) != qweight.shape[0] or g_idx.dim() != 1
            or tuple(qzeros.shape) != (groups, -(-out * bits // 32)) or g_idx.is_floating_point()
            or int(g_idx.min()) < 0 or int(g_idx.max()) >= groups):
        raise ConfigError(f"GPTQ tensors disagree: qweight {tuple(qweight.shape)}, qzeros {tuple(qzeros.shape)}, "
                          f"scales {tuple(scales.shape)}, g_idx of {n_in} columns in groups "
                          f"{int(g_idx.min())}..{int(g_idx.max())} at {bits} bits")
    q = unpack_int32_rows(qweight, bits, n_in)                                # [in, out]
    z = unpack_int32_rows(qzeros.T.contiguous(), bits, out).T + zero_offset   # [G, out]
    g = g_idx.long()
    return ((q - z[g]).float() * scales.float()[g]).T.contiguous()


def dequantize_awq(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, group_size: int) -> torch.Tensor:
    """One AWQ (GEMM, 4-bit) linear's tensors (module docstring) -> its float32 weight [out, in]."""
    def unpack(words: torch.Tensor) -> torch.Tensor:       # int32 [R, out / 8] -> [R, out]
        nibbles = (words.unsqueeze(-1) >> torch.arange(0, 32, 4, dtype=torch.int32)) & 0xF   # [R, out / 8, 8]
        return nibbles[..., list(_AWQ_NIBBLE_OF_COLUMN)].reshape(words.shape[0], -1)

    _check_parts(qweight, qzeros, scales)
    n_in, groups, out = qweight.shape[0], scales.shape[0], scales.shape[1]
    gs = n_in if group_size <= 0 else group_size
    if qweight.shape[1] * 8 != out or tuple(qzeros.shape) != (groups, qweight.shape[1]) or -(-n_in // gs) != groups:
        raise ConfigError(f"AWQ tensors disagree: qweight {tuple(qweight.shape)}, qzeros {tuple(qzeros.shape)}, "
                          f"scales {tuple(scales.shape)} with group size {gs}")
    g = torch.arange(n_in) // gs
    return ((unpack(qweight) - unpack(qzeros)[g]).float() * scales.float()[g]).T.contiguous()


# ---------------------------------------------------------------- folders
def _read_tensors(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of the folder's safetensors files (those its index names, if it has one)."""
    from safetensors import safe_open

    index = read_json_or_none(folder / "model.safetensors.index.json")
    if isinstance(index, dict) and isinstance(index.get("weight_map"), dict):
        files = sorted({folder / str(f) for f in index["weight_map"].values()})
    else:
        files = sorted(folder.glob("*.safetensors"))
    state: dict[str, torch.Tensor] = {}
    for f in files:
        if f.parent != folder or not f.is_file():
            raise ConfigError(f"{folder}: the weight file {f.name} is missing or not in the folder")
        with safe_open(f, framework="pt") as st:
            for k in st.keys():  # noqa: SIM118 - safe_open is not a mapping
                state[k] = st.get_tensor(k)
    return state


def _method_settings(method: str, q: dict[str, Any], folder: Path) -> dict[str, Any]:
    """The settings of a GPTQ or AWQ quantization_config the dequantizers need, checked."""
    def bad(problem: str) -> ConfigError:
        return ConfigError(f"{folder / 'config.json'}: {method} quantization_config {problem}")

    bits = q.get("bits", q.get("w_bit"))
    group_size = q.get("group_size", q.get("q_group_size", -1))
    if type(group_size) is not int:
        raise bad(f"has group_size {group_size!r}, not an integer")
    if method == "gptq":
        fmt = q.get("checkpoint_format", "gptq")
        if bits not in (2, 3, 4, 8) or fmt not in ("gptq", "gptq_v2") or q.get("is_marlin_format"):
            raise bad(f"has bits {bits!r}, checkpoint_format {fmt!r}: lowbit reads 2, 3, 4 and 8 bits in the "
                      "gptq and gptq_v2 formats")
        return {"bits": bits, "group_size": group_size, "zero_offset": 1 if fmt == "gptq" else 0}
    version = str(q.get("version", "gemm")).lower()
    if bits != 4 or version != "gemm" or q.get("zero_point", True) is not True:
        raise bad(f"has bits {bits!r}, version {version!r}, zero_point {q.get('zero_point')!r}: lowbit reads "
                  "4-bit GEMM folders with zero points")
    return {"group_size": group_size}


def dequantized_state(folder: Path, method: str, q: dict[str, Any], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The folder's tensors with each GPTQ / AWQ layer's packed parts replaced by its
    dequantized `<layer>.weight`; floats in `dtype`."""
    settings = _method_settings(method, q, folder)
    state = _read_tensors(folder)
    layers = sorted(k.removesuffix(".qweight") for k in state if k.endswith(".qweight"))
    for name in layers:
        parts = {p: state.pop(f"{name}.{p}", None) for p in _PACKED_PARTS}
        missing = [p for p in ("qzeros", "scales") if parts[p] is None]
        if missing:
            raise ConfigError(f"{folder}: layer {name} has a qweight but no {' or '.join(missing)}")
        try:
            if method == "gptq":
                w = dequantize_gptq(parts["qweight"], parts["qzeros"], parts["scales"], parts["g_idx"], **settings)
            else:
                w = dequantize_awq(parts["qweight"], parts["qzeros"], parts["scales"], **settings)
        except ConfigError as e:
            raise ConfigError(f"{folder}: layer {name}: {e}") from None
        state[f"{name}.weight"] = w
    return {k: t.to(dtype) if t.is_floating_point() else t for k, t in state.items()}


def compressed_tensors_state(folder: Path, q: dict[str, Any], model: nn.Module, dtype: torch.dtype
                             ) -> dict[str, torch.Tensor]:
    """The folder's tensors with each compressed-tensors layer decompressed into `<layer>.weight`
    by the library's own compressor for its scheme (the most specific target of its config group
    that matches, as the library applies them); floats in `dtype`. `model`: the empty model, for
    matching targets by module class."""
    try:
        from compressed_tensors.compressors import BaseCompressor
        from compressed_tensors.quantization import QuantizationConfig
        from compressed_tensors.utils import match_named_modules, match_targets
    except ImportError:
        raise ConfigError(f"{folder} is a compressed-tensors folder; reading it needs the compressed-tensors "
                          "library: pip install 'lowbit[export]' (or compressed-tensors==0.20.1)") from None
    try:
        qc = QuantizationConfig.model_validate({k: v for k, v in q.items() if k in QuantizationConfig.model_fields})
    except ValueError as e:
        raise ConfigError(f"{folder / 'config.json'}: its compressed-tensors quantization_config is not valid "
                          f"({type(e).__name__})") from None
    activations = [g for g, s in qc.config_groups.items() if s.input_activations or s.output_activations]
    if activations or qc.kv_cache_scheme is not None or q.get("transform_config"):
        what = f"config groups {activations} quantize activations" if activations else "it quantizes the KV " \
            "cache or rotates weights (transform_config)"
        raise ConfigError(f"{folder}: {what}; lowbit reads weight-only compressed-tensors folders, so it "
                          "would evaluate a different model than the engines run")
    by_target = {t: s for s in qc.config_groups.values() for t in s.targets}
    state = _read_tensors(folder)
    for name, module in match_named_modules(model, by_target, qc.ignore or []):
        scheme = by_target[match_targets(name, module, by_target)[0]]
        local = {k[len(name) + 1:]: state.pop(k) for k in list(state)
                 if k.startswith(f"{name}.weight")}
        if not local:
            raise ConfigError(f"{folder}: layer {name} is quantized by its config but has no weight tensors")
        compressor = BaseCompressor.get_value_from_registry(scheme.format or qc.format)
        try:
            state[f"{name}.weight"] = compressor.decompress(local, scheme)["weight"]
        except (ValueError, KeyError, RuntimeError, AssertionError) as e:
            raise ConfigError(f"{folder}: layer {name} could not be decompressed ({type(e).__name__}: {e})") from None
    return {k: t.to(dtype) if t.is_floating_point() else t for k, t in state.items()}


def load_quantized_folder(folder: Path, method: str, dtype: torch.dtype) -> tuple[nn.Module, dict[str, Any]]:
    """(model, loading info) of a folder quantized by `method` (QUANT_METHODS), dequantized to
    `dtype`; the info in transformers' form (missing, unexpected, mismatched keys) for
    checks.check_loading_info."""
    from accelerate import init_empty_weights
    from transformers import CONFIG_MAPPING, AutoModelForCausalLM

    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    q = config.pop("quantization_config")
    config.pop("auto_map", None)
    config = CONFIG_MAPPING[config["model_type"]].from_dict(config)
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=False)
    if method == "compressed-tensors":
        state = compressed_tensors_state(folder, q, model, dtype)
    else:
        state = dequantized_state(folder, method, q, dtype)
    expected = {k: tuple(t.shape) for k, t in model.state_dict().items()}
    mismatched = [k for k, t in state.items() if k in expected and tuple(t.shape) != expected[k]]
    unexpected = [k for k in state if k not in expected]
    model.load_state_dict({k: t for k, t in state.items() if k in expected and k not in mismatched},
                          strict=False, assign=True)
    model.tie_weights()
    missing = [n for n, p in model.named_parameters() if p.is_meta]
    return model, {"missing_keys": missing, "unexpected_keys": unexpected, "mismatched_keys": mismatched}
