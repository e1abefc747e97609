"""SD3-Medium and SD3.5 (Large / Medium) MMDiT on the model-family interface.

Glue over the existing modules: the architecture (``models/sd3_config``), the megatron model
(``models/build.build_sd3_model``), the key mapping (``convert/sd3_mapping``), rendering through
``StableDiffusion3Pipeline`` as PNGs (``models/sd3_samples``) and prompt encoding with
the pipeline's own three encoders (``data/encode_sd3``). Images: latents ``[B, C, H, W]``, 2D heads
on the taps, the flow-matching schedule of the pipeline's ``FlowMatchEulerDiscreteScheduler``, no
positional inputs (the cropped position embedding is inside the model), and the pooled CLIP
embedding as a second text condition. The backbone takes prompts of any length; 77 CLIP + 256 T5
tokens (the pipeline's default) is the length synthetic prompts get.
"""

from __future__ import annotations

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
from adm_megatron.families.sd3_presets import PRESETS, SD3_SCHEDULER

DIFFUSERS_CLASS = "SD3Transformer2DModel"
PIPELINE_CLASS = "StableDiffusion3Pipeline"
DEFAULT_TEXT_LENGTH = 77 + 256  # CLIP tokens + the pipeline's default max_sequence_length of T5
MAX_SEQUENCE_LENGTH = 512  # the most T5 tokens: StableDiffusion3Pipeline refuses a longer max_sequence_length


def _positional_inputs(arch, frames: int, latent_height: int, latent_width: int, device=None):
    return None  # the cropped sin-cos position embedding is computed inside the model


def _conditioning(arch) -> Conditioning:
    return Conditioning(text_length=DEFAULT_TEXT_LENGTH, text_width=arch.joint_attention_dim,
                        pooled_width=arch.pooled_projection_dim, any_text_length=True,
                        max_sequence_length=MAX_SEQUENCE_LENGTH)


def _check_run(arch, config) -> None:
    """Images: one latent frame; the latent size must patch and fit the position embedding, and CP /
    SP must split the image tokens."""
    from adm_megatron.config import ConfigError

    data, tp, cp = config.data, config.parallel.tensor_parallel, config.parallel.context_parallel
    p = arch.patch_size
    if data.frames != 1:
        raise ConfigError(f"data.frames={data.frames}: {DIFFUSERS_CLASS} makes images; set data.frames=1")
    check_latent_patches(data, p)
    side = "height" if data.height >= data.width else "width"
    if getattr(data, side) // p > arch.pos_embed_max_size:
        raise ConfigError(f"data.{side}={getattr(data, side)}: more than pos_embed_max_size={arch.pos_embed_max_size} "
                          f"patches of {p} on a side")
    tokens = (data.height // p) * (data.width // p)
    if tokens % cp:
        raise ConfigError(f"parallel.context_parallel={cp}: {tokens} image tokens are not divisible by it")
    if config.model.sequence_parallel and tp > 1 and (tokens // cp) % tp:
        raise ConfigError(f"model.sequence_parallel: {tokens // cp} image tokens per context-parallel rank are "
                          f"not divisible by tensor_parallel={tp}")


def _render_samples(pipeline_dir, transformer_dir, prompts: PromptEmbeddings, num_inference_steps, out_dir, *,
                    fmt: str = "png", **options) -> list:
    from adm_megatron.models.sd3_samples import render_image_samples

    if fmt != "png":
        raise ValueError(f"fmt={fmt!r}: {PIPELINE_CLASS} samples are written as png")
    return render_image_samples(pipeline_dir, transformer_dir, prompts.text, prompts.pooled, num_inference_steps,
                                out_dir, negative_embeds=prompts.negative, negative_pooled=prompts.negative_pooled,
                                **options)


def _encode_prompts(pipeline_dir: str, prompts: list, arch, device, text_length: int | None = None) -> PromptEmbeddings:
    """The pipeline's own three encoders on the prompts and on the empty negative prompt: the CLIP
    tokens, then T5's up to ``text_length`` in all (None: T5's 256, the pipeline's default). One
    prompt at a time, so a sample does not depend on which prompts share its rank (a batched
    encoder's sums differed in the last bits with the batch size on an AMD EPYC CPU)."""
    from adm_megatron.data.encode_sd3 import encode_sd3_prompts, load_sd3_text_pipeline

    pipeline = load_sd3_text_pipeline(pipeline_dir, device=device)
    t5 = {"max_length": text_length - pipeline.tokenizer_max_length} if text_length else {}
    embeds, pooled = encode_sd3_prompts(pipeline, [*prompts, ""], batch_size=1, **t5)
    return PromptEmbeddings(text=embeds[:-1], negative=embeds[-1], pooled=pooled[:-1], negative_pooled=pooled[-1])


def _prompt_call_options(pipeline_dir: str, arch, text_length: int | None = None) -> dict:
    """T5's ``max_sequence_length``: the run's text length past the CLIP tokens (the pipeline's
    ``tokenizer_max_length``, its CLIP tokenizer's ``model_max_length``); {} for the default 256."""
    from adm_megatron.models.pipeline_files import component_config

    if not text_length:
        return {}
    clip = component_config(pipeline_dir, "tokenizer", "tokenizer_config.json").get("model_max_length", 77)
    return {"max_sequence_length": text_length - clip}


SD3 = register_family(ModelFamily(
    name="sd3",
    diffusers_classes=(DIFFUSERS_CLASS,),
    pipeline_classes=(PIPELINE_CLASS,),
    schedulers=("FlowMatchEulerDiscreteScheduler",),
    reference_scheduler={"_class_name": "FlowMatchEulerDiscreteScheduler", **SD3_SCHEDULER},
    latent_layout="image",
    head_kind="2d",
    arch_from_diffusers_config=arch_reader("adm_megatron.models.sd3_config", "SD3Arch"),
    arch_to_diffusers_config=arch_writer(DIFFUSERS_CLASS),
    build_model=lazy("adm_megatron.models.build", "build_sd3_model"),
    hf_to_megatron=per_head_mapping("adm_megatron.convert.sd3_mapping", "hf_to_megatron"),
    megatron_to_hf=per_head_mapping("adm_megatron.convert.sd3_mapping", "megatron_to_hf"),
    diffusers_model_class=lazy_class("diffusers", DIFFUSERS_CLASS),
    positional_inputs=_positional_inputs,
    conditioning=_conditioning,
    check_run=_check_run,
    render_samples=_render_samples,
    encode_prompts=_encode_prompts,
    sampler_scheduler="FlowMatchEulerDiscreteScheduler",
    prompt_call_options=_prompt_call_options,
    presets=PRESETS,
    tiny_pipelines={
        "sd3-medium": tiny_pipeline("adm_megatron.data.tiny_sd3_pipeline", "build_tiny_sd3_pipeline"),
        "sd3.5": tiny_pipeline("adm_megatron.data.tiny_sd3_pipeline", "build_tiny_sd3_pipeline", qk_norm=True),
    },
    tools=frozenset({"bench", "memory-plan", "pixel-discriminator"}),
    call_flops=lazy("adm_megatron.bench.flops", "sd3_call_flops"),
    lora_flops=lazy("adm_megatron.bench.flops", "sd3_lora_flops"),
    native_latent_size=lambda arch: (1, arch.sample_size, arch.sample_size),  # 1024 px -> 128 x 128
    memory_terms=lazy("adm_megatron.memory.sd3_terms", "sd3_memory_terms"),
    vae_class="AutoencoderKL",
    decode_images=lazy("adm_megatron.models.vae_decode", "decode_sd3_images"),
))
