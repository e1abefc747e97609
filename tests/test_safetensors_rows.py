"""Row reads of safetensors files (``data/safetensors_rows.py``) and the two readers built on them:
rows equal the library's whole-tensor reads for every stored dtype (bf16 included), in the order
asked; a row out of range, a truncated file and a file changed under its reader fail naming the file; and reading the rows of every
shard of a text-embedding set keeps none of it (a long run holds a batch, not the shards it
touched). ODE pairs: tests/test_ode_pairs.py."""

from __future__ import annotations

import tracemalloc

import pytest
import torch
from safetensors.torch import load_file, save_file

from adm_megatron.data.safetensors_rows import SafetensorsRows
from adm_megatron.memory.measure import peak_during


def test_rows_equal_the_librarys_reads_for_every_dtype(tmp_path):
    g = torch.Generator().manual_seed(0)
    tensors = {
        "bf16": torch.randn(5, 3, 7, generator=g).to(torch.bfloat16),
        "f32": torch.randn(5, 2, generator=g),
        "f64": torch.randn(5, generator=g, dtype=torch.float64),
        "i64": torch.arange(5) * 7,
        "f16": torch.randn(5, 4, generator=g).half(),
    }
    path = str(tmp_path / "t.safetensors")
    save_file(tensors, path, metadata={"note": "a header entry that is not a tensor"})
    stored, rows = load_file(path), SafetensorsRows(path)
    for key, tensor in stored.items():
        got = rows.rows(key, [4, 0, 2, 0])
        assert got.dtype == tensor.dtype and torch.equal(got, tensor[[4, 0, 2, 0]]), key
    assert rows.shape("bf16") == [5, 3, 7]
    with pytest.raises(IndexError, match=r"t.safetensors: row 5 of 'f32', which has 5"):
        rows.rows("f32", [5])
    with open(path, "rb") as f:
        data = f.read()
    with open(path, "wb") as f:
        f.write(data[:-8])  # the file's last tensor loses its tail
    with pytest.raises(ValueError, match="t.safetensors: replaced or rewritten since it was opened"):
        for key in stored:  # cut under the open reader
            rows.rows(key, list(range(5)))
    with pytest.raises(ValueError, match="t.safetensors: truncated"):
        SafetensorsRows(path)  # cut before
    with open(path, "wb") as f:
        f.write(b"not a safetensors file")
    with pytest.raises(ValueError, match="t.safetensors: not a readable safetensors file"):
        SafetensorsRows(path)


def test_text_embeddings_keep_nothing_of_the_shards_they_read(tmp_path):
    from adm_megatron.data.text_embeddings import TextEmbeddingShards, write_embedding_shards

    g = torch.Generator().manual_seed(0)
    embeddings = torch.randn(24, 32, 64, generator=g).to(torch.bfloat16)  # 4 KiB a row, 32 KiB a shard
    out = write_embedding_shards(str(tmp_path / "emb"), [f"prompt {i}" for i in range(24)], embeddings,
                                 embeddings[0], shard_size=8)
    assert torch.equal(TextEmbeddingShards(out).get(torch.tensor([17, 3, 9])), embeddings[[17, 3, 9]])

    def every_shard_one_row_at_a_time(shards):
        for i in range(3):
            shards.get(torch.tensor([8 * i + 1]))

    shards = TextEmbeddingShards(out)  # none of its shards read yet
    tracemalloc.start()
    try:
        every_shard_one_row_at_a_time(shards)
        python = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    shards = TextEmbeddingShards(out)
    torch_peak = peak_during(lambda: every_shard_one_row_at_a_time(shards))
    assert max(torch_peak, python) < 3 * embeddings[0].nbytes  # a shard is 8 rows


@pytest.mark.parametrize("how", ["replaced", "rewritten"])
def test_text_embeddings_rewritten_under_a_reader_are_refused_not_read(how, tmp_path):
    """A prompt set re-encoded (--overwrite: a new directory renamed into place) or a shard rewritten
    in place while a run reads it: the run went on reading the new files through the old headers."""
    import os

    from adm_megatron.data.text_embeddings import TextEmbeddingShards, shard_name, write_embedding_shards

    path = str(tmp_path / "emb")
    write_embedding_shards(path, ["a", "b", "c"], torch.zeros(3, 4, 2), torch.zeros(4, 2), shard_size=2)
    source = TextEmbeddingShards(path)
    assert torch.equal(source.get(torch.tensor([2, 0])), torch.zeros(2, 4, 2))
    os.utime(os.path.join(path, shard_name(1)))  # a touch (scratch purges) changes nothing read
    assert torch.equal(source.get(torch.tensor([2])), torch.zeros(1, 4, 2))
    if how == "replaced":
        write_embedding_shards(path, ["a", "b", "c"], torch.ones(3, 4, 2), torch.zeros(4, 2), shard_size=2,
                               overwrite=True)
    else:
        save_file({"embeddings": torch.ones(1, 4, 2)}, os.path.join(path, shard_name(1)))
    with pytest.raises(ValueError) as err:
        source.get(torch.tensor([2]))
    assert str(err.value) == (f"{os.path.join(path, shard_name(1))}: replaced or rewritten since it was opened "
                              "(re-encoded or recollected under a running run?); a run's data must not change while "
                              "it reads them")
