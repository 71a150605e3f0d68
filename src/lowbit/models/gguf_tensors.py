"""A GGUF file's tensors, dequantized one at a time, under the names and in the layout transformers
gives them.

transformers reads a GGUF file whole: `from_pretrained(dir, gguf_file=NAME)` has
`load_gguf_checkpoint(..., return_tensors=True)` dequantize every tensor into one dict. GGUFSource
calls the same pieces of transformers the same way, but a tensor at a time, from gguf-py's
memory-mapped reader:
  - `load_gguf_checkpoint(path, return_tensors=False)` parses the metadata into the config dict,
    from which the config and the model (on the meta device: no memory) are built;
  - `get_gguf_hf_weights_map(model, processor)` maps GGUF tensor names to the model's;
  - the processor `TENSOR_PROCESSORS[general.architecture]`, given that same config dict, undoes
    what llama.cpp's converter did to a tensor (llama's q/k rows interleaved per head, gemma's
    norms stored plus one);
  - gguf-py's `dequantize` turns a tensor's blocks to floats (here a run of rows at a time, into
    one array: DEQUANT_BYTES), cast to float32 afterwards as transformers casts them.

Weights: what `save_pretrained` would write of the model, i.e. its state dict less the copies of
tied weights (a head tied to the embeddings is not stored).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import torch
from transformers import (
    CONFIG_MAPPING,
    AutoModelForCausalLM,
    PreTrainedConfig,
    PreTrainedModel,
)
from transformers.modeling_gguf_pytorch_utils import (
    TENSOR_PROCESSORS,
    TensorProcessor,
    get_gguf_hf_weights_map,
    load_gguf_checkpoint,
    read_field,
)
from transformers.modeling_utils import remove_tied_weights_from_state_dict

from lowbit.errors import ConfigError

DTYPE = torch.float32
# float32 bytes of one run of rows dequantized at once: gguf-py's dequantize keeps every part of a
# tensor until it joins them, twice the tensor at its peak (2 GB for a 1.5B model's embeddings)
DEQUANT_BYTES = 1 << 24


@dataclass
class GGUFSource:
    """A GGUF file opened for reading tensor by tensor (nothing dequantized yet)."""

    path: Path
    reader: gguf.GGUFReader
    model: PreTrainedModel      # built from the file's config on the meta device
    processor: TensorProcessor
    names: dict[str, str]       # GGUF tensor name -> transformers name
    weights: dict[str, torch.Size]  # transformers name -> shape, of every tensor to store
    # where a processor puts the tensors it puts together itself (as in load_gguf_checkpoint)
    _placed: dict[str, dict[str, torch.Tensor]] = field(default_factory=lambda: {"tensors": {}})

    @classmethod
    def open(cls, path: Path) -> GGUFSource:
        path = Path(path)
        parsed = load_gguf_checkpoint(str(path), return_tensors=False)["config"]
        config: PreTrainedConfig = CONFIG_MAPPING[parsed["model_type"]].from_dict(dict(parsed))
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, dtype=DTYPE)
        model.tie_weights()
        reader = gguf.GGUFReader(str(path))
        architecture = read_field(reader, "general.architecture")[0]
        processor = TENSOR_PROCESSORS.get(architecture, TensorProcessor)(config=parsed)
        names = get_gguf_hf_weights_map(model, processor)
        stored = remove_tied_weights_from_state_dict(dict(model.state_dict()), model)
        weights = {name: t.shape for name, t in stored.items()}
        return cls(path, reader, model, processor, names, weights)

    def read(self, tensor: gguf.ReaderTensor) -> tuple[str, torch.Tensor] | None:
        """`tensor` dequantized, processed and cast to float32, with its transformers name; None
        for a tensor the model does not use, or one the processor keeps to put together with
        others (see put_together)."""
        try:
            values = _dequantize(tensor)
            result = self.processor.process(weights=values, name=tensor.name, tensor_key_mapping=self.names,
                                            parsed_parameters=self._placed)
        except (ValueError, KeyError, IndexError, TypeError, NotImplementedError) as e:
            raise ConfigError(f"cannot read tensor {tensor.name} ({tensor.tensor_type.name}) of the GGUF file "
                              f"{self.path}: {e}") from e
        if result.name not in self.names:
            return None
        return self.names[result.name], _to_torch(result.weights)

    def put_together(self) -> dict[str, torch.Tensor]:
        """Tensors a processor assembled from several of the file's (Mixture-of-Experts files: the
        experts' weights merged or split), complete once every tensor has been read."""
        return {name: t.to(DTYPE) for name, t in self._placed["tensors"].items()}

    def loading_info(self, shapes: dict[str, torch.Size]) -> dict[str, Any]:
        """transformers' loading report (missing, mismatched, unexpected keys) for a load of the
        tensors of these shapes, for check_loading_info."""
        return {
            "missing_keys": sorted(set(self.weights) - set(shapes)),
            "mismatched_keys": sorted((name, shape, self.weights[name]) for name, shape in shapes.items()
                                      if name in self.weights and shape != self.weights[name]),
            "unexpected_keys": sorted(set(shapes) - set(self.weights)),
        }


def _dequantize(tensor: gguf.ReaderTensor) -> np.ndarray:
    """gguf-py's dequantize of `tensor`, computed DEQUANT_BYTES of output at a time: the same values
    (every block is decoded alone), in one array of the tensor's [..., rows, columns] shape."""
    data, qtype = tensor.data, tensor.tensor_type
    if qtype == gguf.GGMLQuantizationType.F32 or data.ndim < 2:
        return gguf.dequantize(data, qtype)  # F32: a view of the file, nothing decoded
    out = np.empty(tuple(int(n) for n in reversed(tensor.shape.tolist())), dtype=np.float32)
    rows, out_rows = data.reshape(-1, data.shape[-1]), out.reshape(-1, out.shape[-1])
    step = max(1, DEQUANT_BYTES // (4 * out.shape[-1]))
    for start in range(0, len(rows), step):
        out_rows[start:start + step] = gguf.dequantize(rows[start:start + step], qtype)
    return out


def _to_torch(values: np.ndarray) -> torch.Tensor:
    if not values.flags.writeable:  # a float32 tensor is a view of the file's read-only mapping
        values = np.copy(values)
    return torch.from_numpy(values).to(DTYPE).contiguous()
