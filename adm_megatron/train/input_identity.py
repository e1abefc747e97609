"""What a run's inputs were when it was saved, so that a resumed run refuses inputs changed under it.

Data: a run's prompts and real samples are pure functions of (seed, iteration) over its data set
(``PromptSampler``, ``RealSampler``), so the same ``data.path`` / ``data.real_path`` re-encoded or
recollected between two starts of one run (more prompts, another encoder, other pairs) changes every
later epoch's order and rows: the run would go on as if nothing happened, neither continuing its data
nor starting anew. Each checkpoint records the data's identity (``trainer_state.json``'s ``data``:
the prompt set's row count and fingerprint, ``ode_pairs.prompts_identity``, and the ODE pairs'
manifest shard list hashed: names, rows and SHA-256s), and a resume compares it with the data there
now, in one line, before anything is built.

Frozen files: the teacher (the real score and the discriminator's backbone), its noise schedule,
``model.generator_init`` of a LoRA generator (its frozen base; a full generator's init is read at the
first start only, its later weights come from checkpoints) and ADP's pixel encoder and VAE are read
from their directories at every start, never from a checkpoint, so a directory replaced between two starts (a newer snapshot in the hub cache, a
re-converted checkpoint) would change the rest of the run silently. Each checkpoint records their
fingerprints (``adm_megatron/file_fingerprint.py``; ``trainer_state.json``'s ``weights``), a resume
compares them, and an exported generator's ``distillation.json``
carries them, so that sampling a LoRA generator can tell that the transformer under its adapters is
not the one they were trained on (``models/generator_source.py``). Checkpoints from before a record
have none and are not compared.
"""

from __future__ import annotations

import hashlib
import json
import os

from adm_megatron.config import Config, ConfigError
from adm_megatron.data.ode_pairs import MANIFEST, prompts_identity
from adm_megatron.file_fingerprint import directory_fingerprint
from adm_megatron.json_file import read_json_object
from adm_megatron.models.diffusers_files import transformer_fingerprint


def data_identity(config: Config, text_source) -> dict:
    """The run's data as a checkpoint records it: ``text_source`` its prompt set (a
    ``TextEmbeddingSource``), and ``data.real_path``'s pairs when it names any."""
    identity = {"prompts": prompts_identity(text_source)}
    if config.data.real_path:
        shards = read_json_object(os.path.join(config.data.real_path, MANIFEST))["shards"]
        identity["real"] = hashlib.sha256(json.dumps(shards, sort_keys=True).encode()).hexdigest()
    return identity


def check_same_data(saved: dict | None, now: dict, state_file: str, config: Config) -> None:
    """One-line ConfigError when the data a checkpoint was trained on (``saved``, None for a
    checkpoint from before the record) differ from the run's data now."""
    if not saved:
        return
    d = config.data
    remedy = "a run cannot change its data: restore them, or start a new run (a new output_dir)"
    if saved.get("prompts") != now["prompts"]:
        before, after = saved.get("prompts", {}), now["prompts"]
        where = f"data.path={d.path!r}" if d.source == "shards" else f"data.source={d.source}"
        raise ConfigError(
            f"{state_file}: the run was trained on {before.get('rows')} prompts (fingerprint "
            f"{str(before.get('fingerprint'))[:12]}), {where} now holds {after['rows']} (fingerprint "
            f"{after['fingerprint'][:12]}), re-encoded since; {remedy}")
    if saved.get("real") != now.get("real"):
        raise ConfigError(
            f"{state_file}: the run was trained on other ODE pairs than data.real_path={d.real_path!r} holds "
            f"now (its {MANIFEST} lists other shards: recollected since); {remedy}")


def weights_identity(config: Config, teacher_source) -> dict:
    """The fingerprints of the frozen files a run reads at every start: the teacher's weights
    (``teacher_source``, a ``TeacherSource``: a diffusers transformer's safetensors or a megatron
    checkpoint's shards, as ``teacher_kind`` says), its noise schedule (the pipeline's
    ``scheduler/``), ``model.generator_init``'s weights, and ADP's pixel branch (the pipeline's VAE and
    ``distill.pixel_encoder_path``); None where the run has none."""
    d, init, pipeline = config.distill, config.model.generator_init, teacher_source.pipeline_dir
    pixel = d.method == "adp" and d.pixel_weight > 0
    return {"teacher": teacher_source.weights_fingerprint(), "teacher_kind": teacher_source.kind,
            "schedule": directory_fingerprint(pipeline, [os.path.join(pipeline, "scheduler")]) if pipeline else None,
            "generator_init": transformer_fingerprint(init) if init else None,
            "pixel_encoder": directory_fingerprint(d.pixel_encoder_path) if pixel else None,
            "vae": directory_fingerprint(pipeline, [os.path.join(pipeline, "vae")]) if pixel else None}


# what a resume compares: record key -> what it is
_FROZEN = {"teacher": "the teacher's weights", "schedule": "the noise schedule (scheduler/)",
           "generator_init": "the generator's initial weights (a LoRA generator's frozen base)",
           "pixel_encoder": "the pixel encoder", "vae": "the VAE (vae/)"}


def _named(key: str, config: Config) -> str:
    """The config key and value naming the directory that ``weights_identity``'s ``key`` is of."""
    m = config.model
    if key == "pixel_encoder":
        return f"distill.pixel_encoder_path={config.distill.pixel_encoder_path!r}"
    if key == "generator_init":
        return f"model.generator_init={m.generator_init!r}"
    if key in ("schedule", "vae") and m.pipeline:
        return f"model.pipeline={m.pipeline!r}"
    return f"model.teacher={m.teacher!r}"


def check_same_weights(saved: dict | None, now: dict, state_file: str, config: Config) -> dict:
    """One-line ConfigError when a frozen input a checkpoint was trained with (``saved``: its
    ``weights`` record, None for a checkpoint from before it; keys it lacks are not compared) is not
    what its directory holds now. Returns the record the run goes on with: ``now``, but a full (not
    LoRA) generator's ``generator_init`` as saved -- its weights come from the checkpoint, the init
    was read at the first start only, so the directory re-exported since (stage 1 again, in place)
    changes nothing in the run and its record stays the init it was trained from."""
    record = dict(now)
    for key, what in _FROZEN.items():
        if not saved or key not in saved:
            continue
        if key == "generator_init" and config.model.lora is None:
            record[key] = saved[key]
        elif saved[key] != now[key]:
            raise ConfigError(
                f"{state_file}: the run was trained with {what} of fingerprint {str(saved[key])[:12]}, "
                f"{_named(key, config)} now has {str(now[key])[:12]} (its files changed since); a run cannot change "
                "them: restore them, or start a new run (a new output_dir)")
    return record
