"""What a run's data were when it was saved, so that a resumed run refuses data changed under it.

A run's prompts and real samples are pure functions of (seed, iteration) over its data set
(``PromptSampler``, ``RealSampler``), so the same ``data.path`` / ``data.real_path`` re-encoded or
recollected between two starts of one run (more prompts, another encoder, other pairs) changes every
later epoch's order and rows: the run would go on as if nothing happened, neither continuing its data
nor starting anew. Each checkpoint records the data's identity (``trainer_state.json``'s ``data``:
the prompt set's row count and fingerprint, ``ode_pairs.prompts_identity``, and the ODE pairs'
manifest shard list hashed: names, rows and SHA-256s), and a resume compares it with the data there
now, in one line, before anything is built. Checkpoints from before record none and are not compared.
"""

from __future__ import annotations

import hashlib
import json
import os

from adm_megatron.config import Config, ConfigError
from adm_megatron.data.ode_pairs import MANIFEST, prompts_identity
from adm_megatron.json_file import read_json_object


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
