"""lowbit's rounding on llama.cpp's block types: the records are BlockWeight, the bytes a GGUF holds.

Two quantizers, both on the block type's own grid (formats/ggml):

- `ggml_rtn`: round-to-nearest after the type's importance-weighted scale search (BlockType.fit).
  Without data, the importance of a weight is rms(block) + |w| (large weights matter more, as in
  llama.cpp's quantizer without an importance matrix); with a Hessian, diag(H) of its column
  (llama.cpp's importance matrix is the same statistic: the mean squared input of the column).
- `ggml_gptq`: GPTQ's column loop with error feedback (algorithms/gptq.py) where the group
  parameters are the block type's: when the loop reaches a block, the type's encoder chooses the
  block's scales (and sub-block scales and mins) from the block's current, error-updated weights,
  weighted by diag(H); each column is then rounded to the nearest value of that grid and its
  error is spread over the columns not yet quantized.
"""

from __future__ import annotations

import torch

from lowbit.algorithms.gptq import feed_back, inverse_hessian_cholesky
from lowbit.errors import ConfigError
from lowbit.formats.ggml import BLOCK_TYPES, BlockType, blocks_of
from lowbit.qtensor import BlockWeight
from lowbit.recipes import GPTQConfig


def block_type(name: str) -> BlockType:
    bt = BLOCK_TYPES.get(name)
    if bt is None:
        raise ConfigError(f"block type {name!r} is not one of {', '.join(BLOCK_TYPES)}")
    return bt


def data_free_importance(blocks: torch.Tensor) -> torch.Tensor:
    """[N, block] -> [N, block]: rms of the block plus the weight's magnitude."""
    rms = blocks.pow(2).mean(dim=1, keepdim=True).sqrt()
    return rms + blocks.abs()


def ggml_rtn(w: torch.Tensor, type_name: str, column_importance: torch.Tensor | None = None,
             name: str = "weight") -> BlockWeight:
    """w [out, in] -> BlockWeight: the type's scale search, then nearest values.
    column_importance [in] (optional, e.g. diag(H)) weights each column's squared error; without
    it the data-free importance is used."""
    bt = block_type(type_name)
    w = w.detach().float()
    blocks = blocks_of(w, bt, name)
    if column_importance is None:
        imp = data_free_importance(blocks)
    else:
        imp = column_importance.float().clamp_min(0).reshape(1, -1).expand_as(w).reshape(-1, bt.block)
    data = bt.quantize_blocks(blocks, imp)
    return BlockWeight(bt.name, tuple(w.shape), data.reshape(w.shape[0], -1))


def ggml_gptq(w: torch.Tensor, H: torch.Tensor, type_name: str, config: GPTQConfig = GPTQConfig(),  # noqa: B008
              name: str = "weight") -> tuple[BlockWeight, float, float]:
    """w [out, in], H [in, in] -> (BlockWeight, GPTQ's proxy loss, damp used). The column order
    is kept (a GGUF has no permutation), so act-order is refused."""
    bt = block_type(type_name)
    if config.act_order:
        raise ConfigError("GPTQ on llama.cpp block types keeps the column order (GGUF stores no permutation): "
                          "drop --act-order")
    out_f, in_f = w.shape
    blocks_of(w, bt, name)  # refuses a width that is not whole blocks
    W = w.detach().float().clone()
    H = H.detach().float()  # read, never written
    importance = torch.diag(H)
    dead = importance == 0
    W[:, dead] = 0.0
    importance[dead] = 1.0  # as inverse_hessian_cholesky counts a dead column
    importance = importance.clamp_min(0)
    Hinv, damp_used = inverse_hessian_cholesky(H, config.damp)

    codes = torch.zeros(out_f, in_f, dtype=torch.uint8)
    data = []
    table = params = None
    loss = torch.zeros(out_f)
    B = config.block_size
    for i1 in range(0, in_f, B):
        i2 = min(i1 + B, in_f)
        W1 = W[:, i1:i2].clone()
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = i1 + i
            if col % bt.block == 0:
                if params is not None:
                    data.append(bt.encode(params, codes[:, col - bt.block:col]))
                cur = torch.cat([W1[:, i:], W[:, i2:i2 + bt.block]], dim=1)[:, :bt.block]
                params = bt.fit(cur, importance[col:col + bt.block].reshape(1, -1).expand_as(cur).contiguous())
                table = bt.table(params)
            wcol = W1[:, i]
            levels = table[:, (col % bt.block) // bt.sub, :]                  # [out, L]
            q = (wcol.unsqueeze(1) - levels).abs().argmin(dim=1)
            dq = levels.gather(1, q.unsqueeze(1)).squeeze(1)
            codes[:, col] = q.to(torch.uint8)
            feed_back(W1, Err1, Hinv1, i, dq, loss)
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]
    data.append(bt.encode(params, codes[:, in_f - bt.block:]))
    record = BlockWeight(bt.name, (out_f, in_f), torch.cat(data, dim=1))
    return record, float(loss.sum()) / 2, damp_used
