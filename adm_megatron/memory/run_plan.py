"""From a run config to a memory plan: the architecture (a teacher directory or a real-size preset),
the shapes, the layout and the memory settings, the parameter counts on ``meta``, then the formulas
of ``plan.py`` with the family's per-block counts (``memory_terms``). Layout errors are raised
before any model is built. Families whose spec lists the ``memory-plan`` tool are planned; others
are refused in one line, and so are methods the phases of ``plan.py`` do not describe. ADP's pixel
branch (the VAE decode and the vision encoder) is counted on fake tensors from the pipeline's and the
encoder's config files (``pixel_branch.py``), and the samples' VAE decode from the pipeline's VAE
config (``sample_decode.py``; a plan without the pipeline's files, e.g. from a preset, has no
samples row)."""

from __future__ import annotations

import os

from adm_megatron.config import Config, ConfigError
from adm_megatron.data.batch_layout import microbatches_for
from adm_megatron.memory.counts import NetworkSize, backbone_size, heads_size, lora_generator_size
from adm_megatron.memory.pixel_branch import pixel_branch
from adm_megatron.memory.sample_decode import count_sample_decode, vae_config_dir
from adm_megatron.memory.plan import (
    HEADS,
    METHOD_PHASES,
    MemoryPlan,
    PlanError,
    Settings,
    Shape,
    check_settings,
    plan_memory,
)
from adm_megatron.families import family_for_preset, family_of_arch
from adm_megatron.models.taps import tapped_block_indices
from adm_megatron.data.prompt_fit import check_prompt_embeddings


def resolve_arch(config: Config, preset: str = ""):
    """The real-size preset named ``preset`` (no weights needed), else the teacher's own config;
    a one-line PlanError for a family the planner has no formulas for."""
    if preset:
        try:
            family, diffusers_config = family_for_preset(preset)
        except ValueError as err:
            raise PlanError(f"arch={err}") from None
        arch = family.arch_from_diffusers_config(diffusers_config, preset)
    else:
        from adm_megatron.train.teacher import resolve_teacher

        arch = resolve_teacher(config.model.teacher, config.model.pipeline).arch
    try:
        family_of_arch(arch).require("memory-plan", "memory planner")
    except ValueError as err:
        raise PlanError(str(err)) from None
    return arch


def _text_tokens(config: Config, text) -> int:
    """The prompts' length: the family's, or for a family that takes any length (SD3) that of the
    run's embedding shards where they exist, else its default (SD3: 77 CLIP + 256 T5 tokens)."""
    d = config.data
    if text.any_text_length and d.source == "shards" and os.path.isdir(d.path):
        from adm_megatron.data import TextEmbeddingShards

        try:
            return TextEmbeddingShards(d.path).seq_len
        except (OSError, ValueError) as err:
            raise PlanError(f"data.path={d.path!r}: {err}") from None
    return text.text_length


def shape_for(config: Config, arch) -> Shape:
    d = config.distill
    if d.head_every > arch.num_layers:
        raise PlanError(f"distill.head_every={d.head_every}: the teacher has only {arch.num_layers} blocks")
    family = family_of_arch(arch)
    text = family.conditioning(arch)
    return Shape(
        layers=arch.num_layers, hidden=arch.hidden_size, heads=arch.num_attention_heads,
        ffn=arch.ffn_hidden_size, text_tokens=_text_tokens(config, text), text_dim=text.text_width,
        latent_channels=arch.in_channels, patch=arch.patch_size,
        terms=family.memory_terms(arch), frames=config.data.frames,
        height=config.data.height, width=config.data.width,
        taps=len(tapped_block_indices(arch.num_layers, d.head_every)), head_kind=family.head_kind,
        head_hidden=d.head_hidden, head_blocks=d.head_blocks, pooled_dim=text.pooled_width or 0,
    )


def config_memory_settings(config: Config) -> dict:
    """The memory settings the run config asks for (what ``train`` will do), as ``Settings`` fields."""
    from adm_megatron.config import RECOMPUTE_PHASES
    from adm_megatron.memory.plan import TRAINABLE

    m = config.model
    return dict(
        recompute=tuple((n, p, m.recompute.mode(n, p)) for n in ("teacher", "fake_score", "generator")
                        for p in RECOMPUTE_PHASES),
        params="bf16" if m.bf16_params else "fp32",
        shard_optimizer=frozenset(n for n in TRAINABLE if getattr(config.optim, n).shard_over_dp),
        grad_clip=frozenset(n for n in TRAINABLE if getattr(config.optim, n).grad_clip > 0),
        offload=tuple((n, getattr(config.optim, n).offload) for n in TRAINABLE),
        ema=config.train.ema_decay > 0,
        grads_fp32=m.grad_reduce_in_fp32,
    )


def settings_for(config: Config, world_size: int, **memory) -> Settings:
    """The layout of ``config`` on ``world_size`` GPUs with the memory settings of the config,
    where ``memory`` (``Settings`` fields: shard_optimizer, offload, params, card_gib, margin, device,
    pinned_memory...) does not override them; a None value keeps the config's."""
    tp, cp = config.parallel.tensor_parallel, config.parallel.context_parallel
    if world_size < 1 or world_size % (tp * cp):
        raise PlanError(f"gpus={world_size}: not a positive multiple of tensor_parallel x context_parallel = "
                        f"{tp} x {cp}")
    m = config.model
    if m.dtype == "fp64":
        raise PlanError("model.dtype=fp64: the planner covers fp32 and bf16 runs")
    chosen = {**config_memory_settings(config), **{k: v for k, v in memory.items() if v is not None}}
    if chosen["params"] == "bf16" and m.dtype != "bf16":  # as model.bf16_params=true is refused for train
        raise PlanError(f"--params bf16 needs model.dtype=bf16 (got {m.dtype}): bf16 weights run under bf16 autocast")
    dp = world_size // (tp * cp)
    try:
        microbatches = microbatches_for(config.data.global_batch_size, config.data.batch_size, dp, f"gpus={world_size}")
    except ConfigError as err:
        raise PlanError(str(err)) from None
    return Settings(
        method=config.distill.method, tensor_parallel=tp, context_parallel=cp, data_parallel=dp,
        batch_size=config.data.batch_size, microbatches=microbatches, sequence_parallel=m.sequence_parallel,
        activations=m.dtype,
        **chosen,
    )


def plan_run(config: Config, world_size: int, preset: str = "", **memory) -> MemoryPlan:
    """The memory plan of ``config`` on ``world_size`` GPUs (``memory`` as ``settings_for``)."""
    arch = resolve_arch(config, preset)
    try:  # what train refuses for this family and data (SD3 given video frames, embeddings it cannot take)
        family_of_arch(arch).check_run(arch, config)
        if os.path.isdir(config.data.path):  # a plan may come before the data (the examples' /path/to/...)
            check_prompt_embeddings(config, family_of_arch(arch), arch)
    except ConfigError as err:
        raise PlanError(str(err)) from None
    shape = shape_for(config, arch)
    settings = settings_for(config, world_size, **memory)
    check_settings(shape, settings)  # before anything is built
    backbone = backbone_size(arch, settings.tensor_parallel)
    lora = config.model.lora
    sizes = {
        "teacher": backbone, "fake_score": backbone,
        "generator": backbone if lora is None else lora_generator_size(arch, settings.tensor_parallel, lora),
        "discriminator": heads_size(arch, shape.taps, shape.head_hidden, shape.head_blocks),
    }
    if "fake_score" not in METHOD_PHASES[settings.method]:  # ADP builds none
        del sizes["fake_score"]
    if settings.method not in HEADS:  # DMD builds no discriminator
        del sizes["discriminator"]
    pixel = None
    d = config.distill
    family = family_of_arch(arch)
    latent_shape = family.latent_shape(arch, config.data.frames, config.data.height, config.data.width)
    if d.method == "adp" and d.pixel_weight > 0:
        try:
            pixel = pixel_branch(config, family, latent_shape)
        except ValueError as err:
            raise PlanError(str(err)) from None
        latent = sizes["discriminator"]
        sizes["discriminator"] = NetworkSize(latent.params + pixel.heads_params,
                                             max(latent.largest_param, pixel.heads_largest_param), latent.buffer_bytes)
    samples = None
    vae_dir = vae_config_dir(config)
    if config.train.num_samples > 0 and vae_dir is not None and family.decode_images is not None:
        samples = count_sample_decode(config, family, latent_shape, vae_dir)
    return plan_memory(shape, sizes, settings, pixel, samples)


__all__ = ["ConfigError", "plan_run", "resolve_arch", "settings_for", "shape_for"]
