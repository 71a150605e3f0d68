"""A lowbit checkpoint as a compressed-tensors folder ("pack-quantized"), the format vLLM and
transformers load, written with the compressed-tensors library's own config classes and packer.

Each quantized layer becomes the tensors its PackedQuantizationCompressor would write:

    weight_packed       int32 [out, ceil(in * bits / 32)]   signed codes, pack_to_int32 along columns
    weight_scale        [out, G] in the export dtype          ([out, 1] for one group per row)
    weight_zero_point   int32 [ceil(out * bits / 32), G]    asymmetric only: signed zeros packed down rows
    weight_shape        int64 [2]                            (out, in)

Codes: lowbit stores unsigned codes c and zero points z in [0, 2**bits) with w = (c - z) * scale;
compressed-tensors stores signed values q = c - 2**(bits-1) and zero points zq = z - 2**(bits-1)
with w = (q - zq) * scale, so q - zq = c - z exactly. lowbit's symmetric formats have the fixed
zero 2**(bits-1), compressed-tensors' symmetric ones the zero 0: the same weight, no zero stored.

Layers of one format (bits, group size, symmetric) form one config group; everything else
(embeddings, norms, a dense head, biases) is stored as it is, in the export dtype. Formats
compressed-tensors cannot express are refused, naming the layer and a recipe it can express,
before anything is written; the folder is written beside its destination and moved into place
in one rename (outputs.py).
"""

from __future__ import annotations

import copy
import math
import os
import shutil
from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import torch
from torch import nn

from lowbit.checkpoint import (
    CONFIG_FILE,
    DENSE_FILE,
    QUANT_FILE,
    LayerEntry,
    StoredCheckpoint,
    open_checkpoint,
)
from lowbit.errors import ConfigError
from lowbit.outputs import apply_umask, check_output, make_staging, publish, remove_tree
from lowbit.qtensor import QuantizedWeight

WEIGHTS_FILE = "model.safetensors"
FORMAT = "pack-quantized"
INSTALL_HINT = "pip install 'lowbit[export]' (or compressed-tensors==0.20.1)"
# lowbit methods whose layers have per-group widths -> the uniform method nearest to them
_UNIFORM_METHOD = {"slim": "gptq", "awq-slim": "awq-gptq"}
# layers vLLM runs as one fused product: they need one scheme
_FUSED = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


@dataclass(frozen=True)
class SchemeKey:
    """What makes two layers one compressed-tensors config group."""

    bits: int
    symmetric: bool
    group_size: int | None  # None: one group per row (the "channel" strategy)

    def describe(self) -> str:
        g = "per-channel" if self.group_size is None else f"g{self.group_size}"
        return f"int{self.bits} {g} {'sym' if self.symmetric else 'asym'}"


@dataclass
class ExportResult:
    """What export_compressed_tensors wrote: the folder, its config groups (scheme -> layers)
    and notes on what the engines that read it accept."""

    path: Path
    groups: dict[SchemeKey, list[str]]
    ignored: list[str]
    dtype: torch.dtype
    notes: list[str] = field(default_factory=list)


def _library() -> SimpleNamespace:
    """What this exporter uses of compressed-tensors (imported on first use: it is an optional
    dependency), or a ConfigError saying how to install it."""
    try:
        from compressed_tensors import compressors, quantization
    except ImportError as e:
        raise ConfigError(f"exporting to compressed-tensors needs the compressed-tensors library ({e}); "
                          f"{INSTALL_HINT}") from None
    return SimpleNamespace(ModelCompressor=compressors.ModelCompressor, packer=compressors.PackedQuantizationCompressor,
                           pack_to_int32=compressors.pack_to_int32, QuantizationArgs=quantization.QuantizationArgs,
                           QuantizationConfig=quantization.QuantizationConfig,
                           QuantizationScheme=quantization.QuantizationScheme)


def scheme_key(entry: LayerEntry) -> SchemeKey:
    n_in = entry.shape[1]
    gs = entry.fmt.group_size
    return SchemeKey(entry.fmt.bits, entry.fmt.symmetric, None if gs >= n_in else gs)


def quantization_args(key: SchemeKey):
    """The compressed-tensors QuantizationArgs of a config group's weights."""
    QuantizationArgs = _library().QuantizationArgs
    if key.group_size is None:
        return QuantizationArgs(num_bits=key.bits, type="int", symmetric=key.symmetric, strategy="channel")
    return QuantizationArgs(num_bits=key.bits, type="int", symmetric=key.symmetric, strategy="group",
                            group_size=key.group_size)


def quantization_scheme(key: SchemeKey, targets: list[str]):
    QuantizationScheme = _library().QuantizationScheme
    return QuantizationScheme(targets=targets, weights=quantization_args(key), format=FORMAT)


# ---------------------------------------------------------------- what can be exported
def _recipe_flags(method: str, bits: int, group_size: int, symmetric: bool, extra: str = "") -> str:
    g = -1 if group_size <= 0 else group_size
    return f"--method {method} --bits {bits} --group-size {g}{' --sym' if symmetric else ''}{extra}"


def _dividing_group(n_in: int, gs: int) -> int:
    """The largest power of two up to `gs` that divides `n_in`, at least 16; else -1 (per-channel)."""
    g = 1 << int(math.log2(gs))
    while g >= 16:
        if n_in % g == 0:
            return g
        g //= 2
    return -1


def layer_problem(entry: LayerEntry, perm: torch.Tensor | None, method: str) -> str | None:
    """Why a layer (its manifest entry, its stored permutation, the recipe's method) cannot be
    written as compressed-tensors pack-quantized, with the nearest recipe that can (a phrase), or
    None when it can."""
    fmt, (_, n_in) = entry.fmt, entry.shape
    gs = fmt.group_size if fmt.group_size < n_in else -1
    plain = method if method in ("rtn", "gptq", "awq", "awq-gptq") else _UNIFORM_METHOD.get(method, "gptq")
    if entry.group_bits is not None:
        widths = sorted(set(entry.group_bits))
        bits = math.ceil(entry.average_bits or fmt.bits)
        return (f"per-group widths ({widths[0]}-{widths[-1]} bits, SliM-LLM), but compressed-tensors stores one "
                f"width per layer; quantize with one width, e.g. `{_recipe_flags(plain, bits, gs, fmt.symmetric)}`")
    if fmt.scale_bits:
        return (f"{fmt.scale_bits}-bit integer group scales (Integer Scale), but compressed-tensors stores float "
                f"scales; quantize without --integer-scale, e.g. `{_recipe_flags(plain, fmt.bits, gs, fmt.symmetric)}`")
    if fmt.grid != "affine":
        return (f"the non-uniform grid {fmt.grid!r}, but compressed-tensors' int formats are uniform (affine); "
                f"quantize on the affine grid, e.g. `{_recipe_flags(plain, fmt.bits, gs, fmt.symmetric)}`")
    key = scheme_key(entry)
    packer = _library().packer
    if not packer.can_compress(nn.Linear, quantization_scheme(key, ["Linear"])):
        return (f"{fmt.bits}-bit codes, which compressed-tensors' pack-quantized packer does not take; "
                f"e.g. `{_recipe_flags(plain, 4, gs, fmt.symmetric)}`")
    if key.group_size is not None and n_in % key.group_size:
        return (f"groups of {key.group_size} over {n_in} input columns (a shorter last group), but "
                "compressed-tensors needs the group size to divide the row; e.g. "
                f"`{_recipe_flags(plain, fmt.bits, _dividing_group(n_in, key.group_size), fmt.symmetric)}`")
    if perm is not None and key.group_size is not None:
        k = torch.arange(n_in)
        if not torch.equal(perm.long() // key.group_size, k // key.group_size):
            return ("an act-order column permutation that moves columns between groups, which this "
                    "compressed-tensors version cannot store (no g_idx); keep the groups in column order, "
                    f"e.g. `{_recipe_flags('gptq', fmt.bits, gs, fmt.symmetric, ' --act-order --static-groups')}`")
    return None


def check_exportable(ck: StoredCheckpoint) -> None:
    """Refuse, before anything is written, a checkpoint with a layer compressed-tensors cannot
    express: ConfigError naming the first such layer, why, and a recipe that exports."""
    method = str(ck.manifest.recipe.get("method") or "gptq")
    bad = []
    for name, entry in ck.layers.items():
        perm = ck.weights[name].parts.get("perm") if entry.perm else None
        problem = layer_problem(entry, perm, method)
        if problem is not None:
            bad.append((name, problem))
    if bad:
        name, problem = bad[0]
        more = f" ({len(bad) - 1} more layers cannot be exported)" if len(bad) > 1 else ""
        raise ConfigError(f"cannot export layer {name} to compressed-tensors: it has {problem}{more}")


# ---------------------------------------------------------------- one record -> its tensors
def compressed_tensors_state(qw: QuantizedWeight, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The pack-quantized tensors of one exportable record (see the module docstring), scales in
    `dtype`; the codes in the original column order (a group-preserving permutation undone)."""
    pack_to_int32 = _library().pack_to_int32
    bits = qw.fmt.bits
    offset = 1 << (bits - 1)
    codes = qw.codes if qw.perm is None else qw.codes[:, torch.argsort(qw.perm)]
    signed = (codes.to(torch.int16) - offset).to(torch.int8)          # [out, in] in [-2**(b-1), 2**(b-1))
    state = {"weight_packed": pack_to_int32(signed, bits),
             "weight_scale": qw.scales.to(dtype).contiguous(),
             "weight_shape": torch.tensor(list(qw.shape), dtype=torch.int64)}
    if qw.zeros is not None:
        zq = (qw.zeros.to(torch.int16) - offset).to(torch.int8)       # [out, G]
        state["weight_zero_point"] = pack_to_int32(zq, bits, packed_dim=0)
    return state


def quantization_config(groups: Mapping[SchemeKey, list[str]], linears: list[str], ignore: list[str]):
    """The compressed-tensors QuantizationConfig: one config group per scheme, targeting every
    Linear when one scheme covers all quantized layers, else each layer by name."""
    QuantizationConfig = _library().QuantizationConfig
    ordered = sorted(groups.items(), key=lambda kv: (-len(kv[1]), kv[0].bits, kv[0].group_size or 0))
    single = len(ordered) == 1 and set(ordered[0][1]) | set(ignore) == set(linears)
    config_groups = {f"group_{i}": quantization_scheme(key, ["Linear"] if single else sorted(names))
                     for i, (key, names) in enumerate(ordered)}
    return QuantizationConfig(config_groups=config_groups, format=FORMAT, quantization_status="compressed",
                              ignore=ignore)


def engine_notes(groups: Mapping[SchemeKey, list[str]]) -> list[str]:
    """What the engines reading the folder accept beyond the format itself."""
    notes = []
    widths = sorted({k.bits for k in groups} - {4, 8})
    if widths:
        notes.append(f"vLLM's kernels for compressed-tensors int weights take 4 and 8 bits; the "
                     f"{', '.join(map(str, widths))}-bit layers load in transformers, not in vLLM")
    if any(not k.symmetric for k in groups):  # transformers 5 / compressed-tensors 0.20 (see README)
        notes.append("asymmetric layers: transformers' default loader does not take packed zero points; load with "
                     "quantization_config=CompressedTensorsConfig(dequantize=True)" if len(groups) == 1 else
                     "asymmetric layers in several config groups: transformers cannot load this folder (its default "
                     "loader does not take packed zero points, its dequantizing loader applies one scheme to every "
                     "layer); vLLM and `lowbit eval` read it")
    scheme = {n: k for k, names in groups.items() for n in names}
    for n in scheme:
        parent, _, leaf = n.rpartition(".")
        for fused in _FUSED:
            if leaf == fused[0]:
                kinds = {scheme.get(f"{parent}.{f}") for f in fused}
                if len(kinds) > 1:
                    notes.append(f"{parent}: {', '.join(fused)} have different formats; vLLM runs them as one "
                                 "fused product and needs one scheme for them (transformers loads it)")
    return notes


# ---------------------------------------------------------------- the folder
def export_compressed_tensors(checkpoint: str | os.PathLike, out: str | os.PathLike,
                              dtype: torch.dtype | None = None) -> ExportResult:
    """Write the lowbit checkpoint `checkpoint` as a compressed-tensors folder `out` (which must
    not exist): model.safetensors, config.json with its quantization_config, and the
    checkpoint's tokenizer and other model files. Scales and dense tensors are written in `dtype`
    (default: the dtype the checkpoint was saved in). Raises ConfigError, writing nothing, when
    the library is missing, `out` exists, or a layer's format cannot be expressed."""
    _library()
    if Path(out).expanduser().exists():
        raise ConfigError(f"-o {out} already exists; choose a new folder for the export (an export never replaces "
                          "a folder) or remove that one yourself")
    target = check_output(out, False, [checkpoint])
    with open_checkpoint(checkpoint) as ck:
        check_exportable(ck)
        dtype = dtype or ck.dtype
        groups: dict[SchemeKey, list[str]] = defaultdict(list)
        for name, entry in ck.layers.items():
            groups[scheme_key(entry)].append(name)
        linears = [n for n, m in ck.empty_model().named_modules() if isinstance(m, nn.Linear)]
        ignore = sorted(set(linears) - set(ck.layers))
        staging = make_staging(target)
        try:
            _write_tensors(ck, staging, dtype)
            _write_config(ck, staging, dtype, quantization_config(groups, linears, ignore))
            for f in sorted(ck.manifest.files):
                if f not in (QUANT_FILE, DENSE_FILE, CONFIG_FILE):
                    shutil.copyfile(ck.path / f, staging / f)
            apply_umask(staging)
            publish(staging, target)
        except BaseException:
            if staging.is_dir():
                remove_tree(staging)
            raise
    return ExportResult(target, dict(groups), ignore, dtype, engine_notes(groups))


def _write_tensors(ck: StoredCheckpoint, staging: Path, dtype: torch.dtype) -> None:
    from safetensors.torch import save_file

    state: dict[str, torch.Tensor] = {}
    for name in ck.layers:
        for part, t in compressed_tensors_state(ck.weights[name].unpack(), dtype).items():
            state[f"{name}.{part}"] = t
        bias = ck.weights.bias(name)
        if bias is not None:
            state[f"{name}.bias"] = bias.to(dtype)
    state.update(ck.dense_state(dtype))
    save_file({k: t.contiguous() for k, t in state.items()}, staging / WEIGHTS_FILE, metadata={"format": "pt"})


def _write_config(ck: StoredCheckpoint, staging: Path, dtype: torch.dtype, qconfig) -> None:
    """config.json: the checkpoint's model config in `dtype`, with the quantization_config the
    library's own ModelCompressor writes (format, config groups, ignore list, its version)."""
    ModelCompressor = _library().ModelCompressor
    config = copy.deepcopy(ck.config)
    config.dtype = dtype
    config.save_pretrained(staging)
    ModelCompressor(quantization_config=qconfig).update_config(str(staging))
