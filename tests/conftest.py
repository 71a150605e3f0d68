"""Shared fixtures: tiny random models of each supported architecture, the shared data folder."""

from pathlib import Path

import pytest
from tiny_models import build_tiny

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture(params=["llama", "qwen2", "gemma3"])
def arch(request):
    return request.param


@pytest.fixture
def tiny(arch):
    return build_tiny(arch)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"{SHARED_DATA} not present")
    return SHARED_DATA
