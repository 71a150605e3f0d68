"""Write a 7B-shaped model whose weights are random draws matched to a smaller model's statistics.

    python benchmarks/make_shaped_model.py --like qwen2.5-coder-1.5b --shape qwen2.5-7b -o DIR
        [--dtype bfloat16] [--seed 0] [--shard-gb 2] [--layers N]

No 7B weights are available offline, so this generates a stand-in: the real configuration of
Qwen2.5-7B or Llama-2-7B (written with transformers' own Qwen2Config / LlamaConfig), with every
weight drawn at random to match the per-layer statistics of the `--like` model. THE WEIGHTS ARE
RANDOM: the model's perplexity, its generations and its accuracy mean nothing. Only what depends
on shapes and sizes means something: memory, load time, quantization time, decode speed.
`--layers N` keeps the shape's every width but gives it N decoder blocks (their statistics still
taken at the same relative depth of the source): a streamed job holds one block at a time, so its
peak memory is the full model's, in a fraction of the time and disk (its time is per block).

What is matched, per tensor kind (q/k/v/o projections and their biases, gate/up/down, both norms,
embeddings, final norm, head) and per source layer, the target's layer i taking the source layer
at the same relative depth:
  * matrices: mean, and the distribution of the row (output-channel) stds and of the column stds,
    summarized by QUANTILES quantiles each. A target matrix gets its row stds and column scales
    from a random permutation of those quantiles, so its outlier rows and columns are as large,
    and as rare, as the source's (outlier channels matter to quantization);
  * vectors (norm weights, biases): the distribution of their values, the same way.
The source is read tensor by tensor with safetensors.safe_open, never as a whole model, and each
target tensor is drawn in row blocks from its own seeded torch.Generator, one shard (about
--shard-gb) in memory at a time. The same --seed gives the same bytes.

The folder holds model-0000k-of-0000n.safetensors shards, model.safetensors.index.json,
config.json and, when the source tokenizer fits the target vocabulary (qwen2.5-7b from a Qwen2.5
source: 151665 tokens < 152064 rows), the source's tokenizer files and generation_config.json.
For llama-2-7b (vocabulary 32000) no tokenizer here fits, so none is written: transformers loads
the model, but loaders that need a tokenizer (lowbit's load_model, calibration) refuse the folder.
It is written into a temporary folder beside the output and renamed at the end, so a folder with
that name is complete; an existing output is refused.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import transformers
from safetensors import safe_open
from safetensors.torch import save_file

QUANTILES = 129          # points of each quantile summary, min and max included
BLOCK_ELEMENTS = 1 << 24  # float32 scratch of one drawn row block (64 MiB)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "vocab.json", "merges.txt", "tokenizer.model", "chat_template.jinja")

SHAPES: dict[str, dict] = {
    "qwen2.5-7b": {"model_type": "qwen2", "hidden_size": 3584, "intermediate_size": 18944,
                   "num_hidden_layers": 28, "num_attention_heads": 28, "num_key_value_heads": 4,
                   "vocab_size": 152064, "rope_theta": 1e6, "tie_word_embeddings": False,
                   "rms_norm_eps": 1e-6, "max_position_embeddings": 32768, "max_window_layers": 28},
    "llama-2-7b": {"model_type": "llama", "hidden_size": 4096, "intermediate_size": 11008,
                   "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 32,
                   "vocab_size": 32000, "rope_theta": 1e4, "tie_word_embeddings": False,
                   "rms_norm_eps": 1e-5, "max_position_embeddings": 4096, "attention_bias": False},
}
CONFIG_CLASSES = {"qwen2": transformers.Qwen2Config, "llama": transformers.LlamaConfig}
_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)$")


# --- statistics of the source -----------------------------------------------------------------------

@dataclass
class TensorStats:
    """What is kept of one source tensor: mean and std of all its values, and quantile summaries
    (QUANTILES points, ascending): of row and column stds for a matrix, of the values for a vector."""

    mean: float
    std: float
    row_std_q: torch.Tensor | None = None   # [QUANTILES]
    col_std_q: torch.Tensor | None = None   # [QUANTILES]
    value_q: torch.Tensor | None = None     # [QUANTILES]


@dataclass
class SourceStats:
    """TensorStats of every source tensor, keyed by (kind, layer): kind is the name without its
    `model.layers.<i>.` prefix, layer is None outside the blocks."""

    tensors: dict[tuple[str, int | None], TensorStats]
    num_layers: int

    def for_target(self, name: str, target_layers: int) -> TensorStats:
        """The statistics a target tensor `name` is drawn from (its layer mapped by relative depth)."""
        kind, layer = split_name(name)
        if layer is not None:
            layer = source_layer(layer, self.num_layers, target_layers)
        found = self.tensors.get((kind, layer))
        if found is None and kind == "lm_head.weight":  # a tied source: its head is the embedding
            found = self.tensors.get(("model.embed_tokens.weight", None))
        if found is None:
            raise ValueError(f"the source has no tensor of kind {kind!r} (layer {layer}) to match target tensor "
                             f"{name!r}; pick a source of the same family as the target shape (e.g. a Qwen2.5 "
                             "model for qwen2.5-7b, whose attention has biases)")
        return found


def split_name(name: str) -> tuple[str, int | None]:
    """'model.layers.3.mlp.up_proj.weight' -> ('mlp.up_proj.weight', 3); other names -> (name, None)."""
    m = _LAYER.match(name)
    return (m.group(2), int(m.group(1))) if m else (name, None)


def source_layer(i: int, source_layers: int, target_layers: int) -> int:
    """The source layer at the same relative depth as target layer i (first to first, last to last)."""
    if target_layers == 1:
        return 0
    return int(i * (source_layers - 1) / (target_layers - 1) + 0.5)


def _quantiles(x: torch.Tensor) -> torch.Tensor:
    return torch.quantile(x.double(), torch.linspace(0, 1, QUANTILES, dtype=torch.float64)).float()


def tensor_stats(t: torch.Tensor) -> TensorStats:
    """TensorStats of one tensor (any float dtype; computed in float32)."""
    t = t.float()
    stats = TensorStats(mean=t.mean().item(), std=t.std().item())
    if t.dim() == 1:
        stats.value_q = _quantiles(t)
    else:
        m = t.reshape(t.shape[0], -1)                     # [out, in]
        stats.row_std_q = _quantiles(m.std(dim=1))        # [out] -> [QUANTILES]
        stats.col_std_q = _quantiles(m.std(dim=0))        # [in]  -> [QUANTILES]
    return stats


def safetensors_files(folder: Path) -> list[Path]:
    """The weight files of a Hugging Face folder (sharded or not)."""
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{folder} holds no *.safetensors file; pass a Hugging Face safetensors folder "
                                "or a known model name")
    return files


def collect_statistics(folder: Path) -> SourceStats:
    """SourceStats of the model in `folder`, read one tensor at a time."""
    tensors: dict[tuple[str, int | None], TensorStats] = {}
    for file in safetensors_files(Path(folder)):
        with safe_open(file, framework="pt") as f:
            names = f.keys()   # a safe_open handle is not iterable
            for name in names:
                tensors[split_name(name)] = tensor_stats(f.get_tensor(name))
    layers = [layer for _, layer in tensors if layer is not None]
    if not layers:
        raise ValueError(f"{folder} has no model.layers.<i>.* tensors; it is not a decoder of a supported family")
    return SourceStats(tensors, max(layers) + 1)


# --- the target ---------------------------------------------------------------------------------------

def target_config(shape: str | dict, dtype: torch.dtype) -> transformers.PretrainedConfig:
    """The transformers config of a shape: a name in SHAPES, or a dict of config fields with a
    model_type among CONFIG_CLASSES (tests pass small ones)."""
    if isinstance(shape, str):
        if shape not in SHAPES:
            raise ValueError(f"unknown shape {shape!r}; choose one of {', '.join(SHAPES)}")
        shape = SHAPES[shape]
    fields = dict(shape)
    model_type = fields.pop("model_type", None)
    if model_type not in CONFIG_CLASSES:
        raise ValueError(f"shape model_type {model_type!r} is not one of {', '.join(CONFIG_CLASSES)}")
    config = CONFIG_CLASSES[model_type](**fields)
    config.dtype = dtype
    return config


def with_layers(shape: str, layers: int) -> dict:
    """The built-in `shape` with `layers` decoder blocks: every width and the vocabulary as they are."""
    return {**SHAPES[shape], "num_hidden_layers": layers}


def target_tensors(config: transformers.PretrainedConfig) -> dict[str, torch.Size]:
    """{name: shape} of every weight the model of `config` holds, in transformers' order (the model
    is built on the meta device, so nothing is allocated)."""
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(config)
    return {name: p.shape for name, p in model.named_parameters()}


def plan_shards(shapes: dict[str, torch.Size], dtype: torch.dtype, shard_bytes: int) -> list[list[str]]:
    """Tensor names grouped into shards of at most `shard_bytes` (a tensor larger than that alone)."""
    shards: list[list[str]] = [[]]
    size = 0
    for name, shape in shapes.items():
        n = shape.numel() * dtype.itemsize
        if shards[-1] and size + n > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += n
    return shards


# --- drawing ------------------------------------------------------------------------------------------

def tensor_generator(seed: int, name: str) -> torch.Generator:
    """A generator of its own for each tensor, so a tensor's draw depends on the seed and its name only."""
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)


def spread(quantiles: torch.Tensor, n: int, gen: torch.Generator) -> torch.Tensor:
    """n values whose distribution follows the quantile summary: the quantile function read at the
    mid-points of n equal strata, in random order (so the largest and rarest values are kept)."""
    levels = (torch.arange(n, dtype=torch.float64) + 0.5) / n * (len(quantiles) - 1)   # [n] in [0, Q-1]
    lo = levels.floor().long().clamp(max=len(quantiles) - 2)
    frac = (levels - lo).float()
    values = quantiles[lo] + frac * (quantiles[lo + 1] - quantiles[lo])
    return values[torch.randperm(n, generator=gen)]


def draw_tensor(stats: TensorStats, shape: torch.Size, dtype: torch.dtype, gen: torch.Generator) -> torch.Tensor:
    """A tensor of `shape` drawn to match `stats`, in row blocks of at most BLOCK_ELEMENTS."""
    if len(shape) == 1:
        if stats.value_q is None:
            raise ValueError(f"a vector of length {shape[0]} cannot be drawn from the statistics of a matrix")
        return spread(stats.value_q, shape[0], gen).to(dtype)
    if stats.row_std_q is None:
        raise ValueError(f"a matrix of shape {tuple(shape)} cannot be drawn from the statistics of a vector")
    rows, cols = shape[0], shape[1:].numel()
    row_std = spread(stats.row_std_q, rows, gen)                       # [rows]
    col_scale = spread(stats.col_std_q, cols, gen)                     # [cols], RMS 1 below
    col_scale /= col_scale.square().mean().sqrt().clamp(min=1e-12)
    out = torch.empty(rows, cols, dtype=dtype)
    step = max(1, BLOCK_ELEMENTS // cols)
    for r in range(0, rows, step):
        z = torch.randn(min(step, rows - r), cols, generator=gen)     # [block, cols]
        out[r:r + step] = z.mul_(col_scale).mul_(row_std[r:r + step, None]).add_(stats.mean).to(dtype)
    return out.reshape(shape)


# --- the folder ---------------------------------------------------------------------------------------

def make_shaped_model(source: Path, shape: str | dict, out: Path, *, dtype: torch.dtype = torch.bfloat16,
                      seed: int = 0, shard_bytes: int = 2 * 10**9, log=print) -> Path:
    """Write the shaped model of `shape`, drawn to match the model in the folder `source`, to `out`
    (see the module docstring). Returns `out`."""
    source, out = Path(source), Path(out)
    if out.exists():
        raise FileExistsError(f"output {out} already exists; pass a new path (or remove it first)")
    config = target_config(shape, dtype)
    shapes = target_tensors(config)
    total = sum(s.numel() for s in shapes.values()) * dtype.itemsize
    out.parent.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(out.parent).free
    if free < total * 1.02:
        raise OSError(f"{out.parent} has {free / 1e9:.1f} GB free; the model needs {total / 1e9:.1f} GB")
    stats = collect_statistics(source)
    log(f"statistics of {len(stats.tensors)} source tensors ({stats.num_layers} layers) read from {source}")
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.tmp-"))
    try:
        _write_shards(tmp, shapes, stats, config.num_hidden_layers, dtype, seed, shard_bytes, total, log)
        tokenizer = _copy_tokenizer(source, tmp, config)
        log(tokenizer)
        config.save_pretrained(tmp)
        if out.exists():
            raise FileExistsError(f"output {out} appeared while it was being written; the new copy is discarded")
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _write_shards(folder: Path, shapes: dict[str, torch.Size], stats: SourceStats, target_layers: int,
                  dtype: torch.dtype, seed: int, shard_bytes: int, total: int, log) -> None:
    """The safetensors shards and their HF index."""
    shards = plan_shards(shapes, dtype, shard_bytes)
    weight_map = {}
    for k, names in enumerate(shards, 1):
        file = f"model-{k:05d}-of-{len(shards):05d}.safetensors"
        tensors = {n: draw_tensor(stats.for_target(n, target_layers), shapes[n], dtype, tensor_generator(seed, n))
                   for n in names}
        save_file(tensors, folder / file, metadata={"format": "pt"})
        del tensors
        weight_map.update(dict.fromkeys(names, file))
        log(f"wrote {file} ({len(names)} tensors)")
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


def _copy_tokenizer(source: Path, folder: Path, config: transformers.PretrainedConfig) -> str:
    """Copy the source's tokenizer (and generation config, and its special token ids into `config`)
    when its vocabulary fits the target's embedding; returns a line saying what was done."""
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError) as e:
        return f"no tokenizer written: the source's could not be read ({e})"
    if len(tokenizer) > config.vocab_size:
        return (f"no tokenizer written: the source's has {len(tokenizer)} tokens, more than the target's "
                f"{config.vocab_size} rows; transformers loads the folder, loaders that need a tokenizer refuse it")
    for name in TOKENIZER_FILES + ("generation_config.json",):
        if (source / name).is_file():
            shutil.copy2(source / name, folder / name)
    src_config = json.loads((source / "config.json").read_text())
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        if key in src_config:
            setattr(config, key, src_config[key])
    return f"tokenizer of {len(tokenizer)} tokens copied from {source}"


def source_folder(like: str) -> Path:
    """The safetensors folder of `--like`: a known model name or GGUF (converted once, in the cache)
    or a Hugging Face folder."""
    from lowbit.models import resolve_model
    from lowbit.models.convert import ensure_converted

    src = resolve_model(like)
    if src.kind in ("known", "gguf"):
        return ensure_converted(src.path, src.sha256)
    if src.kind == "hf_folder":
        return src.path
    raise ValueError(f"--like {like!r} is a hub id; pass a known model name, a .gguf or a local folder")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--like", required=True, help="source model: known name, .gguf or HF folder")
    p.add_argument("--shape", required=True, choices=sorted(SHAPES))
    p.add_argument("-o", "--out", required=True, type=Path)
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--shard-gb", type=float, default=2.0)
    p.add_argument("--layers", type=int, default=None, help="decoder blocks (default: the shape's own)")
    args = p.parse_args(argv)
    out = args.out.expanduser()
    if out.exists():
        p.error(f"output {out} already exists; pass a new path (or remove it first)")
    if args.shard_gb <= 0:
        p.error(f"--shard-gb must be positive, got {args.shard_gb}")
    if args.layers is not None and args.layers < 1:
        p.error(f"--layers must be at least 1, got {args.layers}")
    shape = args.shape if args.layers is None else with_layers(args.shape, args.layers)
    start = time.perf_counter()
    make_shaped_model(source_folder(args.like), shape, out, dtype=getattr(torch, args.dtype),
                      seed=args.seed, shard_bytes=int(args.shard_gb * 1e9))
    print(f"{out}: {args.shape} shaped like {args.like}, {args.dtype}, seed {args.seed}, "
          f"in {time.perf_counter() - start:.0f} s. Its weights are random draws matched to statistics: "
          "its perplexity means nothing, only its memory and time do.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
