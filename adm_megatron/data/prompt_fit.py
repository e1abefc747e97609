"""A run's prompt embeddings (``data.path``, ``data.source=shards``) against what its teacher takes:
checked by a run's start (``train/validate.py``) and by the memory plan (``memory/run_plan.py``)."""

from __future__ import annotations

from adm_megatron.config import Config, ConfigError


def check_prompt_embeddings(config: Config, family, arch) -> None:
    """``data.path``'s prompt embeddings (``data.source=shards``) against what the teacher takes: their
    length and width, and the pooled embedding's width (the memory plan checks the same)."""
    if config.data.source != "shards":
        return
    from adm_megatron.data import TextEmbeddingShards

    try:
        shards = TextEmbeddingShards(config.data.path)
    except (OSError, ValueError) as err:
        raise ConfigError(f"data.path={config.data.path!r}: {err}") from None
    text = family.conditioning(arch)
    # the pooled embedding first: one there but not here (or the other way) means another family's
    # encoders, which a length of their own only seems to explain
    if shards.pooled_dim != (text.pooled_width or 0):
        raise ConfigError(
            f"data.path={config.data.path!r}: pooled embeddings of width {shards.pooled_dim}, the teacher "
            f"takes {text.pooled_width or 'none'} (encode the prompts with the teacher's own pipeline: "
            "tools/precompute_text_embeddings.py)"
        )
    length = shards.seq_len if text.any_text_length else text.text_length
    if (shards.seq_len, shards.dim) != (length, text.text_width):
        remedy = (f"encode them again with --max-length {length}" if shards.dim == text.text_width else
                  "encode the prompts with the teacher's own pipeline")
        raise ConfigError(
            f"data.path={config.data.path!r}: embeddings are {shards.seq_len} x {shards.dim}, "
            f"the teacher takes {length} x {text.text_width} ({remedy}: tools/precompute_text_embeddings.py)"
        )
