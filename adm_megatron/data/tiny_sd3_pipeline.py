"""A tiny random but complete ``StableDiffusion3Pipeline`` directory, built offline in seconds.

Every component is real diffusers / transformers code at toy size, so ``StableDiffusion3Pipeline.
from_pretrained`` reloads the directory and runs end to end on a CPU:

* transformer: ``SD3Transformer2DModel``, 2 blocks of 4 heads x 8, 16 latent channels, patch 2,
  ``joint_attention_dim = 32`` (the T5 width), ``pooled_projection_dim = 64`` (the two CLIP
  projections, 32 each), ``pos_embed_max_size = 32``; ``qk_norm="rms_norm"`` gives the SD3.5-style
  variant;
* VAE: ``AutoencoderKL`` with 3 blocks of 8 channels and 16 latent channels -- spatial factor 4
  (32x32 pixels <-> 8x8 latents), SD3's scaling / shift factors;
* text encoders: two ``CLIPTextModelWithProjection`` (hidden 8 and 8, projections 32 and 32; SD3
  reads their penultimate hidden states and their projections) and a 2-layer T5 v1.1 encoder of
  width 32, as ``StableDiffusion3Pipeline.encode_prompt`` concatenates them: ``[CLIP-L ; CLIP-G]``
  zero-padded to the T5 width, then the T5 tokens after them along the sequence;
* tokenizers: two ``CLIPTokenizer`` over a byte-level vocabulary without merges
  (``model_max_length = 16``) and the T5 tokenizer of ``tiny_pipeline`` (call the pipeline with
  ``max_sequence_length=16``): 16 + 16 = 32 text tokens;
* scheduler: ``FlowMatchEulerDiscreteScheduler`` with shift 3.0, as SD3-Medium / SD3.5-Large.

The transformer's weights are perturbed away from diffusers' initialisation (its zero-initialised
output projection would give a constant sample).
"""

from __future__ import annotations

import json
import os
import tempfile

import torch

from adm_megatron.data.tiny_pipeline import T5, tiny_t5_tokenizer
from adm_megatron.families.sd3_presets import SD3_SCHEDULER

CLIP_MAX_LENGTH = 16
TRANSFORMER = dict(
    sample_size=32, patch_size=2, in_channels=16, out_channels=16, num_layers=2, attention_head_dim=8,
    num_attention_heads=4, caption_projection_dim=32, joint_attention_dim=32, pooled_projection_dim=64,
    pos_embed_max_size=32,
)
SD35_OVERRIDES = dict(qk_norm="rms_norm")
VAE = dict(
    in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 3,
    up_block_types=("UpDecoderBlock2D",) * 3, block_out_channels=(8, 8, 8), latent_channels=16,
    layers_per_block=1, norm_num_groups=2, sample_size=32, scaling_factor=1.5305, shift_factor=0.0609,
    use_quant_conv=False, use_post_quant_conv=False,
)
CLIP = dict(hidden_size=8, intermediate_size=16, num_hidden_layers=2, num_attention_heads=2,
            projection_dim=32, max_position_embeddings=CLIP_MAX_LENGTH, hidden_act="quick_gelu")


def _bytes_to_unicode() -> list[str]:
    """GPT-2 / CLIP's printable stand-ins for the 256 byte values."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = [], 0
    for b in range(256):
        if b in printable:
            chars.append(chr(b))
        else:
            chars.append(chr(256 + extra))
            extra += 1
    return chars


def tiny_clip_tokenizer(max_length: int = CLIP_MAX_LENGTH):
    """A ``CLIPTokenizer`` over the 256 byte symbols (plain and word-final), no merges."""
    from transformers import CLIPTokenizer

    symbols = _bytes_to_unicode()
    vocab = {s: i for i, s in enumerate(symbols + [s + "</w>" for s in symbols])}
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    with tempfile.TemporaryDirectory() as tmp:
        vocab_file, merges_file = os.path.join(tmp, "vocab.json"), os.path.join(tmp, "merges.txt")
        with open(vocab_file, "w") as f:
            json.dump(vocab, f)
        with open(merges_file, "w") as f:
            f.write("#version: 0.2\n")
        return CLIPTokenizer(vocab_file, merges_file, model_max_length=max_length, pad_token="<|endoftext|>")


def build_tiny_sd3_pipeline(out_dir: str, seed: int = 0, qk_norm: bool = False, overwrite: bool = False) -> str:
    """Save the tiny pipeline to ``out_dir`` (weights drawn from ``seed``; ``qk_norm``: the
    SD3.5-style transformer); returns ``out_dir``."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    if os.path.isdir(out_dir) and os.listdir(out_dir) and not overwrite:
        raise FileExistsError(f"{out_dir}: output directory is not empty (pass overwrite=True / --overwrite)")
    clip_tokenizer = tiny_clip_tokenizer()
    t5_tokenizer = tiny_t5_tokenizer()
    clip_config = CLIPTextConfig(vocab_size=len(clip_tokenizer), bos_token_id=clip_tokenizer.bos_token_id,
                                 eos_token_id=clip_tokenizer.eos_token_id, pad_token_id=clip_tokenizer.pad_token_id,
                                 **CLIP)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        transformer = SD3Transformer2DModel(**{**TRANSFORMER, **(SD35_OVERRIDES if qk_norm else {})})
        with torch.no_grad():
            for param in transformer.parameters():
                param.add_(0.05 * torch.randn_like(param))
        vae = AutoencoderKL(**VAE)
        text_encoder = CLIPTextModelWithProjection(clip_config)
        text_encoder_2 = CLIPTextModelWithProjection(clip_config)
        text_encoder_3 = T5EncoderModel(T5Config(vocab_size=len(t5_tokenizer), **T5))
    pipeline = StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(**SD3_SCHEDULER), vae=vae,
        text_encoder=text_encoder, tokenizer=clip_tokenizer, text_encoder_2=text_encoder_2,
        tokenizer_2=tiny_clip_tokenizer(), text_encoder_3=text_encoder_3, tokenizer_3=t5_tokenizer,
    )
    pipeline.save_pretrained(out_dir)
    return out_dir
