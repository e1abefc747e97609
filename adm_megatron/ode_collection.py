"""Collect teacher ODE pairs: the teacher's multi-step PF-ODE with CFG from stored noise to x_0.

``collect_ode_pairs(config, out_dir, num_pairs, ...)`` builds the teacher exactly as a training run
of ``config`` would (same layout, TP / CP inside a rank), samples pairs shard by shard
(``data/ode_pairs.py`` says what a shard holds and how it is seeded) and writes each finished shard
atomically; data-parallel rank r takes shards r, r + DP, ... and its TP / CP rank 0 writes them.
Shards already on disk are skipped, so a killed collection resumes where it stopped and never
duplicates or misses a pair; a shard lost or cut since (a partial copy) is collected again, also in
a finished collection, and with ``verify`` one whose SHA-256 differs from the manifest's.
``collection.json`` (the settings, written first) must match on resume; ``manifest.json`` (with
each shard's SHA-256) is written last, once every shard exists, keeping a finished collection's
entries of the shards not collected again (a copy corrupted since stays one that ``verify`` finds);
``recollecting.json`` names the shards a repair collects again until its manifest is written.
One collection at a time writes an ``out_dir`` (the run lock, ``parallel/run_lock.py``)."""

from __future__ import annotations

import logging
import math
import os
import time

import torch
import torch.distributed as dist
from tqdm import tqdm

from adm_megatron.config import Config, ConfigError
from adm_megatron.data.ode_pairs import (FORMAT, MANIFEST, VERSION, prompts_identity, shard_generator, shard_name,
                                         sha256, teacher_identity, write_shard)
from adm_megatron.diffusion.guidance import cfg_model_output
from adm_megatron.diffusion.rollout import rollout
from adm_megatron.json_file import read_json_object, write_json_atomically
from adm_megatron.parallel.run_lock import LOCK_FILE

logger = logging.getLogger("adm_megatron")
SETTINGS = "collection.json"
# the shards a repair of a finished collection collects again, written before it does: their manifest
# entries are stale from then on, also for a later run when this one is killed after writing some
RECOLLECTING = "recollecting.json"


def sample_pairs(teacher_fn, schedule, x_T: torch.Tensor, text, negative, scale: torch.Tensor,
                 steps: int) -> torch.Tensor:
    """x_0 from x_T by the teacher's ``steps``-step PF-ODE with per-sample CFG ``scale``; ``text`` /
    ``negative``: embeddings, or ``TextCondition``s for families with a pooled embedding."""
    def guided(x_t, t, cond):
        return cfg_model_output(teacher_fn, x_t, t, cond, negative, scale)

    return rollout(guided, schedule, x_T, text, schedule.inference_timesteps(steps))


def shard_inputs(index: int, rows: int, shard_size: int, latent_shape: tuple, num_prompts: int, seed: int,
                 scale_range: tuple[float, float]) -> dict[str, torch.Tensor]:
    """Shard ``index``'s starting noise, prompt ids and CFG scales: a pure function of its arguments."""
    g = shard_generator(seed, index)
    x_T = torch.randn((rows, *latent_shape), generator=g)
    lo, hi = scale_range
    scale = lo + (hi - lo) * torch.rand(rows, generator=g)
    prompt_id = torch.arange(index * shard_size, index * shard_size + rows) % num_prompts
    return {"x_T": x_T, "prompt_id": prompt_id, "guidance_scale": scale}


def _settings(config: Config, source, text_source, num_pairs: int, shard_size: int, steps: int,
              batch_size: int) -> dict:
    d = config.data
    return {
        "format": FORMAT, "version": VERSION, "num_pairs": num_pairs, "shard_size": shard_size,
        "latent_shape": list(source.family.latent_shape(source.arch, d.frames, d.height, d.width)),
        "dtype": "float32",
        # the batch too: the teacher's kernels round a batch of 3 and one of 4 apart (x_0 by 4e-6)
        "sampler": {"kind": "pf-ode (DDIM / Euler), trailing", "steps": steps, "batch_size": batch_size,
                    "guidance_scale": list(config.distill.guidance_scale), "seed": config.seed},
        "teacher": {"path": os.path.abspath(config.model.teacher), **teacher_identity(source)},
        "prompts": {"source": d.source, "path": os.path.abspath(d.path) if d.path else "",
                    "num_prompts": d.num_prompts if d.source == "synthetic" else None,
                    **prompts_identity(text_source)},
    }


def _differences(there: dict, now: dict, prefix: str = "") -> list[str]:
    """``key: <there> there, <now> now`` for each (dotted) key whose value differs between two settings."""
    out = []
    for key in sorted(set(there) | set(now)):
        a, b = there.get(key, "absent"), now.get(key, "absent")
        if isinstance(a, dict) and isinstance(b, dict):
            out += _differences(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append(f"{prefix}{key}: {a!r} there, {b!r} now")
    return out


def _damaged_shards(out_dir: str, settings: dict) -> dict[str, str]:
    """The collection's shard files that are missing or not whole (a cut copy: shorter than their
    safetensors header says; headers only), each with what is wrong."""
    from adm_megatron.data.safetensors_rows import check_safetensors_file

    damaged = {}
    for i in range(math.ceil(settings["num_pairs"] / settings["shard_size"])):
        path = os.path.join(out_dir, shard_name(i))
        if not os.path.isfile(path):
            damaged[path] = "missing"
            continue
        try:
            check_safetensors_file(path)
        except ValueError as err:
            damaged[path] = str(err).removeprefix(f"{path}: ")
    return damaged


def _check_out_dir(out_dir: str, settings: dict) -> bool:
    """True when the collection is already finished: its manifest and every shard whole; a finished
    one whose shards were lost or cut since is collected again, those shards only. A one-line error
    when out_dir can't be used."""
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise ConfigError(f"--out {out_dir!r}: exists and is not a directory")
    path = os.path.join(out_dir, SETTINGS)
    if os.path.isfile(path):
        try:
            previous = read_json_object(path)
        except ValueError as err:
            raise ConfigError(f"--out {out_dir!r}: {err}; use a new directory") from None
        differ = _differences(previous, settings)
        if differ:
            raise ConfigError(f"--out {out_dir!r}: holds a collection with other settings ({'; '.join(differ)}); "
                              "use a new directory")
    elif os.path.isdir(out_dir) and set(os.listdir(out_dir)) - {LOCK_FILE}:  # the lock: a collection killed at once
        raise ConfigError(f"--out {out_dir!r}: not empty and not an ODE-pair collection")
    manifest = os.path.join(out_dir, MANIFEST)
    if not os.path.isfile(manifest):
        return False
    try:
        read_json_object(manifest)
    except ValueError as err:  # written last, from the shards: written again
        logger.warning("%s; writing it again", err)
        return False
    damaged = _damaged_shards(out_dir, settings)
    if damaged:
        logger.warning("%s: a finished collection, but %d shards are missing or cut (%s); collecting them again",
                       out_dir, len(damaged), "; ".join(f"{os.path.basename(p)}: {why}" for p, why in
                                                        list(damaged.items())[:3]))
    return not damaged


def _recorded_shards(out_dir: str) -> dict[str, dict]:
    """The manifest's entry (file, rows, SHA-256) of each shard, by file name; none without a readable
    manifest (a collection never finished, or a cut one, written again: its shards hashed from disk)."""
    path = os.path.join(out_dir, MANIFEST)
    if not os.path.isfile(path):
        return {}
    try:
        shards = read_json_object(path)["shards"]
    except ValueError:  # warned of by _check_out_dir
        return {}
    return {s["file"]: s for s in shards}


def _record_recollection(out_dir: str, n_shards: int, recorded: dict[str, dict]) -> None:
    """Rank 0, before a repair collects the missing shards of a finished collection: add them to
    ``RECOLLECTING`` (with those of an earlier repair that was killed), so that a shard written
    again is hashed from disk, never given the manifest's entry of the copy it replaced (the teacher
    on other hardware writes other bytes: --verify then called the new shard corrupted)."""
    path = os.path.join(out_dir, RECOLLECTING)
    earlier = read_json_object(path)["shards"] if os.path.isfile(path) else []
    missing = [shard_name(i) for i in range(n_shards) if not os.path.isfile(os.path.join(out_dir, shard_name(i)))]
    pending = sorted(set(earlier) | {name for name in missing if name in recorded})
    if pending != earlier:
        write_json_atomically(path, {"shards": pending})


def _still_recorded(out_dir: str, recorded: dict[str, dict]) -> dict[str, dict]:
    """``recorded`` without the entries of shards collected again since (``RECOLLECTING``)."""
    path = os.path.join(out_dir, RECOLLECTING)
    if not os.path.isfile(path):
        return recorded
    stale = set(read_json_object(path)["shards"])
    return {name: entry for name, entry in recorded.items() if name not in stale}


def _verify_shards(out_dir: str, shards, recorded: dict[str, dict]) -> None:
    """Remove those of ``shards`` (indices) of a finished collection whose SHA-256 differs from the
    manifest's (``recorded``), with a warning: they are collected again."""
    for i in shards:
        path = os.path.join(out_dir, shard_name(i))
        digest, expected = sha256(path), recorded.get(shard_name(i), {}).get("sha256")
        if digest != expected:
            logger.warning("%s: SHA-256 %s, the manifest says %s (a corrupted copy?); collecting it again", path,
                           digest, expected)
            os.remove(path)


def _shard_entry(out_dir: str, index: int, rows: int, recorded: dict | None) -> dict:
    """Shard ``index``'s manifest entry: the one ``recorded`` for it, else its file hashed."""
    if recorded is not None:
        return recorded
    return {"file": shard_name(index), "rows": rows, "sha256": sha256(os.path.join(out_dir, shard_name(index)))}


def collect_ode_pairs(config: Config, out_dir: str, num_pairs: int, shard_size: int = 256,
                      steps: int = 50, batch_size: int = 64, progress: bool = True, verify: bool = False) -> dict:
    """Collect (or finish collecting) ``num_pairs`` pairs into ``out_dir``; returns the manifest.
    ``verify``: a finished collection's shards are checked against the manifest's SHA-256s (each
    data-parallel rank reads its own), and those that differ (a corrupted copy) are collected again."""
    from adm_megatron.algorithms.networks import DiTFunction, text_condition
    from adm_megatron.models import kernel_options
    from adm_megatron.parallel import initialize_parallel, launch_env
    from adm_megatron.parallel.run_lock import RunLock
    from adm_megatron.parallel.shared_dir import check_shared_dir
    from adm_megatron.parallel.startup import confirm_start
    from adm_megatron.train.same_config import check_same_config
    from adm_megatron.train.teacher import resolve_teacher
    from adm_megatron.train.validate import validate_collection

    if num_pairs < 1 or shard_size < 1 or steps < 1 or batch_size < 1:
        raise ConfigError(f"num_pairs={num_pairs}, shard_size={shard_size}, steps={steps}, "
                          f"batch_size={batch_size}: each must be >= 1")
    source = resolve_teacher(config.model.teacher, config.model.pipeline)
    validate_collection(config, source, launch_env().world_size)
    timesteps = source.schedule().num_train_timesteps
    if steps > timesteps:
        raise ConfigError(f"steps={steps}: the teacher's schedule has {timesteps} timesteps; expected at most that many")
    text_source = source.text_source(config.data, config.seed)
    settings = _settings(config, source, text_source, num_pairs, shard_size, steps, batch_size)
    finished = _check_out_dir(out_dir, settings)
    if finished and not verify:
        confirm_start(config.parallel.timeout_s)  # a rank that failed its checks waits for every rank
        return read_json_object(os.path.join(out_dir, MANIFEST))
    schedule = source.schedule()
    info = initialize_parallel(config.parallel.tensor_parallel, config.parallel.context_parallel, seed=config.seed,
                               timeout_s=config.parallel.timeout_s)
    check_same_config(config)  # every rank collects with the same teacher, prompts and settings
    check_shared_dir(out_dir, "--out")  # each data-parallel rank writes its shards there, rank 0 the manifest
    # one collection at a time in out_dir (the same job submitted twice): a second one's rank 0 removed
    # the first one's shards in the middle of their writing, as a killed run's leftovers
    lock = RunLock(out_dir, info.rank == 0, "--out", "collect-ode")
    n_shards = math.ceil(num_pairs / shard_size)
    writer = info.tp_rank == 0 and info.cp_rank == 0
    # read before anything is removed or written: the shards not collected again keep their entries
    recorded = _recorded_shards(out_dir)
    if finished and writer:
        _verify_shards(out_dir, range(info.dp_rank, n_shards, info.dp_size), recorded)
    if finished and dist.is_initialized():
        dist.barrier()  # every rank's corrupted shards removed before rank 0 looks for cut ones
    if info.rank == 0:
        os.makedirs(out_dir, exist_ok=True)
        write_json_atomically(os.path.join(out_dir, SETTINGS), settings)
        for name in os.listdir(out_dir):  # what a process killed mid-write left behind
            if name.startswith(".pairs-") and ".tmp-" in name:
                os.remove(os.path.join(out_dir, name))
        for path, why in _damaged_shards(out_dir, settings).items():  # cut copies: collected again below
            if why != "missing":
                os.remove(path)
        _record_recollection(out_dir, n_shards, recorded)
    if dist.is_initialized():
        dist.barrier()
    recorded = _still_recorded(out_dir, recorded)
    dtype = torch.float64 if config.model.dtype == "fp64" else torch.float32
    latent_shape = tuple(settings["latent_shape"])
    mine = [i for i in range(info.dp_rank, n_shards, info.dp_size)
            if not os.path.isfile(os.path.join(out_dir, shard_name(i)))]
    if mine:  # (the same on a data-parallel rank's TP / CP ranks) an intact collection verified builds no teacher
        teacher = source.build_models(1, sequence_parallel=config.model.sequence_parallel, impl=config.model.impl,
                                      params_dtype=dtype)[0].eval().requires_grad_(False)
        kernel_options.apply_kernel_options(teacher, config.model)  # attention backend, FP8, compile, as in train
        d = config.data
        fn = DiTFunction(teacher, source.family.positional_inputs(source.arch, d.frames, d.height, d.width,
                                                                  device=info.device))
    bar = tqdm(total=len(mine), desc="ode pairs", unit="shard", disable=not (progress and info.rank == 0))
    start, done = time.perf_counter(), 0
    for i in mine:
        rows = min(shard_size, num_pairs - i * shard_size)
        inputs = shard_inputs(i, rows, shard_size, latent_shape, len(text_source), config.seed,
                              config.distill.guidance_scale)
        outs = []
        for lo in range(0, rows, batch_size):
            part = slice(lo, lo + batch_size)
            ids = inputs["prompt_id"][part]
            text = text_source.get(ids)
            negative = text_source.negative().unsqueeze(0).expand_as(text)
            to = dict(device=info.device, dtype=dtype)
            pooled = negative_pooled = None
            if text_source.pooled_dim:
                pooled = text_source.get_pooled(ids).to(**to)
                negative_pooled = text_source.negative_pooled().unsqueeze(0).expand_as(pooled).to(**to)
            with torch.no_grad():
                outs.append(sample_pairs(fn, schedule, inputs["x_T"][part].to(**to),
                                         text_condition(text.to(**to), pooled),
                                         text_condition(negative.to(**to), negative_pooled),
                                         inputs["guidance_scale"][part].to(info.device), steps))
        if writer:
            write_shard(out_dir, i, {**inputs, "x_0": torch.cat(outs).float().cpu()})
        done += rows
        bar.update(1)
        bar.set_postfix(pairs_per_s=round(done / (time.perf_counter() - start), 2))
    bar.close()
    if mine:
        logger.info("rank %d: %d pairs in %.1fs (%.2f pairs/s)", info.rank, done, time.perf_counter() - start,
                    done / (time.perf_counter() - start))
    # each data-parallel rank's writer hashes its own shards (every rank hashing every shard read the
    # whole collection once per rank: 0.9 TB times the world size for 100,000 CogVideoX pairs); a shard
    # not collected again keeps the manifest's entry: hashed again, a copy corrupted in place since
    # would be recorded as good, and --verify could no longer find it
    entries = {i: _shard_entry(out_dir, i, min(shard_size, num_pairs - i * shard_size),
                               None if i in mine else recorded.get(shard_name(i)))
               for i in range(info.dp_rank, n_shards, info.dp_size)} if writer else {}
    if dist.is_initialized():
        shares = [None] * dist.get_world_size()
        dist.all_gather_object(shares, entries)
        entries = {i: entry for share in shares for i, entry in share.items()}
    manifest = {**settings, "shards": [entries[i] for i in range(n_shards)]}
    if info.rank == 0:
        write_json_atomically(os.path.join(out_dir, MANIFEST), manifest)
        if os.path.isfile(os.path.join(out_dir, RECOLLECTING)):
            os.remove(os.path.join(out_dir, RECOLLECTING))
    if dist.is_initialized():
        dist.barrier()
    lock.release()
    return manifest
