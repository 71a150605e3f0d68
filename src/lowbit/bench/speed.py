"""`lowbit bench speed CKPT [CKPT ...]`: how fast lowbit checkpoints run, side by side, in one run.

Runtimes measured in rounds (each round runs every runtime once, in the same order, so a busy
host slows all of them alike; the table gives medians over rounds):

- each checkpoint, loaded packed (runtime/packed.py: the native kernels) in bfloat16;
- "bf16": the checkpoint's source model, unquantized, in bfloat16 through the same generation code;
- "llama.cpp": llama.cpp's own `llama-bench` (built from the llama-cpp-python source release on
  PyPI, see lowbit.peers.llamacpp) on the source model's original GGUF file, when it has one;
- every GGUF file given in place of a checkpoint (lowbit's, `lowbit quantize --format gguf:MIX`, and
  llama-quantize's of the same mix, say), through llama-bench in the same rounds: files of the same
  block types should decode at the same speed whoever rounded them.

Each lowbit runtime runs in a fresh child process (so its load time and peak RSS are its own):
load, prefill a prompt of --prompt-tokens in one forward (time to first token), then greedy
decode of --new-tokens from there. llama-bench runs its pp<prompt> and tg<new> tests once per
round with the same thread count. Every round also measures the read bandwidth this process
sees (summing a 1 GiB tensor with the same threads), and so does every run, just before it
starts (the host's rate swings within a round); decode speed is also given as bytes/s: the bytes
a token reads (`bytes_per_token`) times tokens/s, and as a fraction of the best round's
bandwidth and of the rate measured beside the run.

A second table times one decode matrix-vector product per weight format against torch's own
int4 kernel and a bfloat16 F.linear on the model's largest projection shape.
"""

from __future__ import annotations

import importlib.util
import json
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lowbit.bench.common import machine, run_in_child, write_section
from lowbit.bench.speed_llamacpp import (
    gguf_bytes_per_token,
    gguf_runtimes,
    llamacpp_job,
)
from lowbit.errors import ConfigError
from lowbit.memory import peak_rss_bytes


@dataclass(frozen=True)
class SpeedBenchOptions:
    """What one `lowbit bench speed` run times and where it writes (the CLI builds it from its flags)."""

    checkpoints: tuple[str, ...]        # lowbit checkpoint folders of one source model; CKPT@int8: W8A8
    prompt_tokens: int = 512            # prompt length for prefill / time to first token
    new_tokens: int = 64                # tokens decoded greedily after the prompt
    repeats: int = 3                    # rounds; the table gives medians
    threads: int | None = None          # threads for every runtime (None: all cores)
    no_llamacpp: bool = False
    no_bf16: bool = False
    no_kernels: bool = False
    work_dir: str = "benchmarks/results"
    output: str = "BENCHMARKS.md"
    section: str = "speed"
    cache: str | None = None            # model cache directory


# ---------------------------------------------------------------------------------------------
# measurements (each in a child process)


def bytes_per_token(model) -> int:
    """Bytes one decode step reads from the weights: every parameter and buffer once (and what a
    module holds outside them), except the input embedding table, of which a step reads one row
    (unless the output head shares it; a memory-mapped table, runtime/embedding.py, is not held
    as a parameter and counts one row too)."""
    from lowbit.runtime.embedding import MappedEmbedding

    emb_module = model.get_input_embeddings()
    emb = emb_module.weight
    total = emb.shape[1] * emb.element_size() if isinstance(emb_module, MappedEmbedding) else 0
    head = model.get_output_embeddings()
    head_weight = getattr(head, "weight", None)  # a quantized head has packed codes instead
    tied = head_weight is not None and head_weight.data_ptr() == emb.data_ptr()
    seen = set()
    for t in list(model.parameters()) + list(model.buffers()):
        if t.data_ptr() in seen:
            continue
        seen.add(t.data_ptr())
        if t.data_ptr() == emb.data_ptr() and not tied:
            total += emb.shape[1] * emb.element_size()
            continue
        total += t.numel() * t.element_size()
    # weights a module keeps outside its parameters and buffers (W8A8Linear's oneDNN-packed int8)
    total += sum(m.unregistered_nbytes() for m in model.modules() if hasattr(m, "unregistered_nbytes"))
    return total


def _prompt_ids(vocab: int, n: int):
    import torch

    lo = 100 if vocab > 1000 else 0  # skip the special tokens of real vocabularies
    return torch.randint(lo, min(vocab, 30000), (n,), generator=torch.Generator().manual_seed(0))


def _lowbit_job(spec: dict[str, Any], queue) -> None:
    try:
        queue.put(_lowbit_run(spec))
    except Exception as e:  # noqa: BLE001 - reported, so the parent does not hang
        queue.put({"error": f"{type(e).__name__}: {e}"})


def _lowbit_run(spec: dict[str, Any]) -> dict[str, Any]:
    import torch

    from lowbit.runtime.generate import generate

    torch.set_num_threads(spec["threads"])
    t0 = time.perf_counter()
    if spec["kind"] == "checkpoint":
        from lowbit.loading import load_checkpoint

        model = load_checkpoint(spec["path"], dtype=torch.bfloat16, runtime="packed",
                                int8_activations=spec.get("int8", False)).model
    else:
        from lowbit.models import load_model
        from lowbit.runtime.attention import use_fast_attention

        model = load_model(spec["path"], dtype=torch.bfloat16, cache=spec.get("cache"), progress=False).model
        use_fast_attention(model)  # lowbit's bf16 path: the same decode attention as the checkpoints
    model.eval()
    load_s = time.perf_counter() - t0
    generate(model, _prompt_ids(model.config.vocab_size, 16), 1)  # the first token of a short prompt
    start_to_first = time.time() - spec["t_spawn"]
    ids = _prompt_ids(model.config.vocab_size, spec["prompt_tokens"])
    out = generate(model, ids, spec["new_tokens"], prefill_chunk=spec["prompt_tokens"], static=True)
    return {"load_s": load_s, "start_to_first_token_s": start_to_first, "ttft_s": out.prefill_seconds,
            "prefill_tok_s": spec["prompt_tokens"] / out.prefill_seconds,
            "decode_tok_s": (len(out.tokens) - 1) / out.decode_seconds,
            "bytes_per_token": bytes_per_token(model), "peak_rss": peak_rss_bytes()}


def _in_child(target, spec: dict[str, Any]) -> dict[str, Any]:
    """A measurement in a fresh process, timed from its spawn; a crash in native code is an error row."""
    return run_in_child(target, {**spec, "t_spawn": time.time()},
                        lambda code: {"error": f"the measuring process exited with code {code} before reporting"})


def read_bandwidth(threads: int, gib: float = 1.0, repeats: int = 5) -> float:
    """Bytes/s of summing a float32 tensor of `gib` GiB, best of `repeats` (a read-only stream)."""
    import torch

    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        a = torch.ones(int(gib * 2**30) // 4)
        best = float("inf")
        for _ in range(repeats):
            t0 = time.perf_counter()
            a.sum()
            best = min(best, time.perf_counter() - t0)
        return a.numel() * 4 / best
    finally:
        torch.set_num_threads(old)


# ---------------------------------------------------------------------------------------------
# matrix-vector kernels


def kernel_table(shape: tuple[int, int], threads: int, repeats: int = 200) -> list[dict[str, Any]]:
    """One decode product y = x W^T with W [out, in] = shape, per format: bfloat16 F.linear,
    torch's int4 weight-only kernel (g128), lowbit's packed kernel at 8/4/3/2 bits g128. Each
    format cycles through enough copies of its weight to exceed the caches, so the rates are
    what DRAM gives (a single weight of a 1.5B model fits in L3 and would flatter every kernel)."""
    import torch
    import torch.nn.functional as F

    from lowbit import kernels
    from lowbit.qtensor import QuantFormat, QuantizedWeight
    from lowbit.runtime.packed import PackedLinear

    torch.set_num_threads(threads)
    out_f, in_f = shape
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, in_f, generator=g).bfloat16()

    def cycled(make, fn):
        """Copies enough to exceed any last-level cache (512 MB; at most 256 copies), called in
        turn: DRAM speed."""
        first = make()
        per = first[1]
        items = [first] + [make() for _ in range(min(256, max(1, -(-(512 << 20) // per))) - 1)]
        for it in items[:2]:
            fn(it[0])
        t0 = time.perf_counter()
        for _ in range(max(1, repeats // len(items))):
            for it in items:
                fn(it[0])
        return (time.perf_counter() - t0) / (max(1, repeats // len(items)) * len(items)), per

    rows = []
    def dense():
        w = torch.randn(out_f, in_f, generator=g).bfloat16()
        return w, w.numel() * 2

    seconds, nbytes = cycled(dense, lambda w: F.linear(x, w))
    rows.append({"format": "bf16 F.linear", "bytes": nbytes, "seconds": seconds})
    if in_f % 128:
        return rows  # the quantized rows below use groups of 128
    def int4pack():
        codes = torch.randint(0, 16, (out_f, in_f), generator=g, dtype=torch.int32)
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 1)
        sz = torch.stack([torch.rand(in_f // 128, out_f, generator=g), torch.zeros(in_f // 128, out_f)], -1).bfloat16()
        return (packed, sz), packed.numel() + sz.numel() * 2

    seconds, nbytes = cycled(int4pack, lambda t: torch.ops.aten._weight_int4pack_mm_for_cpu(x, t[0], 128, t[1]))
    rows.append({"format": "torch int4pack w4g128 (bf16 scale+zero)", "bytes": nbytes, "seconds": seconds})
    if kernels.available("qgemv"):
        for bits in (8, 4, 3, 2):
            hi = 1 << bits

            def packed_linear(bits=bits, hi=hi):
                qw = QuantizedWeight((torch.rand(out_f, in_f, generator=g) * hi).to(torch.uint8),
                                     (torch.rand(out_f, in_f // 128, generator=g) * 0.01).half(),
                                     (torch.rand(out_f, in_f // 128, generator=g) * hi).to(torch.uint8),
                                     QuantFormat(bits, 128, False))
                m = PackedLinear(qw)
                return m, m.nbytes()

            seconds, nbytes = cycled(packed_linear, lambda m: m(x))
            rows.append({"format": f"lowbit packed w{bits}g128", "bytes": nbytes, "seconds": seconds})
    return rows


# ---------------------------------------------------------------------------------------------
# the run


def _checkpoint_source(path: Path) -> dict[str, Any]:
    from lowbit.checkpoint import is_checkpoint, read_manifest

    if not is_checkpoint(path):
        raise ConfigError(f"{path} is not a lowbit checkpoint (no manifest.json); make one with `lowbit quantize`")
    m = read_manifest(path)
    return {"source": m["source"], "recipe": m.get("recipe", {}), "label": path.name}


def run_speed_bench(opts: SpeedBenchOptions) -> None:
    import os

    import torch

    from lowbit.models import resolve_model

    threads = opts.threads or os.cpu_count() or 1
    ggufs = [Path(c) for c in opts.checkpoints if c.endswith(".gguf")]
    named = [c for c in opts.checkpoints if not c.endswith(".gguf")]
    int8 = [c.endswith("@int8") for c in named]
    ckpts = [Path(c.removesuffix("@int8")) for c in named]
    infos = [_checkpoint_source(c) for c in ckpts]
    specs = {s["source"]["spec"] for s in infos}
    if len(specs) > 1:
        raise ConfigError(f"the checkpoints come from different models ({', '.join(sorted(specs))}); "
                          "bench one source model per run")
    for g in ggufs:
        if not g.is_file():
            raise ConfigError(f"{g}: no such GGUF file")
    # native kernels built (or found) here, once, so that no timed child process builds one
    from lowbit import kernels

    for name in kernels.NAMES:
        kernels.available(name)
    common = {"prompt_tokens": opts.prompt_tokens, "new_tokens": opts.new_tokens, "threads": threads,
              "cache": opts.cache}
    runtimes: list[tuple[str, Any, dict[str, Any]]] = [
        (info["label"] + (" (int8 activations)" if a8 else ""), _lowbit_job,
         {**common, "kind": "checkpoint", "path": str(c), "int8": a8}) for c, info, a8 in zip(ckpts, infos, int8)]
    skipped = []
    runtimes += gguf_runtimes(ggufs, common)
    source = infos[0]["source"] if infos else {"spec": f"{len(ggufs)} GGUF files through llama-bench"}
    if not opts.no_bf16 and infos:
        runtimes.append(("bf16 (unquantized)", _lowbit_job, {**common, "kind": "model", "path": source["spec"]}))
    if not opts.no_llamacpp and infos:
        resolved = resolve_model(source["spec"], cache=common["cache"], progress=False)
        if resolved.kind in ("known", "gguf") and resolved.path is not None and str(resolved.path).endswith(".gguf"):
            from lowbit.peers.llamacpp import ensure_llamacpp

            tools = ensure_llamacpp(cache=common["cache"])
            runtimes.append((f"llama.cpp {Path(resolved.path).name}", llamacpp_job,
                             {**common, "bench_bin": str(tools.bench_bin), "gguf": str(resolved.path),
                              "bytes_per_token": gguf_bytes_per_token(Path(resolved.path))}))
        else:
            skipped.append(f"llama.cpp: the source model {source['spec']} has no GGUF file")
    results: dict[str, list[dict[str, Any]]] = {name: [] for name, _, _ in runtimes}
    bandwidth = []
    for r in range(opts.repeats):
        bandwidth.append(read_bandwidth(threads))
        for name, job, spec in runtimes:
            print(f"round {r + 1}/{opts.repeats}: {name}", flush=True)
            beside = read_bandwidth(threads, gib=0.5, repeats=3)  # the host's rate just before this run
            res = _in_child(job, spec)
            if "error" in res:
                raise ConfigError(f"{name}: {res['error']}")
            res["bandwidth_beside"] = beside
            results[name].append(res)
    kernel_rows = []
    if not opts.no_kernels and ckpts:
        torch.set_num_threads(threads)
        shape = _largest_projection(ckpts[0])
        kernel_rows = kernel_table(shape, threads)
    record = {"machine": machine(), "threads": threads, "source": source["spec"], "prompt_tokens": opts.prompt_tokens,
              "new_tokens": opts.new_tokens, "repeats": opts.repeats, "bandwidth": bandwidth,
              "runtimes": results, "kernels": kernel_rows, "kernel_shape": list(shape) if kernel_rows else None,
              "skipped": skipped, "command": command_line(opts), "time": time.strftime("%Y-%m-%d %H:%M"),
              "hqq_installed": importlib.util.find_spec("hqq") is not None}
    work = Path(opts.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    with open(work / "speed.jsonl", "a") as f:
        f.write(json.dumps(record) + "\n")
    section = render(record)
    write_section(Path(opts.output), section, opts.section)
    print(section)


def _largest_projection(ckpt: Path) -> tuple[int, int]:
    from lowbit.checkpoint import read_manifest

    shapes = [tuple(m["shape"]) for m in read_manifest(ckpt)["layers"].values()]
    return max(shapes, key=lambda s: s[0] * s[1])


def command_line(opts: SpeedBenchOptions) -> str:
    """The command that reproduces the run."""
    parts = ["lowbit bench speed", *opts.checkpoints, f"--prompt-tokens {opts.prompt_tokens}",
             f"--new-tokens {opts.new_tokens}", f"--repeats {opts.repeats}"]
    if opts.threads:
        parts.append(f"--threads {opts.threads}")
    parts += [flag for flag, on in (("--no-llamacpp", opts.no_llamacpp), ("--no-bf16", opts.no_bf16)) if on]
    return " ".join(parts)


def _med(rows: list[dict[str, Any]], key: str) -> float:
    return statistics.median(r[key] for r in rows)


def _beside(rows: list[dict[str, Any]], bpt: float) -> str:
    """Median over rounds of decode bytes/s over the read rate measured just before that run."""
    if not all("bandwidth_beside" in r for r in rows):
        return "-"  # a record from before it was measured
    return f"{statistics.median(r['decode_tok_s'] * bpt / r['bandwidth_beside'] for r in rows):.0%}"


def render(rec: dict[str, Any]) -> str:
    bw = max(rec["bandwidth"])  # the best read rate seen: other tenants of the host only ever lower it
    runtimes = rec["runtimes"]
    base = next((n for n in runtimes if n.startswith("bf16")), None)
    base_decode = _med(runtimes[base], "decode_tok_s") if base else None
    base_prefill = _med(runtimes[base], "prefill_tok_s") if base else None
    lines = [f"## Speed: {rec['source']}", "",
             f"Command: `{rec['command']}`", "",
             f"Machine: {rec['machine']}; {rec['threads']} threads for every runtime. Measured {rec['time']}. "
             f"Rounds: {rec['repeats']} (each runs every runtime once, in table order; medians shown). "
             f"Prompt: {rec['prompt_tokens']} tokens in one forward (time to first token); then "
             f"{rec['new_tokens']} greedy tokens (llama.cpp: llama-bench pp{rec['prompt_tokens']} and "
             f"tg{rec['new_tokens']}). Read bandwidth measured in the same run (summing 1 GiB, best of 5 per "
             f"round, best round): {bw / 1e9:.1f} GB/s (rounds: "
             f"{', '.join(f'{b / 1e9:.1f}' for b in rec['bandwidth'])}); \"of bandwidth\" divides by that best "
             "round, \"beside\" by the rate measured just before each run (summing 0.5 GiB, best of 3; the "
             "median over rounds), which follows the host's swings. Bytes/token: the weights one decode "
             "step reads (the embedding table counts one row unless the head shares it). lowbit runtimes "
             "run in bfloat16; checkpoints through the packed kernels. Load: files on disk to a model in "
             "memory (checkpoints: hashes verified); start to first token: from starting a fresh process "
             "(interpreter, imports, load) to the first token of a 16-token prompt"
             + ({True: " (the hqq package was installed, which transformers imports at every start: about a "
                       "second more)", False: " (without the hqq package, lowbit[peers])"}.get(rec.get("hqq_installed"), ""))
             + "; peak RSS of that process.", "",
             ("| runtime | bytes/token | load (s) | start to first token (s) | time to first token, "
             f"{rec['prompt_tokens']}-token prompt (s) | prefill tok/s | decode tok/s | "
             "decode vs bf16 | prefill vs bf16 | decode GB/s | of bandwidth | beside | peak RSS (GB) |"),
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, rows in runtimes.items():
        dec, pre = _med(rows, "decode_tok_s"), _med(rows, "prefill_tok_s")
        bpt = rows[0]["bytes_per_token"]
        load = f"{_med(rows, 'load_s'):.1f}" if "load_s" in rows[0] else "-"
        first = f"{_med(rows, 'start_to_first_token_s'):.1f}" if "start_to_first_token_s" in rows[0] else "-"
        ratios = (f"{dec / base_decode:.2f}x | {pre / base_prefill:.2f}x" if base else "- | -")
        lines.append(
            f"| {name} | {bpt / 1e6:.0f} MB | {load} | {first} | {_med(rows, 'ttft_s'):.2f} | {pre:.1f} | {dec:.2f} | "
            f"{ratios} | {dec * bpt / 1e9:.1f} | {dec * bpt / bw:.0%} | {_beside(rows, bpt)} | "
            f"{max(r['peak_rss'] for r in rows) / 1e9:.2f} |")
    lines += ["", "Decode tokens/s round by round (a median can hide a disturbed round): " + "; ".join(
        f"{name} " + " / ".join(f"{r['decode_tok_s']:.1f}" for r in rows) for name, rows in runtimes.items()) + "."]
    for s in rec.get("skipped", []):
        lines += ["", f"- skipped: {s}"]
    if rec.get("kernels"):
        out_f, in_f = rec["kernel_shape"]
        ref = rec["kernels"][0]["seconds"]
        lines += ["", (f"Decode matrix-vector product, one bfloat16 activation row times a {out_f}x{in_f} weight "
                  f"(the model's largest projection), {rec['threads']} threads; each format cycles through copies "
                  "of its weight totalling over 512 MB, so the weights come from DRAM as in a model:"), "",
                  "| format | weight bytes | time (us) | vs bf16 | GB/s | of bandwidth |", "|---|---|---|---|---|---|"]
        for k in rec["kernels"]:
            lines.append(f"| {k['format']} | {k['bytes'] / 1e6:.1f} MB | {k['seconds'] * 1e6:.0f} | "
                         f"{ref / k['seconds']:.2f}x | {k['bytes'] / k['seconds'] / 1e9:.1f} | "
                         f"{k['bytes'] / k['seconds'] / bw:.0%} |")
    return "\n".join(lines) + "\n"
