"""Data: precomputed text-embedding shards, prompt sampling, T5 encoding, a tiny test pipeline."""

from .encode import encode_prompts, load_t5
from .text_embeddings import (
    EmbeddingShardWriter,
    PromptSampler,
    SyntheticTextEmbeddings,
    TextEmbeddingShards,
    TextEmbeddingSource,
    write_embedding_shards,
)
from .tiny_pipeline import build_tiny_pipeline

__all__ = [
    "EmbeddingShardWriter",
    "PromptSampler",
    "SyntheticTextEmbeddings",
    "TextEmbeddingShards",
    "TextEmbeddingSource",
    "build_tiny_pipeline",
    "encode_prompts",
    "load_t5",
    "write_embedding_shards",
]
