"""A tiny random but complete ``CogVideoXPipeline`` directory, built offline in about a second.

Every component is real diffusers / transformers code at toy size, so ``CogVideoXPipeline.
from_pretrained`` reloads the directory and runs end to end on a CPU:

* transformer: 2 layers, 4 heads of 8 (16 with ``rope=True``, the 5b-style variant with rotary
  embeddings), 4 latent channels, 8x8x3 latents (9 frames), 16 text tokens of width 32;
* VAE: ``AutoencoderKLCogVideoX`` with 3 blocks of 8 channels -- spatial factor 4 (8x8 latents
  <-> 32x32 pixels) and two time-compressing downsamplers (temporal factor 4: 3 <-> 9 frames);
* text encoder: a 2-layer T5 v1.1 encoder (gated GELU), ``d_model = 32 = text_embed_dim``;
* tokenizer: a fast T5 tokenizer over a small Unigram vocabulary (``<pad>`` 0, ``</s>`` 1,
  ``<unk>`` 2, a few words, every printable ASCII character with and without the ``▁`` word
  prefix), ``model_max_length = 16``; call the pipeline with ``max_sequence_length=16``;
* scheduler: ``CogVideoXDDIMScheduler`` with the CogVideoX-2b settings.

The transformer's weights are perturbed away from diffusers' initialisation (zero-initialised
projections would make every prompt give the same video).
"""

from __future__ import annotations

import os
import string

import torch

from adm_megatron.families.cogvideox_presets import COGVIDEOX_2B_SCHEDULER

MAX_TEXT_LENGTH = 16
TRANSFORMER = dict(
    num_attention_heads=4, attention_head_dim=8, in_channels=4, out_channels=4, time_embed_dim=2,
    text_embed_dim=32, num_layers=2, sample_width=8, sample_height=8, sample_frames=9,
    patch_size=2, temporal_compression_ratio=4, max_text_seq_length=MAX_TEXT_LENGTH,
)
ROPE_OVERRIDES = dict(attention_head_dim=16, use_rotary_positional_embeddings=True)
VAE = dict(
    in_channels=3, out_channels=3, down_block_types=("CogVideoXDownBlock3D",) * 3,
    up_block_types=("CogVideoXUpBlock3D",) * 3, block_out_channels=(8, 8, 8), latent_channels=4,
    layers_per_block=1, norm_num_groups=2, temporal_compression_ratio=4, sample_height=32, sample_width=32,
)
T5 = dict(
    d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4, relative_attention_num_buckets=8,
    relative_attention_max_distance=16, feed_forward_proj="gated-gelu", dropout_rate=0.0,
    pad_token_id=0, eos_token_id=1,
)
_WORDS = ("a the of and in on with at to is video cat dog man woman walking running red blue green "
          "sky sea city night day car tree").split()


def tiny_t5_tokenizer(max_length: int = MAX_TEXT_LENGTH):
    """A fast T5 tokenizer built from an in-memory Unigram vocabulary (no files, no hub).

    The ``tokenizers`` object is assembled here, as transformers 5's ``T5Tokenizer(vocab=...)``
    assembles it (Unigram, whitespace + ``▁`` metaspace pre-tokenizer, ``</s>`` appended), because
    transformers 4's ``T5Tokenizer`` is the SentencePiece one and needs a model file: the same
    token ids on transformers 4 and 5 (``T5TokenizerFast`` is ``T5Tokenizer`` in 5)."""
    from tokenizers import Tokenizer, decoders, pre_tokenizers, processors
    from tokenizers.models import Unigram
    from transformers import T5TokenizerFast

    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    vocab += [("▁" + w, -3.0 - 0.01 * i) for i, w in enumerate(_WORDS)]
    seen = {piece for piece, _ in vocab}
    for char in string.ascii_letters + string.digits + string.punctuation:
        vocab += [(piece, score) for piece, score in (("▁" + char, -7.0), (char, -8.0)) if piece not in seen]
    unigram = Tokenizer(Unigram(vocab, unk_id=2, byte_fallback=False))
    metaspace = dict(replacement="▁", prepend_scheme="always", split=True)
    unigram.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Metaspace(**metaspace)])
    unigram.decoder = decoders.Metaspace(**metaspace)
    unigram.post_processor = processors.TemplateProcessing(
        single=["$A", "</s>"], pair=["$A", "</s>", "$B", "</s>"], special_tokens=[("</s>", 1)])
    return T5TokenizerFast(tokenizer_object=unigram, extra_ids=0, model_max_length=max_length,
                           eos_token="</s>", unk_token="<unk>", pad_token="<pad>")


def build_tiny_pipeline(out_dir: str, seed: int = 0, rope: bool = False, overwrite: bool = False) -> str:
    """Save the tiny pipeline to ``out_dir`` (weights drawn from ``seed``); returns ``out_dir``."""
    from diffusers import (AutoencoderKLCogVideoX, CogVideoXDDIMScheduler, CogVideoXPipeline,
                           CogVideoXTransformer3DModel)
    from transformers import T5Config, T5EncoderModel

    if os.path.isdir(out_dir) and os.listdir(out_dir) and not overwrite:
        raise FileExistsError(f"{out_dir}: output directory is not empty (pass overwrite=True / --overwrite)")
    tokenizer = tiny_t5_tokenizer()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        transformer = CogVideoXTransformer3DModel(**{**TRANSFORMER, **(ROPE_OVERRIDES if rope else {})})
        with torch.no_grad():
            for param in transformer.parameters():
                param.add_(0.05 * torch.randn_like(param))
        vae = AutoencoderKLCogVideoX(**VAE)
        text_encoder = T5EncoderModel(T5Config(vocab_size=len(tokenizer), **T5))
    pipeline = CogVideoXPipeline(
        tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, transformer=transformer,
        scheduler=CogVideoXDDIMScheduler(**COGVIDEOX_2B_SCHEDULER),
    )
    pipeline.save_pretrained(out_dir)
    return out_dir
