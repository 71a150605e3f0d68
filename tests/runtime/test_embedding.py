"""The packed runtime's memory-mapped input embedding (runtime/embedding.py)."""

import pytest
import torch
from tiny_models import build_tiny, records_of

from lowbit.bench.speed import bytes_per_token
from lowbit.checkpoint import DENSE_FILE, save_checkpoint
from lowbit.loading import load_checkpoint
from lowbit.runtime.attention import use_fast_attention
from lowbit.runtime.embedding import MappedEmbedding
from lowbit.runtime.generate import generate
from lowbit.runtime.packed import pack_model


def _saved(tmp_path, tie):
    from tiny_models import quantize_all

    model = build_tiny("llama", tie=tie)
    quantize_all(model, bits=4, group_size=16)
    return save_checkpoint(records_of(model), model, None, tmp_path / "ck", {})


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_an_untied_embedding_is_mapped_and_changes_no_logit(tmp_path, dtype):
    ck = _saved(tmp_path, tie=False)
    direct = load_checkpoint(ck, dtype=dtype, runtime="packed").model
    via = pack_model(load_checkpoint(ck, dtype=dtype).model)  # the table read whole and converted
    use_fast_attention(via)  # as runtime="packed" does: the same attention on both sides
    emb = direct.get_input_embeddings()
    assert isinstance(emb, MappedEmbedding) and emb.table.dtype == torch.float32  # as stored
    assert not any(t is emb.table for t in direct.state_dict().values())
    assert not any(p.data_ptr() == emb.table.data_ptr() for p in direct.parameters())
    ids = torch.randint(0, 256, (1, 20), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        assert torch.equal(emb(ids), via.get_input_embeddings()(ids))
        assert torch.equal(direct(ids).logits, via(ids).logits)
    prompt = ids[0, :9]
    assert (generate(direct, prompt, 8, static=True).tokens == generate(via, prompt, 8, static=True).tokens)


def test_the_mapped_table_is_the_file_and_writes_do_not_reach_it(tmp_path):
    ck = _saved(tmp_path, tie=False)
    before = (ck / DENSE_FILE).read_bytes()
    emb = load_checkpoint(ck, runtime="packed").model.get_input_embeddings()
    assert torch.equal(emb.table, load_checkpoint(ck).model.get_input_embeddings().weight)
    emb.table[0].fill_(1.0)  # copy-on-write: the process's own page
    assert (ck / DENSE_FILE).read_bytes() == before


def test_a_tied_embedding_is_read_whole(tmp_path):
    ck = _saved(tmp_path, tie=True)
    model = load_checkpoint(ck, runtime="packed").model
    assert type(model.get_input_embeddings()) is torch.nn.Embedding


def test_bytes_per_token_counts_one_row_of_a_mapped_table(tmp_path):
    ck = _saved(tmp_path, tie=False)
    direct = load_checkpoint(ck, dtype=torch.bfloat16, runtime="packed").model
    via = pack_model(load_checkpoint(ck, dtype=torch.bfloat16).model)
    row = direct.config.hidden_size
    # the same weights; the mapped row is read in its stored float32, the loaded one in bfloat16
    assert bytes_per_token(direct) - bytes_per_token(via) == 4 * row - 2 * row


def test_a_table_that_is_not_a_float_matrix_is_refused():
    with pytest.raises(ValueError, match="2-D float"):
        MappedEmbedding(torch.zeros(4, dtype=torch.int64), torch.float32)
