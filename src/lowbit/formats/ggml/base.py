"""The shape every llama.cpp (ggml) block type takes in lowbit.

A ggml block type stores a row of weights in blocks of `block` weights (32, or 256 for the K and
IQ4_XS "super-blocks"), each `type_size` bytes: some scales (and mins), then the codes. Within a
block, `sub` consecutive weights share one decoded (scale, offset) pair; a code k stands for one of
`n_levels` values of that sub-block.

Each type is one class with four parts, on arrays of blocks (N blocks, any N):

    fit(w [N, block], imp [N, block])   -> params   the encoder: choose the block's scales (a search)
    table(params)                        -> float32 [N, block // sub, n_levels]
                                            the value each code decodes to, in each sub-block, computed
                                            with exactly the float operations of `decode`
    encode(params, codes uint8 [N, block]) -> uint8 [N, type_size]   the bytes llama.cpp reads
    decode(data uint8 [N, type_size])    -> float32 [N, block]       lowbit's own dequantization

`fit` sees an importance per weight (llama.cpp's imatrix times a weight-dependent term, or the
diagonal of a GPTQ Hessian): its search minimises sum imp * (w - value)^2 over each block. Once
`params` are fixed, rounding is a nearest-value lookup in `table`, which is what lets GPTQ round one
column at a time with error feedback on the block type's own grid (algorithms/ggml_gptq.py).

Exactness contract, tested for every type (tests/formats/test_ggml_blocks.py):
  - decode(encode(p, c)) == take(table(p), c)   bit for bit;
  - decode(data) == gguf.quants.dequantize(data) bit for bit (gguf-py is llama.cpp's own Python
    reference of its formats).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, ClassVar

import torch

from lowbit.errors import ShapeError

CHUNK = 65536  # blocks quantized at a time by quantize_blocks
Params = Any  # each type's own (a dataclass of [N, ...] tensors); only the type reads it


class BlockType(ABC):
    """One ggml block type: its geometry, its encoder and its byte layout."""

    name: ClassVar[str]        # llama.cpp's name, as gguf.GGMLQuantizationType spells it: "Q4_K"
    block: ClassVar[int]       # weights per block
    sub: ClassVar[int]         # weights per (scale, offset) sub-block
    type_size: ClassVar[int]   # bytes per block
    n_levels: ClassVar[int]    # codes per weight: 2**bits

    @abstractmethod
    def fit(self, w: torch.Tensor, imp: torch.Tensor) -> Params:
        """w, imp float32 [N, block] -> the block's scales (and mins), chosen to minimise the
        importance-weighted squared error of the rounded weights."""

    @abstractmethod
    def table(self, params: Params) -> torch.Tensor:
        """float32 [N, block // sub, n_levels]: what each code decodes to in each sub-block."""

    @abstractmethod
    def encode(self, params: Params, codes: torch.Tensor) -> torch.Tensor:
        """params, codes uint8 [N, block] (each < n_levels) -> uint8 [N, type_size]."""

    @abstractmethod
    def decode(self, data: torch.Tensor) -> torch.Tensor:
        """uint8 [N, type_size] -> float32 [N, block]."""

    @property
    def bits_per_weight(self) -> float:
        return 8 * self.type_size / self.block

    def nearest(self, table: torch.Tensor, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """table [N, S, L], w [N, S * sub] -> (codes uint8 [N, S * sub], values float32 [N, S * sub]):
        each weight's nearest value of its sub-block (the lower code on a tie)."""
        n, s, _ = table.shape
        t = table.unsqueeze(2)                                   # [N, S, 1, L]
        x = w.reshape(n, s, -1, 1)                               # [N, S, sub, 1]
        codes = (x - t).abs().argmin(dim=-1)                     # first minimum: the lower code
        values = torch.gather(t.expand(-1, -1, x.shape[2], -1), -1, codes.unsqueeze(-1)).squeeze(-1)
        return codes.reshape(n, -1).to(torch.uint8), values.reshape(n, -1)

    def quantize_blocks(self, w: torch.Tensor, imp: torch.Tensor | None = None) -> torch.Tensor:
        """Round-to-nearest on this type's grid with the importance-weighted scale search:
        w float32 [N, block] -> uint8 [N, type_size]. Without `imp`, every weight counts the same.
        Works through CHUNK blocks at a time, so a table of an embedding's millions of blocks is
        never held at once."""
        w = w.float()
        imp = torch.ones_like(w) if imp is None else imp.float().expand_as(w)
        out = torch.empty(w.shape[0], self.type_size, dtype=torch.uint8)
        for i in range(0, w.shape[0], CHUNK):
            wc, ic = w[i:i + CHUNK], imp[i:i + CHUNK]
            params = self.fit(wc, ic)
            codes, _ = self.nearest(self.table(params), wc)
            out[i:i + CHUNK] = self.encode(params, codes)
        return out


def blocks_of(w: torch.Tensor, bt: BlockType, name: str = "weight") -> torch.Tensor:
    """[rows, cols] -> [rows * cols / block, block], refusing a width that is not whole blocks."""
    if w.dim() != 2 or w.shape[1] % bt.block:
        raise ShapeError(f"{name}: a row of {tuple(w.shape)[-1]} weights is not a whole number of "
                         f"{bt.name} blocks of {bt.block}")
    return w.reshape(-1, bt.block)
