"""MappedEmbedding: an input embedding table left in the checkpoint file and read on demand.

A decode step reads one row of the input embedding; prefill reads one per prompt token. Loading
the whole table (for qwen2.5-coder-1.5b a 934 MB float32 tensor, converted to 467 MB of bfloat16)
costs load time and resident memory for rows most runs never touch. The packed runtime instead
memory-maps the table where the checkpoint stores it (checkpoint._Tensors.mapped): the system
reads the pages of the rows a lookup touches, and only those rows are converted to the model's
dtype. Converting a row is the same elementwise rounding as converting the whole table first, so
the result is bit-identical to an nn.Embedding holding the converted table.

Only for an embedding that is not also the output head (a tied head reads the whole table every
step, and wants it converted once).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class MappedEmbedding(nn.Module):
    """Lookups in `table` (any float dtype, typically a read-only file mapping), returned as `dtype`.

    The table is a plain attribute, not a parameter or buffer: `.to()` does not copy it into memory
    and state_dict() does not include it."""

    def __init__(self, table: torch.Tensor, dtype: torch.dtype, padding_idx: int | None = None):
        super().__init__()
        if table.dim() != 2 or not table.is_floating_point():
            raise ValueError(f"an embedding table is a 2-D float tensor, not {tuple(table.shape)} {table.dtype}")
        self.table = table
        self.out_dtype = dtype
        self.num_embeddings, self.embedding_dim = table.shape
        self.padding_idx = padding_idx

    @property
    def weight(self) -> torch.Tensor:
        """The stored table (mapped; in its stored dtype). Reading all of it reads the file."""
        return self.table

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, self.table).to(self.out_dtype)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, mapped {self.table.dtype} -> {self.out_dtype}"


def embedding_dtype(module: nn.Module) -> torch.dtype:
    """The dtype an input embedding module returns."""
    return module.out_dtype if isinstance(module, MappedEmbedding) else module.weight.dtype
