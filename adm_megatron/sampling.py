"""``adm-megatron sample``: samples from an exported generator through its model family's diffusers
pipeline with its N-step schedule (optionally with CFG, the paper's "ADM w/ CFG"), beside the
teacher's own multi-step sampling, and the seconds per sample of each on this device.

The family comes from the transformer's ``config.json`` (``adm_megatron.families``). Prompts are
encoded with the pipeline's own text encoder(s) as the pipeline would (the family's
``encode_prompts``), the negative prompt is the empty string; rendering is the family's
``render_samples`` (whose deterministic few-step schedule is the PF-ODE the generator was distilled
on). Writes ``OUT/generator/``, ``OUT/teacher/`` and ``OUT/sample_timing.json``.
"""

from __future__ import annotations

import json
import os
import statistics
from dataclasses import dataclass

import torch


@dataclass
class SampleRun:
    name: str  # 'generator' or 'teacher'
    transformer_dir: str | None  # None: the pipeline's own transformer (the teacher)
    steps: int
    guidance_scale: float


def sample(pipeline_dir: str, runs: list[SampleRun], prompts: list[str], out_dir: str, fmt: str | None = None,
           seed: int = 0, command: str = "") -> dict:
    """Render every prompt with every run; returns (and writes) the timing table. ``fmt`` None: mp4
    for video families, png for image families."""
    from adm_megatron.bench.report import environment
    from adm_megatron.families import family_of_model_dir

    if not prompts:
        raise ValueError("--prompt: give at least one prompt")
    for run in runs:
        if run.steps < 1:
            raise ValueError(f"{run.name} steps={run.steps}: expected >= 1")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    transformer = runs[0].transformer_dir or os.path.join(pipeline_dir, "transformer")
    family = family_of_model_dir(transformer)
    embeds = family.encode_prompts(pipeline_dir, prompts, family.arch_from_pretrained_dir(transformer), device)
    fmt = fmt or ("png" if family.latent_layout == "image" else "mp4")
    rows = []
    for run in runs:
        seconds: list[float] = []
        paths = family.render_samples(pipeline_dir, run.transformer_dir, embeds, run.steps,
                                      os.path.join(out_dir, run.name), fmt=fmt, guidance_scale=run.guidance_scale,
                                      seed=seed, device=device, seconds=seconds)
        rows.append({"model": run.name, "transformer": run.transformer_dir or transformer, "steps": run.steps,
                     "guidance_scale": run.guidance_scale, "seconds": seconds,
                     "seconds_per_sample": statistics.median(seconds), "paths": paths})
    result = {"environment": environment(device, command), "pipeline": pipeline_dir, "prompts": prompts, "runs": rows}
    with open(os.path.join(out_dir, "sample_timing.json"), "w") as f:
        json.dump(result, f, indent=2)
    return result


def format_timing(result: dict) -> str:
    lines = [f"{'model':10s} {'steps':>5s} {'CFG':>5s} {'s / sample':>11s}  files"]
    for r in result["runs"]:
        lines.append(f"{r['model']:10s} {r['steps']:5d} {r['guidance_scale']:5.1f} {r['seconds_per_sample']:11.4g}  "
                     f"{os.path.dirname(r['paths'][0])}/")
    return "\n".join(lines)
