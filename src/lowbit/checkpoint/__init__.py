"""Checkpoints: quantized records and dense tensors in safetensors, described by a JSON manifest.

    manifest.py   Manifest / LayerEntry (versioned), check_manifest: what manifest.json holds
    tensors.py    the bounded safetensors reader (_Tensors)
    write.py      save_checkpoint: records and dense tensors -> a folder, published in one rename
    verify.py     verify_files, verify_checkpoint: every check a folder passes before it is parsed
    read.py       open_checkpoint: folder -> StoredCheckpoint (records as StoredWeights, dense tensors)
    dequantized.py DequantizedWeights: an open checkpoint's tensors by parameter name, records dequantized

Imports nothing from lowbit.runtime: lowbit.loading turns what open_checkpoint reads into a
runnable model (runtime/convert.py: to_runtime).
"""

from lowbit.checkpoint.manifest import (
    DENSE_FILE,
    FLOAT_DTYPES,
    FORMAT_VERSION,
    REPORT,
    REQUIRED_FILES,
    TOKENIZER_FILE,
    UNHASHED,
    LayerEntry,
    Manifest,
    Source,
    Stats,
    check_manifest,
    read_manifest,
)
from lowbit.checkpoint.read import (
    StoredCheckpoint,
    StoredWeights,
    is_checkpoint,
    open_checkpoint,
)
from lowbit.checkpoint.tensors import _Tensors
from lowbit.checkpoint.verify import verify_checkpoint, verify_files
from lowbit.checkpoint.write import save_checkpoint
from lowbit.marks import (  # re-exported: the folder's file names and the checkpoint test for model loaders
    CONFIG_FILE,
    FORMAT,
    MANIFEST,
    QUANT_FILE,
    check_not_checkpoint,
    looks_like_checkpoint,
)

__all__ = [
    "CONFIG_FILE", "DENSE_FILE", "FLOAT_DTYPES", "FORMAT", "FORMAT_VERSION", "MANIFEST", "QUANT_FILE", "REPORT",
    "REQUIRED_FILES", "TOKENIZER_FILE", "UNHASHED", "LayerEntry", "Manifest", "Source", "Stats",
    "StoredCheckpoint", "StoredWeights",
    "_Tensors", "check_manifest", "check_not_checkpoint", "is_checkpoint", "looks_like_checkpoint",
    "open_checkpoint", "read_manifest", "save_checkpoint", "verify_checkpoint", "verify_files",
]
