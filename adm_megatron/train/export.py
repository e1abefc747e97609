"""What a finished run hands over: the generator as a diffusers directory of its family's
transformer class, and samples rendered from it through the family's real diffusers pipeline."""

from __future__ import annotations

import os

import torch

from adm_megatron.convert.checkpoint import export_diffusers
from adm_megatron.families import PromptEmbeddings


def export_generator(generator: torch.nn.Module, arch, out_dir: str) -> str:
    """Collective: the generator's weights (gathered over TP) as a diffusers directory."""
    return export_diffusers(generator, arch, out_dir, overwrite=True)


def render_run_samples(trainer, generator_dir: str) -> list[str]:
    """Rank 0: ``train.num_samples`` samples of the first prompts with the generator's N steps."""
    from adm_megatron.parallel import parallel_info

    if parallel_info().rank != 0:
        return []
    config = trainer.config
    count = min(config.train.num_samples, len(trainer.text_source))
    indices = torch.arange(count)
    text = trainer.text_source.get(indices)
    negative = trainer.text_source.negative().unsqueeze(0).expand_as(text).clone()
    return trainer.family.render_samples(
        trainer.teacher_source.pipeline_dir, generator_dir, PromptEmbeddings(text=text, negative=negative),
        config.distill.generator_steps,
        os.path.join(config.output_dir, "samples"), fmt="gif", seed=config.seed,
    )
