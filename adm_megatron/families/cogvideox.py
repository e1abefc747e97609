"""CogVideoX 1.0 (2b: sin-cos positions, 5b: 3D RoPE) on the model-family interface.

Everything here is glue over the existing modules: the architecture (``models/cogvideox_config``),
the megatron model (``models/build``), the key mapping (``convert/cogvideox_mapping``), the RoPE
the pipeline builds (``models/rotary``), rendering through ``CogVideoXPipeline``
(``models/cogvideox_samples``) and T5 prompt encoding (``data/encode``). Model code is imported
on first use (inside the functions, or through ``registry.lazy``), so registering costs nothing.
"""

from __future__ import annotations

from adm_megatron.families.cogvideox_presets import COGVIDEOX_2B_SCHEDULER, PRESETS, SAMPLER_SCHEDULER
from adm_megatron.families.registry import (
    Conditioning,
    ModelFamily,
    PromptEmbeddings,
    arch_reader,
    arch_writer,
    check_latent_patches,
    lazy,
    lazy_class,
    per_head_mapping,
    register_family,
    tiny_pipeline,
)

DIFFUSERS_CLASS = "CogVideoXTransformer3DModel"
PIPELINE_CLASS = "CogVideoXPipeline"


def _positional_inputs(arch, frames: int, latent_height: int, latent_width: int, device=None):
    from adm_megatron.models.rotary import cogvideox_rotary_emb

    return cogvideox_rotary_emb(arch, frames, latent_height, latent_width, device=device)


def _native_latent_size(arch) -> tuple[int, int, int]:
    """The latents of the model's sample size (CogVideoX: 49 frames of 480x720 -> 13 x 60 x 90)."""
    return (arch.sample_frames - 1) // arch.temporal_compression_ratio + 1, arch.sample_height, arch.sample_width


def _conditioning(arch) -> Conditioning:
    # T5 tokens: a run takes max_text_seq_length and no other (train/validate.py), and the 2b-style
    # transformer's positional table (CogVideoXPatchEmbed) has that many text positions, no more
    return Conditioning(text_length=arch.max_text_seq_length, text_width=arch.text_embed_dim,
                        max_sequence_length=arch.max_text_seq_length)


def _check_run(arch, config) -> None:
    """Joint [text; video] tokens: the latent size must patch, and CP / SP must split the tokens."""
    from adm_megatron.config import ConfigError

    tp, cp = config.parallel.tensor_parallel, config.parallel.context_parallel
    data = config.data
    p = arch.patch_size
    check_latent_patches(data, p)
    video_tokens = data.frames * (data.height // p) * (data.width // p)
    if video_tokens % cp:
        raise ConfigError(
            f"parallel.context_parallel={cp}: {video_tokens} video tokens (data.frames x h/{p} x "
            f"w/{p}) are not divisible by it"
        )
    per_rank = arch.max_text_seq_length + video_tokens // cp
    if config.model.sequence_parallel and tp > 1 and per_rank % tp:
        raise ConfigError(
            f"model.sequence_parallel: {per_rank} tokens per context-parallel rank (text "
            f"{arch.max_text_seq_length} + video {video_tokens // cp}) are not divisible by "
            f"tensor_parallel={tp}"
        )


def _render_samples(pipeline_dir, transformer_dir, prompts: PromptEmbeddings, num_inference_steps, out_dir,
                    **options) -> list:
    from adm_megatron.models.cogvideox_samples import render_samples

    return render_samples(pipeline_dir, transformer_dir, prompts.text, prompts.negative, num_inference_steps,
                          out_dir, **options)


def _encode_prompts(pipeline_dir: str, prompts: list, arch, device, text_length: int | None = None) -> PromptEmbeddings:
    """The pipeline's T5 on the prompts and on the empty negative prompt, to the transformer's text
    length (``text_length``, the run's, is that length: training checks it). One prompt at a time,
    as SD3's (a sample does not depend on which prompts share its rank)."""
    from adm_megatron.data.encode import encode_prompts, load_t5

    text_encoder, tokenizer = load_t5(pipeline_dir, device=device)
    embeds = encode_prompts(text_encoder, tokenizer, [*prompts, ""], max_length=arch.max_text_seq_length,
                            batch_size=1)
    return PromptEmbeddings(text=embeds[:-1], negative=embeds[-1])


def _prompt_call_options(pipeline_dir: str, arch, text_length: int | None = None) -> dict:
    """T5 padded to the transformer's text length, as training's embeddings are (the pipeline's
    default, 226, is the real models' length)."""
    return {"max_sequence_length": arch.max_text_seq_length}


COGVIDEOX = register_family(ModelFamily(
    name="cogvideox",
    diffusers_classes=(DIFFUSERS_CLASS,),
    pipeline_classes=(PIPELINE_CLASS,),
    schedulers=("CogVideoXDDIMScheduler", "CogVideoXDPMScheduler"),
    reference_scheduler={"_class_name": "CogVideoXDDIMScheduler", **COGVIDEOX_2B_SCHEDULER},
    latent_layout="video",
    head_kind="3d",
    arch_from_diffusers_config=arch_reader("adm_megatron.models.cogvideox_config", "CogVideoXArch"),
    arch_to_diffusers_config=arch_writer(DIFFUSERS_CLASS),
    build_model=lazy("adm_megatron.models.build", "build_model"),
    hf_to_megatron=per_head_mapping("adm_megatron.convert.cogvideox_mapping", "hf_to_megatron"),
    megatron_to_hf=per_head_mapping("adm_megatron.convert.cogvideox_mapping", "megatron_to_hf"),
    diffusers_model_class=lazy_class("diffusers", DIFFUSERS_CLASS),
    positional_inputs=_positional_inputs,
    conditioning=_conditioning,
    check_run=_check_run,
    render_samples=_render_samples,
    encode_prompts=_encode_prompts,
    sampler_scheduler=SAMPLER_SCHEDULER,
    prompt_call_options=_prompt_call_options,
    presets=PRESETS,
    tiny_pipelines={
        "cogvideox-2b": tiny_pipeline("adm_megatron.data.tiny_pipeline", "build_tiny_pipeline"),
        "cogvideox-5b": tiny_pipeline("adm_megatron.data.tiny_pipeline", "build_tiny_pipeline", rope=True),
    },
    tools=frozenset({"bench", "memory-plan", "pixel-discriminator"}),
    call_flops=lazy("adm_megatron.bench.flops", "cogvideox_call_flops"),
    lora_flops=lazy("adm_megatron.bench.flops", "cogvideox_lora_flops"),
    native_latent_size=_native_latent_size,
    memory_terms=lazy("adm_megatron.memory.cogvideox_terms", "cogvideox_memory_terms"),
    vae_class="AutoencoderKLCogVideoX",
    decode_images=lazy("adm_megatron.models.vae_decode", "decode_cogvideox_frames"),
))
