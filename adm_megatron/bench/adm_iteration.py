"""The ADM iteration as the trainer runs it, timed phase by phase with its network evaluations.

A :class:`~adm_megatron.train.trainer.Trainer` is built from a teacher transformer directory and a
pipeline directory that holds only the scheduler (written here with the model family's reference
scheduler unless the model came as a whole pipeline), at the benchmark's latent size, on synthetic prompts
unless the method reads teacher ODE pairs (:func:`synthetic_prompts`). Its
``PhaseRunner.run`` is wrapped so each phase is synchronised, timed and labelled for the trainer's
own :class:`~adm_megatron.bench.counting.EvalCounter` (``Trainer.flops``); ``train_iteration`` is then
called as in training. Everything else (the config, overrides, the method) is the trainer's own.
"""

from __future__ import annotations

import json
import os
import statistics
import time

import torch

from adm_megatron.bench.checkpoint_pause import measure_checkpoint_pause
from adm_megatron.bench.counting import EvalCounter
from adm_megatron.bench.kernel_profile import profile_call
from adm_megatron.bench.timing import peak_memory_bytes, reset_peak_memory, synchronize
from adm_megatron.config import load_config
from adm_megatron.lora.adapters import lora_adapters


def write_scheduler_pipeline(out_dir: str, family) -> str:
    """A pipeline directory of ``family`` with only ``model_index.json`` and its reference scheduler
    (what the trainer reads of a pipeline when it renders no samples)."""
    import diffusers

    config = dict(family.reference_scheduler)
    scheduler = getattr(diffusers, config.pop("_class_name"))
    scheduler(**config).save_pretrained(os.path.join(out_dir, "scheduler"))
    with open(os.path.join(out_dir, "model_index.json"), "w") as f:
        json.dump({"_class_name": family.pipeline_classes[0],
                   "scheduler": ["diffusers", scheduler.__name__],
                   "transformer": ["diffusers", family.diffusers_classes[0]]}, f)
    return out_dir


def trainer_overrides(teacher: str, pipeline: str, output_dir: str, shape, dtype: str) -> list[str]:
    """The run the benchmark times: the latent shape, no logging or export (its prompts:
    :func:`synthetic_prompts`)."""
    return [
        f"model.teacher={teacher}", f"model.pipeline={pipeline}", f"output_dir={output_dir}",
        f"model.dtype={dtype}", f"data.batch_size={shape.batch}", f"data.frames={shape.frames}",
        f"data.height={shape.height}", f"data.width={shape.width}", "train.export=false", "train.num_samples=0",
        "logging.wandb_mode=disabled", "logging.progress=false",
    ]


def synthetic_prompts(batch: int) -> list[str]:
    """The prompts of a benchmarked run whose method reads no teacher ODE pairs: synthetic, so no
    prompt embeddings are needed. A method that reads pairs (dmd2, adp) keeps the run's own prompts:
    its pairs (data.real_path) were collected on them, and the trainer refuses pairs of other prompts."""
    return ["data.source=synthetic", f"data.num_prompts={max(4, batch)}"]


class TimedPhases:
    """Wraps a trainer's ``phases.run``: synchronised seconds and peak memory per phase, and the
    phase name as the counter's label while it runs."""

    def __init__(self, trainer, counter: EvalCounter, device: torch.device):
        self.run = trainer.phases.run
        self.counter = counter
        self.device = device
        self.last: dict[str, dict] = {}
        trainer.phases.run = self

    def __call__(self, phase: str, *args, **kwargs):
        synchronize(self.device)
        reset_peak_memory(self.device)
        self.counter.phase = phase
        start = time.perf_counter()
        try:
            result = self.run(phase, *args, **kwargs)
            synchronize(self.device)
        finally:
            self.counter.phase = "outside phases"
        self.last[phase] = {"seconds": time.perf_counter() - start,
                            "peak_memory_bytes": peak_memory_bytes(self.device)}
        return result


def lora_settings(generator) -> dict | None:
    """A LoRA generator's adapters as the result records them (rank, alpha, target modules, adapted
    layers, trainable parameters whole); None for a full fine-tune."""
    adapters = lora_adapters(generator)
    if adapters is None:
        return None
    c = adapters.config
    return {"rank": c.rank, "alpha": c.alpha, "target_modules": list(c.target_modules),
            "adapted_layers": len(adapters), "trainable_parameters": adapters.full_numel()}


def measure_iterations(config_file: str | None, overrides: list[str], repeats: int, warmup: int,
                       checkpoint_repeats: int = 0, profile: bool = False) -> dict:
    """Build the trainer and time ``warmup`` + ``repeats`` iterations. Returns per phase (and
    ``iteration``): per-repeat seconds and FLOPs, the median seconds, the peak memory, and the
    network evaluations of the measured iterations (per iteration, averaged); the LoRA generator's
    settings (``lora_settings``; None for a full fine-tune); with ``profile``, one more iteration
    under ``torch.profiler`` by kernel kind (``kernel_profile.py``: its events' time against its wall
    time says how much of the iteration the device was idle; else None); then, with
    ``checkpoint_repeats``, how long a checkpoint stops training, synchronous and in the background
    (``checkpoint_pause.py``; else None)."""
    from adm_megatron.train.trainer import Trainer

    trainer = Trainer(load_config(config_file, overrides))
    counter = trainer.flops  # the trainer counts every network call; the phases label them here
    device = trainer.device
    timer = TimedPhases(trainer, counter, device)
    for iteration in range(warmup):
        trainer.train_iteration(iteration)
    rows: dict[str, dict] = {}
    evals: dict = {}
    for iteration in range(warmup, warmup + repeats):
        counter.reset()
        timer.last.clear()
        synchronize(device)
        reset_peak_memory(device)
        start = time.perf_counter()
        trainer.train_iteration(iteration)
        synchronize(device)
        whole = {"seconds": time.perf_counter() - start, "peak_memory_bytes": peak_memory_bytes(device),
                 "flops": sum(t.flops for t in counter.tallies.values())}
        for phase, timing in [*timer.last.items(), ("iteration", whole)]:
            row = rows.setdefault(phase, {"seconds": [], "flops": [], "peak_memory_bytes": None})
            row["seconds"].append(timing["seconds"])
            row["flops"].append(whole["flops"] if phase == "iteration" else counter.phase_flops(phase))
            if timing["peak_memory_bytes"] is not None:
                row["peak_memory_bytes"] = max(row["peak_memory_bytes"] or 0, timing["peak_memory_bytes"])
        for phase, roles in counter.per_phase().items():
            for role, tally in roles.items():
                slot = evals.setdefault(phase, {}).setdefault(role, {"calls": 0, "samples": 0})
                slot["calls"] += tally["calls"] / repeats
                slot["samples"] += tally["samples"] / repeats
    iteration_profile = profile_call(lambda: trainer.train_iteration(warmup + repeats), device) if profile else None
    checkpoint = measure_checkpoint_pause(trainer, checkpoint_repeats) if checkpoint_repeats else None
    for row in rows.values():
        row["median_s"] = statistics.median(row["seconds"])
        row["tflops_per_s"] = statistics.median(f / s for f, s in zip(row["flops"], row["seconds"])) / 1e12
    return {"phases": rows, "evaluations_per_iteration": evals, "method": trainer.config.distill.method,
            "generator_steps": trainer.config.distill.generator_steps,
            "head_every": trainer.config.distill.head_every, "model_dtype": trainer.config.model.dtype,
            "lora": lora_settings(trainer.generator), "checkpoint": checkpoint, "profile_iteration": iteration_profile}
