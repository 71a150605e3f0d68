"""llama.cpp's side of `lowbit bench speed`: GGUF files through llama-bench, each run in a process of
its own, and the bytes a decode step of a GGUF model reads."""

from __future__ import annotations

import json
import resource
import subprocess
import time
from pathlib import Path
from typing import Any


def llamacpp_job(spec: dict[str, Any], queue) -> None:
    """llama-bench in a process of its own, so RUSAGE_CHILDREN is llama-bench's peak alone."""
    cmd = [spec["bench_bin"], "-m", spec["gguf"], "-p", str(spec["prompt_tokens"]), "-n", str(spec["new_tokens"]),
           "-t", str(spec["threads"]), "-r", "1", "-o", "json"]
    t0 = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    wall = time.perf_counter() - t0
    if done.returncode != 0:
        queue.put({"error": f"llama-bench exit {done.returncode}: {done.stderr.strip()[-400:]}"})
        return
    tests = json.loads(done.stdout)
    pp = next(t for t in tests if t["n_prompt"] > 0)
    tg = next(t for t in tests if t["n_gen"] > 0)
    queue.put({"prefill_tok_s": pp["avg_ts"], "ttft_s": spec["prompt_tokens"] / pp["avg_ts"],
               "decode_tok_s": tg["avg_ts"], "wall_s": wall, "bytes_per_token": spec["bytes_per_token"],
               "peak_rss": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024,
               "build": f"{pp.get('build_commit', '?')}", "model_type": pp.get("model_type", "")})


def gguf_bytes_per_token(path: Path) -> int:
    """Bytes of a GGUF model's tensors less the token embedding table when the output head is a
    tensor of its own (a decode step reads one embedding row)."""
    from gguf import GGUFReader

    reader = GGUFReader(str(path))
    sizes = {t.name: int(t.n_bytes) for t in reader.tensors}
    total = sum(sizes.values())
    if "output.weight" in sizes and "token_embd.weight" in sizes:
        total -= sizes["token_embd.weight"]
    return total


def gguf_types(path: Path) -> str:
    """The block types of a GGUF file's quantized tensors, most common first: "Q4_Kx169 Q6_Kx29"."""
    from collections import Counter

    from gguf import GGMLQuantizationType, GGUFReader

    dense = {GGMLQuantizationType.F32, GGMLQuantizationType.F16, GGMLQuantizationType.BF16}
    counts = Counter(t.tensor_type.name for t in GGUFReader(str(path)).tensors if t.tensor_type not in dense)
    return " ".join(f"{k}x{v}" for k, v in counts.most_common())


def gguf_runtimes(ggufs: list[Path], common: dict[str, Any]) -> list[tuple[str, Any, dict[str, Any]]]:
    """GGUF files given in place of checkpoints: each through llama-bench, in the same rounds."""
    if not ggufs:
        return []
    from lowbit.peers.llamacpp import ensure_llamacpp

    tools = ensure_llamacpp(cache=common["cache"])
    return [(f"llama.cpp {g.name} ({gguf_types(g)})", llamacpp_job,
             {**common, "bench_bin": str(tools.bench_bin), "gguf": str(g), "bytes_per_token": gguf_bytes_per_token(g)})
            for g in ggufs]
