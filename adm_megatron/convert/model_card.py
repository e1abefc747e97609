"""The README.md beside an exported generator: how to sample it with diffusers alone.

A diffusers transformer directory does not say how it is sampled, and the family's pipeline called
with its defaults is the teacher's sampler (tens of steps with CFG; CogVideoX-5b's pipeline ships
the stochastic DPM scheduler): a few-step generator runs through it without an error and gives
wrong-looking samples. The card writes out the call that reproduces ``adm-megatron sample``: the
record's ``sampling`` (``adm_megatron.convert.distillation_record.sampling_call``) as Python, for a
whole transformer or a LoRA file (``pipe.load_lora_weights`` on the transformer the adapters were
trained on).
"""

from __future__ import annotations

import os

MODEL_CARD = "README.md"
_CALL_KEYS = ("height", "width", "num_frames", "max_sequence_length")


def model_card(record: dict, lora: bool = False) -> str:
    """The card of a generator directory with ``record`` (its ``distillation.json``); ``lora``: the
    directory holds a LoRA file, not a whole transformer."""
    call = record["sampling"]
    pipeline_class, scheduler = call["pipeline_class"], call["scheduler"]
    transformer_class = call["transformer_class"]
    steps, size = call["num_inference_steps"], record["latent_size"]
    pipeline = record.get("pipeline") or record["teacher"]
    low, high = record["teacher_guidance_scale"]
    cfg = f"{low:g}" if low == high else f"{low:g} to {high:g}"
    args = "".join(f", {k}={call[k]}" for k in _CALL_KEYS if k in call)
    sampler = f"`{scheduler}` (built from the pipeline's scheduler config)" if scheduler else "the pipeline's scheduler"
    lines = [
        f"# {steps}-step {pipeline_class} generator ({record['method']})",
        "",
        f"Distilled by adm-megatron with `{record['method']}` from the teacher `{record['teacher']}` (iteration "
        f"{record['iteration']}, {record['weights']} weights) at latents {size['frames']}x{size['height']}x"
        f"{size['width']}; `distillation.json` is the whole record.",
        "",
        f"Sample it with **{steps} step{'s' if steps > 1 else ''} of {sampler}** and "
        f"**`guidance_scale=1.0`**: no classifier-free guidance, the teacher's CFG ({cfg}) is "
        "distilled into the weights. The pipeline's defaults are the teacher's sampler (tens of steps with "
        "CFG): they run without an error and give wrong-looking samples.",
        "",
        "```python",
        "import torch",
        f"from diffusers import {', '.join(sorted({pipeline_class, scheduler or pipeline_class, transformer_class}))}",
        "",
        'generator_dir = "."  # this directory',
    ]
    if lora:
        base = record.get("generator_init") or (record["teacher"] if os.path.isfile(
            os.path.join(record["teacher"], "config.json")) else None)
        if base:  # the adapters were trained on this transformer, not on the pipeline's own
            lines += [f'transformer = {transformer_class}.from_pretrained("{base}")',
                      f'pipe = {pipeline_class}.from_pretrained("{pipeline}", transformer=transformer)']
        else:
            lines.append(f'pipe = {pipeline_class}.from_pretrained("{pipeline}")')
        lines.append("pipe.load_lora_weights(generator_dir)  # needs peft; alpha / rank from the file's metadata")
    else:
        lines += [f"transformer = {transformer_class}.from_pretrained(generator_dir)  # torch_dtype=torch.bfloat16 "
                  "on a GPU",
                  f'pipe = {pipeline_class}.from_pretrained("{pipeline}", transformer=transformer)']
    if scheduler:
        lines.append(f"pipe.scheduler = {scheduler}.from_config(pipe.scheduler.config)")
    lines += [
        f'out = pipe("a prompt", num_inference_steps={steps}, guidance_scale=1.0{args},',
        "           generator=torch.Generator(pipe.device).manual_seed(0))",
        "```",
        "",
    ]
    if not any(k in call for k in ("height", "width")):
        lines += [f"Give the pixel size of latents {size['frames']}x{size['height']}x{size['width']} (the "
                  "pipeline's VAE scale); the pipeline's default is the transformer's native size.", ""]
    if lora:
        lines += ["`pipe.fuse_lora()` adds the adapters into the weights: the same samples in fp32; in bf16 most "
                  "small trained deltas round away, so keep them unfused there.", ""]
    lines += [f'`adm-megatron sample --pipeline {pipeline} --generator DIR --prompt "a prompt" --seed 0` renders '
              "the same sample (its sample i from seed + i) beside the teacher's.", ""]
    return "\n".join(lines)


def pipeline_card(record: dict, source: str) -> str:
    """The card of a whole pipeline directory (``adm_megatron.convert.pipeline_export``) holding the
    generator of ``record`` as its transformer, the other components copied from ``source``."""
    call = record["sampling"]
    steps, size = call["num_inference_steps"], record["latent_size"]
    args = "".join(f", {k}={call[k]}" for k in _CALL_KEYS if k in call)
    scheduler = call["scheduler"]
    return "\n".join([
        f"# {steps}-step {call['pipeline_class']} ({record['method']})",
        "",
        f"A whole diffusers pipeline: the components of `{source}` with the generator adm-megatron distilled "
        f"from it (`{record['method']}`, iteration {record['iteration']}, {record['weights']} weights, latents "
        f"{size['frames']}x{size['height']}x{size['width']}) as `transformer/` (its `distillation.json` is the "
        f"whole record){f' and the scheduler set to `{scheduler}`' if scheduler else ''}.",
        "",
        f"Sample it with **{steps} step{'s' if steps > 1 else ''}** and **`guidance_scale=1.0`**: the teacher's "
        "classifier-free guidance is distilled into the weights. The pipeline's defaults are the teacher's "
        "sampler (tens of steps with CFG): they run without an error and give wrong-looking samples.",
        "",
        "```python",
        "import torch",
        "from diffusers import DiffusionPipeline",
        "",
        'pipe = DiffusionPipeline.from_pretrained(".")  # this directory; torch_dtype=torch.bfloat16 on a GPU',
        f'out = pipe("a prompt", num_inference_steps={steps}, guidance_scale=1.0{args},',
        "           generator=torch.Generator(pipe.device).manual_seed(0))",
        "```",
        "",
    ])


def write_pipeline_card(directory: str, record: dict, source: str) -> None:
    with open(os.path.join(directory, MODEL_CARD), "w") as f:
        f.write(pipeline_card(record, source))


def write_model_card(directory: str, record: dict, lora: bool = False) -> None:
    with open(os.path.join(directory, MODEL_CARD), "w") as f:
        f.write(model_card(record, lora))
