"""``adm-megatron sample``: samples from an exported generator through its model family's diffusers
pipeline with its N-step schedule (optionally with CFG, the paper's "ADM w/ CFG"), beside the
teacher's own multi-step sampling, and the seconds per sample of each on this device.

The family comes from the transformer's ``config.json`` (``adm_megatron.families``). Prompts are
encoded with the pipeline's own text encoder(s) as the pipeline would (the family's
``encode_prompts``), the negative prompt is the empty string; rendering is the family's
``render_samples`` (whose deterministic few-step schedule is the PF-ODE the generator was distilled
on). The generator's step count defaults to the one it was distilled for (the ``distillation.json``
the trainer exports beside it). Writes ``OUT/generator/``, ``OUT/teacher/`` and
``OUT/sample_timing.json``; an earlier non-empty ``OUT`` is replaced only when asked.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import sys
from dataclasses import dataclass

import torch

from adm_megatron.convert.distillation_record import DISTILLATION_FILE, read_distillation_record
from adm_megatron.models.generator_source import generator_parts

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class SampleRun:
    name: str  # 'generator' or 'teacher'
    transformer_dir: str | None  # None: the pipeline's own transformer (the teacher)
    steps: int
    guidance_scale: float


def generator_steps(generator_dir: str, steps: int | None) -> int:
    """The generator's sampling steps: ``steps`` when given (a note on stderr when it differs from
    the distilled count), else the count in its ``distillation.json``; one-line ValueError when
    neither says."""
    record = read_distillation_record(generator_dir)
    if steps is None:
        if record is None:
            raise ValueError(f"--steps: {generator_dir} has no {DISTILLATION_FILE} (adm-megatron train writes it "
                             "into generator/); give the step count the generator was distilled for")
        return record["generator_steps"]
    if record is not None and steps != record["generator_steps"]:
        print(f"adm-megatron sample: note: {generator_dir} was distilled for {record['generator_steps']} steps; "
              f"sampling it with {steps}", file=sys.stderr)
    return steps


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """``auto``: bf16 on a GPU (diffusers' recommended inference dtype for these models), fp32 on CPU."""
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if name not in DTYPES:
        raise ValueError(f"--dtype {name}: expected auto or one of {', '.join(DTYPES)}")
    return DTYPES[name]


def prepare_out_dir(out_dir: str, overwrite: bool) -> None:
    """Refuse (one line) a non-empty ``out_dir`` unless ``overwrite``, which removes it first so no
    file of the earlier run is left beside the new ones."""
    if os.path.isfile(out_dir):
        raise ValueError(f"--out {out_dir}: exists and is a file")
    if os.path.isdir(out_dir) and os.listdir(out_dir):
        if not overwrite:
            raise ValueError(f"--out {out_dir}: exists and is not empty (pass --overwrite to replace it)")
        shutil.rmtree(out_dir)


def sample(pipeline_dir: str, runs: list[SampleRun], prompts: list[str], out_dir: str, fmt: str | None = None,
           seed: int = 0, command: str = "", dtype: str = "auto", overwrite: bool = False) -> dict:
    """Render every prompt with every run; returns (and writes) the timing table. ``fmt`` None: mp4
    for video families, png for image families; ``dtype`` as :func:`resolve_dtype`."""
    from adm_megatron.bench.report import environment
    from adm_megatron.families import family_of_model_dir

    if not prompts:
        raise ValueError("--prompt: give at least one prompt")
    for run in runs:
        if run.steps < 1:
            raise ValueError(f"{run.name} steps={run.steps}: expected >= 1")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch_dtype = resolve_dtype(dtype, device)
    transformer = generator_parts(pipeline_dir, runs[0].transformer_dir)[0]  # a LoRA file: the teacher's
    family = family_of_model_dir(transformer)
    prepare_out_dir(out_dir, overwrite)
    embeds = family.encode_prompts(pipeline_dir, prompts, family.arch_from_pretrained_dir(transformer), device)
    fmt = fmt or ("png" if family.latent_layout == "image" else "mp4")
    rows = []
    for run in runs:
        seconds: list[float] = []
        paths = family.render_samples(pipeline_dir, run.transformer_dir, embeds, run.steps,
                                      os.path.join(out_dir, run.name), fmt=fmt, guidance_scale=run.guidance_scale,
                                      seed=seed, device=device, dtype=torch_dtype, seconds=seconds)
        record = read_distillation_record(run.transformer_dir) if run.transformer_dir else None
        rows.append({"model": run.name, "transformer": run.transformer_dir or transformer, "steps": run.steps,
                     "guidance_scale": run.guidance_scale, "seconds": seconds,
                     "seconds_per_sample": statistics.median(seconds), "paths": paths, "distillation": record})
    result = {"environment": environment(device, command), "pipeline": pipeline_dir, "prompts": prompts,
              "dtype": str(torch_dtype).removeprefix("torch."), "runs": rows}
    with open(os.path.join(out_dir, "sample_timing.json"), "w") as f:
        json.dump(result, f, indent=2)
    return result


def format_timing(result: dict) -> str:
    lines = [f"{'model':10s} {'steps':>5s} {'CFG':>5s} {'s / sample':>11s}  files"]
    for r in result["runs"]:
        lines.append(f"{r['model']:10s} {r['steps']:5d} {r['guidance_scale']:5.1f} {r['seconds_per_sample']:11.4g}  "
                     f"{os.path.dirname(r['paths'][0])}/")
    return "\n".join(lines)
