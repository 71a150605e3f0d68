"""An open checkpoint's tensors by the model's parameter names, read one group at a time, for jobs
that fill a model one decoder block at a time (eval/streamed.py).

    weights = DequantizedWeights(open_checkpoint("out/smol-w4g64"))
    block = weights.get_many(["model.layers.3.mlp.up_proj.weight", ...], torch.float32)

A quantized layer's weight is its record dequantized to the dtype asked for
(QuantizedWeight.dequantize, the one rule the reference runtime's QuantLinear computes with), its
bias the stored one converted to that dtype, as the reference runtime runs it; every other tensor
is the dense file's, a float one converted. The same interface as models/weights.py's
FolderWeights, so models/skeleton.materialize reads from either.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from lowbit.checkpoint.read import StoredCheckpoint
from lowbit.errors import CheckpointError, ShapeError


class DequantizedWeights:
    """The tensors of the open checkpoint `checkpoint` ({parameter name: tensor}), read on demand;
    closing the checkpoint is its owner's business."""

    def __init__(self, checkpoint: StoredCheckpoint):
        self.checkpoint = checkpoint
        self._layer: dict[str, str] = {}  # quantized layer's "X.weight" / "X.bias" -> "X"
        self._shapes: dict[str, tuple[int, ...]] = {k: tuple(t.shape) for k, t in checkpoint.dense_meta().items()}
        for name, entry in checkpoint.layers.items():
            self._layer[f"{name}.weight"] = name
            self._shapes[f"{name}.weight"] = tuple(entry.shape)
            bias = checkpoint.weights.bias_meta(name)
            if bias is not None:
                self._layer[f"{name}.bias"] = name
                self._shapes[f"{name}.bias"] = tuple(bias.shape)

    def keys(self) -> Iterable[str]:
        return self._shapes.keys()

    def __contains__(self, name: str) -> bool:
        return name in self._shapes

    def shape(self, name: str) -> tuple[int, ...]:
        return self._shapes[name]

    def get(self, name: str, dtype: torch.dtype) -> torch.Tensor:
        """The tensor `name` (see the module docstring), floats as `dtype`."""
        return self.get_many([name], dtype)[name]

    def get_many(self, names: Iterable[str], dtype: torch.dtype) -> dict[str, torch.Tensor]:
        """The tensors `names`, as get() gives them; each quantized layer's record is read once."""
        ck, out = self.checkpoint, {}
        for name in names:
            layer = self._layer.get(name)
            if layer is None and name not in self._shapes:
                raise CheckpointError(f"{ck.path} holds no tensor {name}, which the model its config.json "
                                      "describes needs; the checkpoint is incomplete: re-run `lowbit quantize`")
            if layer is None:
                out[name] = ck.dense_tensor(name, dtype)
            elif name.endswith(".weight"):
                out[name] = self._dequantized(layer, dtype)
            else:
                out[name] = ck.weights.bias(layer).to(dtype)
        return out

    def _dequantized(self, layer: str, dtype: torch.dtype) -> torch.Tensor:
        """Layer `layer`'s weight [out, in] from its record, as `dtype`."""
        try:
            return self.checkpoint.weights[layer].unpack().dequantize(dtype)
        except CheckpointError:  # a file that changed or is cut short: said as it is
            raise
        except (KeyError, ValueError, ShapeError) as e:
            raise CheckpointError(f"{self.checkpoint.path}: layer {layer} is inconsistent with its manifest entry "
                                  f"({e})") from None
