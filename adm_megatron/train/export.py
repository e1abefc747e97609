"""What a finished run hands over: the generator as a diffusers directory of its family's
transformer class (a LoRA generator: merged, and / or as a LoRA file), and samples rendered from it
through the family's real diffusers pipeline."""

from __future__ import annotations

import os

import torch

from adm_megatron.convert.checkpoint import export_diffusers
from adm_megatron.families import PromptEmbeddings
from adm_megatron.lora import lora_adapters
from adm_megatron.lora.export import export_lora_generator


def export_generator(generator: torch.nn.Module, arch, out_dir: str, lora_mode: str = "merged") -> str | None:
    """Collective: the generator's weights (gathered over TP) as a diffusers directory. A LoRA
    generator is exported as ``lora_mode`` says (``adm_megatron.lora.export.export_lora_generator``);
    returns the diffusers directory, None if only the LoRA file was asked for."""
    if lora_adapters(generator) is not None:
        return export_lora_generator(generator, arch, out_dir, lora_mode)
    return export_diffusers(generator, arch, out_dir, overwrite=True)


def render_run_samples(trainer, generator_dir: str) -> list[str]:
    """Rank 0: ``train.num_samples`` samples of the first prompts with the generator's N steps."""
    from adm_megatron.parallel import parallel_info

    if parallel_info().rank != 0:
        return []
    config = trainer.config
    count = min(config.train.num_samples, len(trainer.text_source))
    indices = torch.arange(count)
    source = trainer.text_source
    pooled = (source.get_pooled(indices), source.negative_pooled()) if source.pooled_dim else (None, None)
    prompts = PromptEmbeddings(text=source.get(indices), negative=source.negative(), pooled=pooled[0],
                               negative_pooled=pooled[1])
    image = trainer.family.latent_layout == "image"
    return trainer.family.render_samples(
        trainer.teacher_source.pipeline_dir, generator_dir, prompts, config.distill.generator_steps,
        os.path.join(config.output_dir, "samples"), fmt="png" if image else "gif", seed=config.seed,
    )
