"""Data: how a global batch is cut (``batch_layout``), precomputed text-embedding shards, prompt sampling, T5 encoding, teacher ODE pairs
(``ode_pairs``), a tiny test pipeline."""

from .batch_layout import BatchLayout
from .encode import encode_prompts, load_t5
from .text_embeddings import (
    EmbeddingShardWriter,
    PromptSampler,
    SyntheticTextEmbeddings,
    TextEmbeddingShards,
    TextEmbeddingSource,
    open_text_source,
    write_embedding_shards,
)
from .tiny_pipeline import build_tiny_pipeline

__all__ = [
    "BatchLayout",
    "EmbeddingShardWriter",
    "PromptSampler",
    "SyntheticTextEmbeddings",
    "TextEmbeddingShards",
    "TextEmbeddingSource",
    "build_tiny_pipeline",
    "encode_prompts",
    "load_t5",
    "open_text_source",
    "write_embedding_shards",
]
