"""``adm-megatron export``: the generator of a training checkpoint as the diffusers directory a
finished run exports, so an intermediate checkpoint of a long run can be sampled, evaluated or handed
over exactly as the end result would be.

The checkpoint (``checkpoints/iter_NNNNNNN``, or a run directory: its ``checkpoints/latest``) holds
the generator's raw weights in ``generator/`` and, for a run with ``train.ema_decay`` > 0, their EMA
in ``train_state/``; the run exports the EMA. ``weights='auto'`` does the same ('ema' when the run
keeps one, else 'raw'); 'raw' takes the trained weights. The EMA is read from ``train_state/`` alone
(megatron-core loads just the requested tensors, resharded to this layout), laid out like the
generator's parameters as the trainer saves it. The output is written as the trainer writes
``generator/`` (``train.export_lora`` for a LoRA generator), atomically, with its
``distillation.json`` (the checkpoint's iteration, and which weights).
"""

from __future__ import annotations

import os
import warnings

from adm_megatron.config import ConfigError, config_from_dict
from adm_megatron.convert.checkpoint import CheckpointError, check_output_dir, load_megatron_checkpoint, output_holds
from adm_megatron.convert.distillation_record import distillation_record
from adm_megatron.convert.pipeline_export import check_pipeline_output, pipeline_source, write_pipeline
from adm_megatron.lora.export import lora_export_dirs
from adm_megatron.train.checkpoint import STATE_FILE, check_outside_runs, read_training_state
from adm_megatron.train.checkpoint_files import check_whole, hold_checkpoint_from
from adm_megatron.train.ema import ParameterEMA
from adm_megatron.train.export import export_generator

WEIGHTS = ("auto", "ema", "raw")


def load_ema_into(generator, ckpt_dir: str, decay: float) -> None:
    """Collective: the generator's tracked weights replaced by the EMA saved in ``ckpt_dir/train_state``."""
    from megatron.core import dist_checkpointing

    ema = ParameterEMA(generator, decay)
    template = {"ema": ema.sharded_state_dict(generator.sharded_state_dict(prefix="generator."), "generator.")}
    with warnings.catch_warnings():  # megatron-core 0.16 still calls DCP's deprecated load_state_dict
        warnings.filterwarnings("ignore", message=".*load_state_dict. is deprecated", category=FutureWarning)
        loaded = dist_checkpointing.load(template, os.path.join(ckpt_dir, "train_state"))
    ema.load_sharded_state_dict(loaded["ema"])
    ema.copy_to(generator)


def export_checkpoint(path: str, out_dir: str, weights: str = "auto", overwrite: bool = False,
                      lora: str | None = None, pipeline_out: str | None = None) -> tuple[list[str], dict]:
    """Collective: export the generator of the checkpoint at ``path`` to ``out_dir``, and with
    ``pipeline_out`` also as the transformer of a whole copy of the run's pipeline there
    (``adm_megatron.convert.pipeline_export``); returns (the directories written: for a LoRA
    generator, as ``lora`` says (None: the run's ``train.export_lora``), ``out_dir`` merged and / or
    ``out_dir + "_lora"`` with the LoRA file, then ``pipeline_out``; the record written beside them).
    One-line ConfigError / CheckpointError for bad input, before any weight is read: an output that
    exists and is not empty (without ``overwrite``), or is or holds the checkpoint (or the pipeline)."""
    if weights not in WEIGHTS:
        raise ConfigError(f"--weights {weights}: expected one of {', '.join(WEIGHTS)}")
    with hold_checkpoint_from(path, "--checkpoint") as hold:  # the live run does not prune it meanwhile
        return _export(hold, out_dir, weights, overwrite, lora, pipeline_out)


def _export(hold, out_dir: str, weights: str, overwrite: bool, lora: str | None,
            pipeline_out: str | None) -> tuple[list[str], dict]:
    ckpt = hold.path
    check_whole(ckpt, "the newest whole one is {}")
    state = read_training_state(ckpt)
    config = config_from_dict(state["config"], os.path.join(ckpt, STATE_FILE))
    decay = config.train.ema_decay
    if weights == "ema" and decay == 0:
        raise ConfigError(f"{ckpt}: --weights ema: the run kept no EMA (train.ema_decay=0); use --weights raw")
    use_ema = decay > 0 and weights != "raw"
    if not os.path.isdir(os.path.join(ckpt, "generator")):
        raise ConfigError(f"{ckpt}: no generator/ in the checkpoint")
    if lora is not None and config.model.lora is None:
        raise ConfigError(f"--lora {lora}: {ckpt} is a full fine-tune's (model.lora is null); leave --lora out")
    lora = lora or config.train.export_lora
    outputs = list(lora_export_dirs(out_dir, lora).values()) if config.model.lora is not None else [out_dir]
    # what the run reads besides the checkpoint: an output in the teacher's pipeline (its transformer/,
    # with --overwrite) would replace the teacher that sampling and a resume read
    inputs = [ckpt, *(p for p in (config.model.teacher, config.model.pipeline, config.model.generator_init)
                      if p and os.path.isdir(p))]
    for output in outputs:
        check_outside_runs(output, "--out")  # first: it says why a run's own folders are out of bounds
        for source in inputs:
            check_output_dir(os.path.abspath(output), overwrite, source=source)
    if pipeline_out is not None:
        if config.model.lora is not None and lora == "adapter":
            raise ConfigError("--pipeline-out: the pipeline's transformer is the merged generator; export it too "
                              "(--lora merged or both)")
        pipeline = pipeline_source(config.model.teacher, config.model.pipeline)
        for output in outputs:  # one inside the other: the copy would copy itself, or be replaced
            relation = output_holds(pipeline_out, output) or output_holds(output, pipeline_out)
            if relation:
                raise CheckpointError(f"--pipeline-out {pipeline_out} and --out {output}: one {relation} the other; "
                                      "give them directories apart")
        check_pipeline_output(pipeline_out, overwrite, [*inputs, pipeline])
        check_outside_runs(pipeline_out, "--pipeline-out")

    generator = load_megatron_checkpoint(os.path.join(ckpt, "generator"))
    if use_ema:
        load_ema_into(generator, ckpt, decay)
    hold.check()  # all of it from the one checkpoint, before anything is written
    record = {**distillation_record(config, int(state["iteration"]), generator.arch, ema=use_ema,
                                    weights=state.get("weights")), "checkpoint": os.path.abspath(ckpt)}
    export_generator(generator, generator.arch, out_dir, lora_mode=lora, record=record)
    if pipeline_out is not None:
        outputs.append(write_pipeline(out_dir, record, pipeline, pipeline_out, overwrite))
    return outputs, record
