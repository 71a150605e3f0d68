"""Tasks that read through a (compressed) KV cache: needle-in-a-haystack and LAMBADA.

Both prefill a prompt through the cache (chunked; an evicting cache is compressed once the
prompt is in) and then decode from it, so the answer depends on what the cache kept.

Needle (passkey retrieval, Mohtashami & Jaggi 2023): a random 5-digit pass key is stated once at
a given depth of filler text cut from an evaluation corpus; the prompt ends by asking for it, and
the greedy answer scores 1 if its first number is exactly the key.

LAMBADA: the passage without its last word is the prompt; the word scores 1 if every one of its
tokens is the greedy choice (as lm-evaluation-harness scores it), reading each later token
through the cache too.
"""

from __future__ import annotations

import random
import re
from dataclasses import asdict, dataclass, field

import torch
from tqdm.auto import tqdm
from transformers.cache_utils import DynamicCache

from lowbit.errors import ConfigError
from lowbit.runtime.generate import cache_argument, generate, prefill
from lowbit.runtime.kvcache import CacheSpec, cache_nbytes, kv_cache_for, observing

INTRO = ("There is an important piece of information hidden inside a lot of irrelevant text. "
         "Find it and memorize it. I will quiz you about it.\n\n")
NEEDLE = " The pass key is {key}. Remember it. {key} is the pass key. "
QUESTION = "\n\nWhat is the pass key? The pass key is"


@dataclass(frozen=True)
class NeedleCase:
    length: int       # prompt tokens
    depth: float      # where the needle sits, 0 = start of the filler, 1 = end
    key: str
    ids: torch.Tensor  # [length]


def needle_cases(tokenizer, filler_ids: torch.Tensor, lengths: list[int], depths: list[float],
                 per_cell: int = 1, seed: int = 0) -> list[NeedleCase]:
    """Prompts of exactly `length` tokens with the needle at each depth, filler cut from
    filler_ids [N] at seeded random offsets."""
    rng = random.Random(seed)
    enc = lambda s: list(tokenizer(s, add_special_tokens=False)["input_ids"])
    bos = [tokenizer.bos_token_id] if getattr(tokenizer, "add_bos_token", False) and tokenizer.bos_token_id is not None else []
    intro, question = bos + enc(INTRO), enc(QUESTION)
    cases = []
    for length in lengths:
        for depth in depths:
            if not 0 <= depth <= 1:
                raise ConfigError(f"needle depth {depth}: use a fraction in [0, 1]")
            for _ in range(per_cell):
                key = str(rng.randrange(10000, 100000))
                needle = enc(NEEDLE.format(key=key))
                n_fill = length - len(intro) - len(needle) - len(question)
                if n_fill < 1:
                    raise ConfigError(f"needle length {length} is too short for the prompt's fixed text")
                if filler_ids.numel() < n_fill:
                    raise ConfigError(f"the filler corpus has {filler_ids.numel()} tokens, fewer than the "
                                      f"{n_fill} a {length}-token prompt needs")
                start = rng.randrange(0, filler_ids.numel() - n_fill + 1)
                fill = filler_ids[start:start + n_fill].tolist()
                at = round(depth * n_fill)
                ids = intro + fill[:at] + needle + fill[at:] + question
                cases.append(NeedleCase(length, depth, key, torch.tensor(ids)))
    return cases


@dataclass
class TaskResult:
    task: str
    kv: str | None                            # the cache's label (None: the full cache)
    n: int
    accuracy: float
    kv_bytes: int | None = None               # what the cache held after the last prompt
    cells: dict = field(default_factory=dict)  # needle: "length/depth" -> accuracy

    def to_dict(self) -> dict:
        return asdict(self)


def needle_eval(model, tokenizer, cases: list[NeedleCase], kv: CacheSpec | None = None, chunk: int = 512,
                progress: bool = True) -> TaskResult:
    hits: dict[str, list[int]] = {}
    kv_bytes = None
    label = kv.label if kv else None
    for case in tqdm(cases, desc=f"needle {label or 'full'}", disable=not progress):
        cache = kv_cache_for(model.config, kv, mode="prompt")
        out = generate(model, case.ids, max_new_tokens=8, cache=cache, prefill_chunk=chunk)
        text = tokenizer.decode(out.tokens)
        m = re.search(r"\d+", text)
        hits.setdefault(f"{case.length}/{case.depth:g}", []).append(int(bool(m) and m.group(0) == case.key))
        if cache is not None:
            kv_bytes = cache_nbytes(cache)
    allhits = [h for v in hits.values() for h in v]
    return TaskResult("needle", label, len(allhits), sum(allhits) / max(1, len(allhits)), kv_bytes,
                      {k: sum(v) / len(v) for k, v in hits.items()})


def lambada_eval(model, tokenizer, passages: list[str], kv: CacheSpec | None = None, chunk: int = 512,
                 progress: bool = True) -> TaskResult:
    device = next(model.parameters()).device
    correct = 0
    kv_bytes = None
    label = kv.label if kv else None
    for text in tqdm(passages, desc=f"lambada {label or 'full'}", disable=not progress):
        context, _, word = text.rpartition(" ")
        ctx = torch.tensor(tokenizer(context)["input_ids"])
        target = list(tokenizer(" " + word, add_special_tokens=False)["input_ids"])
        cache = kv_cache_for(model.config, kv, mode="prompt")
        if cache is None:
            cache = DynamicCache()
        logits = prefill(model, ctx, cache, chunk)
        ok = True
        with torch.inference_mode(), observing(model, cache):
            for i, tok in enumerate(target):
                if int(logits.argmax()) != tok:
                    ok = False
                    break
                if i + 1 < len(target):
                    out = model(input_ids=torch.tensor([[tok]], device=device), **cache_argument(model, cache),
                                use_cache=True)
                    logits = out.logits[0, -1].float()
        correct += ok
        kv_bytes = cache_nbytes(cache) if kv else None
    return TaskResult("lambada", label, len(passages), correct / max(1, len(passages)), kv_bytes)
