"""Checks of a run config against its teacher and world size, before any process group exists.

Each failure is a one-line ``ConfigError`` naming the key and the numbers: parallel layouts the
world or the architecture cannot take (heads or tokens not divisible by TP / CP), latent sizes the
patching cannot take, embeddings that do not fit the teacher, features this machine lacks (TE, an
attention backend, FP8, a GPU for nsys profiling), a profiled rank outside the world, a truncated
teacher weights file, samples asked of a pipeline without a VAE, and on a GPU a run the
memory planner says does not fit the card or the node's host memory (``memory/preflight.py``), and
teacher ODE pairs (``data.real_path``) that are not the run's.

``validate_run`` checks a training run; ``validate_collection`` only what ``collect-ode`` reads of
the same config (the teacher, layout, data and kernel options), so that a training config collects
its pairs at any world size (its optimizer sharding, heads or pairs do not matter there).
"""

from __future__ import annotations

import os

import torch

from adm_megatron.config import METHOD_KEYS, NETWORKS, Config, ConfigError
from adm_megatron.models.diffusers_files import check_diffusers_weights
from adm_megatron.hub_cache import not_found_hint
from adm_megatron.models.generator_source import not_a_generator_hint
from adm_megatron.models.kernel_options import check_kernel_options
from adm_megatron.data.batch_layout import microbatches_for
from adm_megatron.data.prompt_fit import check_prompt_embeddings
from adm_megatron.models.specs import transformer_engine_available
from adm_megatron.train.profiling import check_profile
from adm_megatron.train.teacher import TeacherSource


def data_parallel_size(config: Config, world_size: int) -> int:
    """``config``'s data-parallel size on ``world_size`` ranks; a one-line ``ConfigError`` when the
    world does not divide into tensor x context parallel groups (checked before anything else that
    needs the size, a resumed run's global batch included)."""
    tp, cp = config.parallel.tensor_parallel, config.parallel.context_parallel
    if world_size % (tp * cp):
        sizes = [f"parallel.tensor_parallel={tp}", f"parallel.context_parallel={cp}"]
        if tp == 1:  # led by the one set away from 1: where it was set is what the message names
            sizes.reverse()
        raise ConfigError(f"{' x '.join(sizes)}: the world size {world_size} is not divisible by {tp * cp}")
    return world_size // (tp * cp)


def validate_collection(config: Config, teacher: TeacherSource, world_size: int) -> None:
    """The keys ``collect-ode`` reads (``adm_megatron/ode_collection.py``): the teacher and its weights,
    the TP / CP layout against its heads and tokens, the data (latent size, prompt embeddings) and the
    kernel options it runs the teacher with. Training's own keys (optimizers, heads, samples,
    ``data.real_path``, ...) are :func:`validate_run`'s: a training config collects as it is."""
    arch = teacher.arch
    tp = config.parallel.tensor_parallel
    data_parallel_size(config, world_size)
    if arch.num_attention_heads % tp:
        raise ConfigError(
            f"parallel.tensor_parallel={tp}: the teacher's {arch.num_attention_heads} attention "
            "heads are not divisible by it"
        )
    teacher.family.check_run(arch, config)
    if teacher.kind == "diffusers":
        try:
            check_diffusers_weights(teacher.path)
        except (OSError, ValueError) as err:
            raise ConfigError(f"model.teacher={config.model.teacher!r}: {err}") from None
    if config.model.impl == "te" and not transformer_engine_available():
        raise ConfigError("model.impl=te: Transformer Engine with CUDA is not available here; use auto or local")
    try:
        check_kernel_options(config.model, arch.attention_head_dim)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    check_prompt_embeddings(config, teacher.family, arch)


def validate_run(config: Config, teacher: TeacherSource, world_size: int) -> None:
    """A training run: :func:`validate_collection`'s checks and those of every key training reads."""
    arch = teacher.arch
    tp, cp = config.parallel.tensor_parallel, config.parallel.context_parallel
    dp = data_parallel_size(config, world_size)
    microbatches_for(config.data.global_batch_size, config.data.batch_size, dp)
    check_profile(config.logging.profile, world_size, torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    for name in NETWORKS:
        if getattr(config.optim, name).shard_over_dp and dp == 1:
            raise ConfigError(
                f"optim.{name}.shard_over_dp=true: data parallel is 1 (world {world_size} / tensor_parallel "
                f"{tp} / context_parallel {cp}); there is nothing to shard over: set it false"
            )
    validate_collection(config, teacher, world_size)
    timesteps, d = teacher.schedule().num_train_timesteps, config.distill
    if not d.generator_steps <= timesteps:
        raise ConfigError(f"distill.generator_steps={d.generator_steps}: the teacher's schedule has {timesteps} "
                          "timesteps; expected at most that many steps")
    if d.method == "adm" and not 0 < d.delta_t < timesteps:
        raise ConfigError(f"distill.delta_t={d.delta_t}: expected 0 < delta_t < {timesteps} (the teacher's "
                          "schedule's timesteps)")
    if config.distill.head_every > arch.num_layers:
        raise ConfigError(
            f"distill.head_every={config.distill.head_every}: the teacher has only {arch.num_layers} blocks"
        )
    if config.train.num_samples > 0 and teacher.pipeline_dir:
        vae = os.path.join(teacher.pipeline_dir, "vae", "config.json")
        if not os.path.isfile(vae):
            raise ConfigError(
                f"train.num_samples={config.train.num_samples}: the pipeline {teacher.pipeline_dir} has no "
                f"VAE ({vae} not found) to render samples; set train.num_samples=0 or model.pipeline"
            )
    if config.train.sample_every and not (config.train.num_samples and teacher.pipeline_dir):
        raise ConfigError(
            f"train.sample_every={config.train.sample_every}: renders train.num_samples={config.train.num_samples} "
            f"samples with the pipeline's VAE ({'pipeline ' + teacher.pipeline_dir if teacher.pipeline_dir else 'none: set model.pipeline'}); "
            "set train.num_samples > 0, or train.sample_every=0"
        )
    if config.train.num_samples and teacher.pipeline_dir and teacher.family.decode_images is None:
        raise ConfigError(f"train.num_samples={config.train.num_samples}: the {teacher.family.name} family has no "
                          "decode (ModelFamily.decode_images) to render samples with; set train.num_samples=0")
    if config.model.generator_init:
        _check_generator_init(config.model.generator_init, teacher)
    if config.model.dtype == "bf16" and not torch.cuda.is_available():
        raise ConfigError("model.dtype=bf16: BF16 autocast needs a GPU here; use fp32 on CPU")
    from adm_megatron.memory import preflight

    preflight.check_offload_can_pin(config)
    card = preflight.this_gpu()
    if config.train.memory_check and card is not None and "memory-plan" in teacher.family.tools:
        preflight.check_run_fits(config, world_size, card[1], source=f"the {card[0]}",
                                 host_gib=preflight.host_memory_gib(), ranks_per_node=preflight.ranks_on_this_node(world_size))
    if config.data.real_path and config.distill.method in METHOD_KEYS["data.real_path"]:  # else only warned of
        _check_real_samples(config, teacher)
    if config.distill.method == "adp" and config.distill.pixel_weight > 0:
        _check_pixel_branch(config, teacher)


def _check_pixel_branch(config: Config, teacher: TeacherSource) -> None:
    """ADP's pixel discriminator needs a family that says how its pipeline decodes, the pipeline's VAE
    of that family's class, and a local encoder with the layers asked."""
    from transformers import AutoConfig

    from adm_megatron.families.registry import read_model_config

    d = config.distill
    try:
        family = teacher.family.require("pixel-discriminator", f"distill.pixel_weight={d.pixel_weight}")
    except ValueError as err:
        raise ConfigError(f"{err}; set distill.pixel_weight=0") from None
    vae = os.path.join(teacher.pipeline_dir or "", "vae", "config.json")
    if not teacher.pipeline_dir or not os.path.isfile(vae):
        raise ConfigError(f"distill.pixel_weight={d.pixel_weight}: the pixel discriminator decodes with the "
                          f"pipeline's VAE, and {vae} is not there; set model.pipeline or distill.pixel_weight=0")
    try:
        found_vae = read_model_config(os.path.dirname(vae)).get("_class_name")
    except ValueError as err:
        raise ConfigError(str(err)) from None
    if found_vae != family.vae_class:
        raise ConfigError(f"{vae}: a {found_vae!r} VAE; the {family.name} pixel discriminator decodes with "
                          f"{family.vae_class!r}")
    path = d.pixel_encoder_path
    if not os.path.isdir(path):  # a repo id in the hub cache is its snapshot by now (config.MODEL_DIR_KEYS)
        raise ConfigError(f"distill.pixel_encoder_path={path!r}: directory not found{not_found_hint(path)} (a "
                          f"local transformers {d.pixel_encoder} model directory)")
    try:
        found = AutoConfig.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError) as err:
        raise ConfigError(f"distill.pixel_encoder_path={path!r}: not a local transformers model directory "
                          f"({str(err).splitlines()[0]})") from None
    found = getattr(found, "vision_config", found)  # a full SamModel checkpoint holds its vision config
    expected = {"sam": "sam_vision_model", "dinov2": "dinov2"}[d.pixel_encoder]
    if found.model_type != expected:
        raise ConfigError(f"distill.pixel_encoder_path={path!r}: a {found.model_type!r} model, "
                          f"distill.pixel_encoder={d.pixel_encoder} expects {expected!r}")
    layers = found.num_hidden_layers
    if not d.pixel_layers or any(not 1 <= k <= layers for k in d.pixel_layers):
        raise ConfigError(f"distill.pixel_layers={d.pixel_layers}: the encoder at {path} has {layers} layers; "
                          f"expected a non-empty list of layers in 1..{layers}")


def _check_real_samples(config: Config, teacher: TeacherSource) -> None:
    """``data.real_path`` must be a finished ODE-pair directory collected for this run: the run's latent
    shape, teacher (architecture, and weights by their fingerprint), CFG range and prompt set (source,
    rows, embeddings by their fingerprint). Each mismatch is one line naming the manifest field and
    both values; a manifest from before the fingerprints and row count skips those comparisons, its
    pairs' prompt ids read instead (they must index the run's prompts). The weights of teachers of
    different kinds are not compared: a megatron checkpoint converted from the diffusers teacher
    holds the same weights in other files."""
    from adm_megatron.data.ode_pairs import OdePairs, prompts_identity, teacher_identity

    d = config.data
    key = f"data.real_path={d.real_path!r}"
    try:
        pairs = OdePairs(d.real_path)
    except (OSError, ValueError, KeyError) as err:
        message = str(err)  # OdePairs names the key itself when the directory is not one
        raise ConfigError(message if message.startswith("data.real_path=") else f"{key}: {message}") from None
    expected = teacher.family.latent_shape(teacher.arch, d.frames, d.height, d.width)
    if pairs.latent_shape != expected:
        dims = "data.frames, channels, data.height, data.width" if len(expected) == 4 else \
            "channels, data.height, data.width"
        raise ConfigError(f"{key}: latents are {list(pairs.latent_shape)}, the run samples {list(expected)} ({dims})")

    def refuse(recorded: str, run: str, what: str, remedy: str) -> ConfigError:
        return ConfigError(f"{key}: {recorded}, {run}: {what}; {remedy}, or recollect the pairs with this config "
                           "(adm-megatron collect-ode)")

    manifest = pairs.manifest
    collected, ours = manifest.get("teacher", {}), teacher_identity(teacher)
    theirs = f"set model.teacher to theirs ({collected.get('path')})"
    arch = collected.get("arch", {})
    differ = [k for k in sorted(arch) if k in ours["arch"] and arch[k] != ours["arch"][k]]
    if differ:
        raise refuse(f"manifest teacher.arch has {({k: arch[k] for k in differ})}",
                     f"model.teacher's {({k: ours['arch'][k] for k in differ})}",
                     "pairs of a teacher of another architecture", theirs)
    if "fingerprint" in collected and collected.get("kind") == ours["kind"] \
            and collected["fingerprint"] != ours["fingerprint"]:
        raise refuse(f"manifest teacher.fingerprint={collected['fingerprint']}",
                     f"model.teacher={config.model.teacher!r} has {ours['fingerprint']}",
                     "pairs of another teacher (other weights)", theirs)
    sampler = manifest.get("sampler", {})
    scale = list(config.distill.guidance_scale)
    if "guidance_scale" in sampler and sampler["guidance_scale"] != scale:
        raise refuse(f"manifest sampler.guidance_scale={sampler['guidance_scale']}",
                     f"the run's distill.guidance_scale={scale}", "pairs sampled at another CFG range than the run's "
                     "(which the exported generator's distillation.json records)",
                     f"set distill.guidance_scale={sampler['guidance_scale']}")
    prompts = manifest.get("prompts", {})
    if prompts.get("source") == "synthetic":
        back = (f"set data.source=synthetic, data.num_prompts={prompts.get('num_prompts')} and "
                f"seed={sampler.get('seed')}")
    else:
        back = f"set data.source=shards and data.path={prompts.get('path')!r}"
    if "source" in prompts and prompts["source"] != d.source:
        raise refuse(f"manifest prompts.source={prompts['source']!r}", f"the run's data.source={d.source!r}",
                     "pairs of other prompts", back)
    run = "the run's prompts (" + (f"data.path={d.path!r}" if d.source == "shards" else
                                   f"synthetic, data.num_prompts={d.num_prompts}, seed={config.seed}") + ")"
    mine = prompts_identity(teacher.text_source(d, config.seed))
    if "rows" in prompts:
        if prompts["rows"] != mine["rows"]:
            raise refuse(f"manifest prompts.rows={prompts['rows']}", f"{run} have {mine['rows']} rows",
                         "pairs of another prompt set", back)
    else:  # an older manifest: its pairs' prompt ids (small) must at least index the run's prompts
        last = int(pairs.get(torch.arange(len(pairs)), "prompt_id").max())
        if last >= mine["rows"]:
            raise refuse(f"its pairs' prompt ids go up to {last}", f"{run} have {mine['rows']} rows",
                         "pairs of another prompt set", back)
    if "fingerprint" in prompts and prompts["fingerprint"] != mine["fingerprint"]:
        raise refuse(f"manifest prompts.fingerprint={prompts['fingerprint']}", f"{run} have {mine['fingerprint']}",
                     "pairs of other prompt embeddings (re-encoded since?)", back)


def _check_generator_init(path: str, teacher: TeacherSource) -> None:
    """``model.generator_init`` must be a diffusers transformer of the teacher's family and shape."""
    arch, family = teacher.arch, teacher.family
    key = f"model.generator_init={path!r}"
    if not os.path.isdir(path):
        raise ConfigError(f"{key}: directory not found{not_found_hint(path)}")
    try:
        found = family.arch_from_pretrained_dir(path)
    except (OSError, ValueError) as err:
        hint = not_a_generator_hint(path)
        raise ConfigError(f"{key}: " + (hint or f"not a diffusers {' / '.join(family.diffusers_classes)} directory "
                                                f"({err})")) from None
    try:
        check_diffusers_weights(path)
    except (OSError, ValueError) as err:
        raise ConfigError(f"{key}: {err}") from None
    if found != arch:
        differ = sorted(k for k, v in vars(found).items() if getattr(arch, k) != v)
        raise ConfigError(f"{key}: architecture differs from the teacher's ({', '.join(differ)})")
