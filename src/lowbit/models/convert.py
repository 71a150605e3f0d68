"""Convert a GGUF file, once, to a plain Hugging Face safetensors folder in the cache.

transformers reads a GGUF with `from_pretrained(dir, gguf_file=NAME)` and dequantizes every tensor
to float32, which takes ~20-80 s for a small model (much of it building the tokenizer). The result
carries a GGUF `quantization_config` that makes `save_pretrained` refuse it, so we drop that
config, rebuild the model from the config on the meta device, move the dequantized tensors in
(`assign=True`, no copy), and save model and tokenizer. Later loads read the folder in seconds.

The folder is `<cache>/hf/<gguf stem>-<first 16 hex of the gguf sha256>/`, written to a temporary
folder and renamed into place, so a folder that exists is complete. It holds
`lowbit-source.json` naming the GGUF it came from.
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch
import transformers
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from lowbit.errors import ConfigError
from lowbit.paths import cache_dir

SOURCE_RECORD = "lowbit-source.json"


def converted_dir(gguf: Path, sha256: str, cache: Path | None = None) -> Path:
    """The cache folder that holds (or will hold) the conversion of this GGUF file."""
    return cache_dir(cache) / "hf" / f"{Path(gguf).stem}-{sha256[:16]}"


def ensure_converted(
    gguf: Path, sha256: str, cache: Path | None = None, progress: bool = True
) -> Path:
    """The converted folder of `gguf`, converting it first if the cache lacks it."""
    dest = converted_dir(gguf, sha256, cache)
    if (dest / SOURCE_RECORD).is_file():
        return dest
    if dest.exists():  # not written by us: rename is atomic, and we always write the record
        if progress:
            print(f"lowbit: replacing incomplete folder {dest}", file=sys.stderr, flush=True)
        shutil.rmtree(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    if progress:
        print(f"lowbit: converting {gguf.name} to safetensors in {dest} (once)", file=sys.stderr)
    start = time.perf_counter()
    tmp = Path(tempfile.mkdtemp(dir=dest.parent, prefix=f".{dest.name}.tmp-"))
    try:
        convert_gguf(gguf, tmp, sha256)
        tmp.chmod(0o755)  # mkdtemp makes it private; the cache is not
        try:
            tmp.rename(dest)
        except OSError:
            if not (dest / SOURCE_RECORD).is_file():  # not a lost race with another process
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if progress:
        print(f"lowbit: converted in {time.perf_counter() - start:.0f} s", file=sys.stderr)
    return dest


def convert_gguf(gguf: Path, out: Path, sha256: str) -> None:
    """Dequantize `gguf` and save it as a float32 safetensors folder (model + tokenizer) in `out`."""
    try:
        model = AutoModelForCausalLM.from_pretrained(
            gguf.parent, gguf_file=gguf.name, dtype=torch.float32
        )
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    except (ValueError, KeyError, NotImplementedError) as e:
        raise ConfigError(
            f"transformers {transformers.__version__} cannot load the GGUF file {gguf}: {e}"
        ) from e
    plain = without_quantization_config(model)
    plain.save_pretrained(out)
    tokenizer.save_pretrained(out)
    record = {
        "gguf_file": gguf.name,
        "gguf_sha256": sha256,
        "model_type": plain.config.model_type,
        "dtype": "float32",
        "transformers": transformers.__version__,
    }
    (out / SOURCE_RECORD).write_text(json.dumps(record, indent=2) + "\n")


def without_quantization_config(model: PreTrainedModel) -> PreTrainedModel:
    """The same weights in a model whose config has no GGUF quantization_config.

    The tensors are shared with `model`, not copied; tied embeddings are tied again. Buffers that
    are not in the state dict (rotary frequencies) stay on the meta device, so the result is only
    fit for `save_pretrained`.
    """
    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    with torch.device("meta"):
        plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(model.state_dict(), assign=True)
    plain.tie_weights()
    plain.generation_config = model.generation_config
    return plain
