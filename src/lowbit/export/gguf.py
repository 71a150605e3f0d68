"""Write a model as a GGUF file llama.cpp runs, its weights in llama.cpp's block types as lowbit
rounded them (BlockWeight records), with the `gguf` package's writer.

    write_gguf(path, tensors, metadata=GGUFMetadata.from_file(source_gguf), file_type="Q4_K_M")

What goes in:
- metadata: every key of the source model's GGUF (architecture hyper-parameters, tokenizer,
  chat template) except the file type and quantization version, which describe the new file.
  A model loaded from a GGUF file carries its own; a Hugging Face folder gets one from llama.cpp's
  converter run with --vocab-only (peers/llamacpp.py).
- tensors, by GGUF name (blk.N.attn_q.weight ...; `gguf_names` maps the transformers model's
  names with gguf-py's own name table), each a BlockWeight (written byte for byte) or a float
  tensor (norms and anything kept dense, written as F32). `to_gguf_layout` undoes what
  transformers' GGUF loader does on reading: llama's q/k rows are interleaved per head as
  llama.cpp's rotary embedding expects; gemma's norm weights are stored plus one.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf
import torch
from torch import nn

from lowbit.errors import ConfigError, ShapeError
from lowbit.qtensor import BlockWeight

# Keys that describe the file rather than the model: written fresh.
_FILE_KEYS = ("general.file_type", "general.quantization_version", "general.alignment")

# transformers' model_type -> gguf-py's architecture name, where they differ.
_ARCH_OF_MODEL_TYPE = {"gemma3_text": "gemma3", "qwen2_moe": "qwen2moe", "qwen3_moe": "qwen3moe"}
SUPPORTED_ARCHS = ("llama", "qwen2", "gemma3")


@dataclass(frozen=True)
class GGUFMetadata:
    """The key/value pairs a GGUF file carries besides its tensors, as (value, type, sub_type)."""

    arch: str
    fields: dict[str, tuple[Any, gguf.GGUFValueType, gguf.GGUFValueType | None]]

    @classmethod
    def from_file(cls, path: str | Path) -> GGUFMetadata:
        reader = gguf.GGUFReader(str(path))
        fields = {}
        for name, field in reader.fields.items():
            if name.startswith("GGUF.") or name in _FILE_KEYS or not field.types:
                continue
            main = field.types[0]
            sub = field.types[-1] if main == gguf.GGUFValueType.ARRAY else None
            fields[name] = (field.contents(), main, sub)
        arch_field = fields.get("general.architecture")
        if arch_field is None:
            raise ConfigError(f"{path}: no general.architecture key; this is not a model GGUF file")
        return cls(str(arch_field[0]), fields)


def model_arch(model: nn.Module) -> str:
    """gguf-py's architecture name for a transformers model, refusing those not written yet."""
    model_type = model.config.model_type
    arch = _ARCH_OF_MODEL_TYPE.get(model_type, model_type)
    if arch not in SUPPORTED_ARCHS:
        raise ConfigError(f"GGUF export supports {', '.join(SUPPORTED_ARCHS)} models; this one is {model_type!r}")
    return arch


def gguf_names(model: nn.Module, arch: str | None = None) -> dict[str, str]:
    """transformers parameter name -> GGUF tensor name, for every parameter of `model` (a tied
    output head has none of its own). Refuses a parameter gguf-py's table cannot name."""
    arch = arch or model_arch(model)
    arch_id = next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == arch)
    table = gguf.get_tensor_name_map(arch_id, model.config.num_hidden_layers)
    names = {}
    for full, _ in model.named_parameters():
        base, _, suffix = full.rpartition(".")
        mapped = table.get_name(base)
        if mapped is None:
            raise ConfigError(f"parameter {full} has no GGUF name for architecture {arch}")
        names[full] = f"{mapped}.{suffix}"
    return names


def _qk_rows(n_rows: int, n_head: int) -> torch.Tensor:
    """The row order llama.cpp's llama q/k weights use: within each head, the two rotary halves
    interleaved (row i of head h's first half, then row i of its second half)."""
    dim = n_rows // n_head // 2
    return torch.arange(n_rows).reshape(n_head, 2, dim).transpose(1, 2).reshape(-1)


def to_gguf_layout(arch: str, gguf_name: str, value: BlockWeight | torch.Tensor, config: Any) -> BlockWeight | torch.Tensor:
    """The tensor as llama.cpp stores it (see the module docstring)."""
    if arch == "llama" and (".attn_q." in gguf_name or ".attn_k." in gguf_name):
        heads = config.num_attention_heads if ".attn_q." in gguf_name else config.num_key_value_heads
        rows = _qk_rows(value.shape[0], heads)
        if isinstance(value, BlockWeight):
            return BlockWeight(value.block_type, value.shape, value.data[rows].contiguous())
        return value[rows].contiguous()
    if arch == "gemma3" and gguf_name.endswith("norm.weight"):
        return value + 1
    return value


def write_gguf(path: str | Path, tensors: Mapping[str, BlockWeight | torch.Tensor], metadata: GGUFMetadata,
               file_type: str | None = None) -> Path:
    """Write `tensors` (GGUF name -> record or float tensor, already in llama.cpp's layout) and
    `metadata` to `path`. `file_type` is the mix's name (e.g. "Q4_K_M") for general.file_type."""
    path = Path(path)
    writer = gguf.GGUFWriter(str(path), metadata.arch)
    for key, (value, vtype, sub) in metadata.fields.items():
        if key == "general.architecture":
            continue  # the writer adds it
        writer.add_key_value(key, value, vtype, sub)
    if file_type is not None:
        ftype = getattr(gguf.LlamaFileType, f"MOSTLY_{file_type}", None)
        if ftype is None:
            raise ConfigError(f"{file_type!r} is not a llama.cpp file type")
        writer.add_file_type(int(ftype))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    for name, value in tensors.items():
        if isinstance(value, BlockWeight):
            qtype = gguf.GGMLQuantizationType[value.block_type]
            writer.add_tensor(name, value.data.numpy(), raw_dtype=qtype)
        elif isinstance(value, torch.Tensor) and value.dtype == torch.float16:
            writer.add_tensor(name, value.detach().contiguous().numpy())
        elif isinstance(value, torch.Tensor) and value.is_floating_point():
            writer.add_tensor(name, value.detach().float().contiguous().numpy())
        else:
            raise ShapeError(f"{name}: cannot write a {type(value).__name__} into a GGUF file")
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def read_types(path: str | Path) -> dict[str, tuple[str, tuple[int, ...]]]:
    """GGUF name -> (type name, shape as [out, in]) of every tensor in a GGUF file."""
    reader = gguf.GGUFReader(str(path))
    return {t.name: (t.tensor_type.name, tuple(int(x) for x in reversed(t.shape.tolist()))) for t in reader.tensors}
