"""Run configuration: dataclasses, YAML loading, dotted command-line overrides, validation.

A run is described by one YAML file whose sections mirror the dataclasses below; ``key=value``
overrides use dotted names (``train.max_iterations=10``, ``distill.method=dmd2``) and YAML value
syntax. Unknown keys, wrong types and impossible settings each give a one-line ``ConfigError``
naming the file and the key, before any process group or model exists (``_check_fields`` here;
what needs the teacher or the world, ``adm_megatron.train.validate.validate_run``). So do
a file that cannot be read or is not YAML (the problem's line and column), a key given twice in one
mapping (PyYAML alone keeps the last), NaN or infinite numbers (refused as they are read: no field
takes them), and YAML 1.1's readings of unquoted ``off`` / ``yes`` / ``2024`` where a string is
expected (the message shows the value as written and how to quote it, or, for a key of fixed
values, which they are). An override given twice
takes the last, as in Hydra; an empty one (``model.generator_init=``) sets a string key whose
default is '' back to '' (``_clears``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import math
import re
import typing
from dataclasses import dataclass, field
from typing import Any, Callable

import yaml

from adm_megatron.hub_cache import local_dir


class ConfigError(ValueError):
    """A bad configuration: the message is one line naming the source, the key and the value."""


class _Mapping(dict):
    """A YAML mapping that keeps how each plain (unquoted) scalar value was written (``written``, by
    key), so a message can show ``off`` where YAML 1.1 made ``False`` of it."""

    written: dict[str, str | None]


class _Sequence(list):
    """A YAML sequence that keeps how each plain scalar item was written (``written``, by index)."""

    written: dict[int, str | None]


def _plain(node: yaml.Node) -> str | None:
    """A plain (unquoted) scalar's text as written, else None."""
    return node.value if isinstance(node, yaml.ScalarNode) and node.style is None else None


class _DuplicateKeyError(yaml.constructor.ConstructorError):
    """A key given twice in one mapping (PyYAML alone keeps the last one silently)."""


class _Loader(yaml.SafeLoader):
    """PyYAML's safe loader, refusing a key given twice in one mapping; its mappings and sequences
    keep how their plain scalars were written (``_Mapping``, ``_Sequence``)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        first: dict[Any, yaml.Mark] = {}
        for key_node, _ in node.value:
            if isinstance(key_node, yaml.ScalarNode) and key_node.tag != "tag:yaml.org,2002:merge":
                key = self.construct_object(key_node)
                if key in first:
                    raise _DuplicateKeyError(problem=f"duplicate key {key!r} (first at line {first[key].line + 1})",
                                             problem_mark=key_node.start_mark)
                first[key] = key_node.start_mark
        return super().construct_mapping(node, deep)

    def construct_yaml_map(self, node: yaml.MappingNode):
        data = _Mapping()
        yield data
        data.update(self.construct_mapping(node))
        data.written = {k.value: _plain(v) for k, v in node.value if isinstance(k, yaml.ScalarNode)}

    def construct_yaml_seq(self, node: yaml.SequenceNode):
        data = _Sequence()
        yield data
        data.extend(self.construct_sequence(node))
        data.written = {i: _plain(item) for i, item in enumerate(node.value)}


_Loader.add_constructor("tag:yaml.org,2002:map", _Loader.construct_yaml_map)
_Loader.add_constructor("tag:yaml.org,2002:seq", _Loader.construct_yaml_seq)


def _yaml_problem(err: yaml.YAMLError) -> str:
    """PyYAML's error in one line: the problem's line and column, what it is, and what it was in."""
    mark = getattr(err, "problem_mark", None)
    if mark is None:  # e.g. a ReaderError (a control character): its first line names the position
        return str(err).splitlines()[0]
    text = f"line {mark.line + 1}, column {mark.column + 1}: {err.problem}"
    start = getattr(err, "context_mark", None)
    if err.context and start is not None:
        text += f" ({err.context} at line {start.line + 1}, column {start.column + 1})"
    elif err.context:  # a scanner's context without a mark of its own (a tab where indentation goes)
        text += f" ({err.context})"
    return text


def _read_yaml(path: str) -> Any:
    """A config file's YAML; a file that cannot be read, is not UTF-8 or not YAML is a one-line ConfigError."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except OSError as err:  # a directory, no read permission
        raise ConfigError(f"{path}: cannot read the config file: {err.strerror}") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data.count(b"\n", 0, err.start) + 1
        raise ConfigError(f"{path}: not UTF-8 text (byte 0x{data[err.start]:02x} on line {line}); "
                          "save it as UTF-8") from None
    try:
        return yaml.load(text, _Loader)
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {_yaml_problem(err)}") from None


RECOMPUTE_MODES = ("none", "selective", "full")
RECOMPUTE_PHASES = ("fake_score", "generator", "discriminator")


@dataclass
class RecomputeConfig:
    """Activation recompute of each backbone, in each phase that runs it with grad: ``none``,
    ``selective`` (its core attention) or ``full`` (whole blocks), for every phase, or per phase as
    ``"generator:full,fake_score:none"`` (phases not named: none). ``model.recompute: true / false``
    or one mode sets all three networks."""

    teacher: str = "none"
    fake_score: str = "none"
    generator: str = "none"

    def shorthand(self, value: Any, key: str, source: str) -> None:
        if isinstance(value, bool):
            value = "full" if value else "none"
        if not isinstance(value, str) or value not in RECOMPUTE_MODES:
            raise ConfigError(f"{source}: {key}={value!r}: expected true, false, one of "
                              f"{', '.join(RECOMPUTE_MODES)}, or a mapping of teacher / fake_score / generator")
        for f in dataclasses.fields(self):
            setattr(self, f.name, value)

    def mode(self, network: str, phase: str) -> str:
        """The recompute of ``network`` in ``phase`` (the value is validated by ``parse_recompute``)."""
        return parse_recompute(getattr(self, network), f"model.recompute.{network}", "")[phase]


def parse_recompute(value: str, key: str, source: str) -> dict[str, str]:
    """``"full"`` or ``"generator:full,fake_score:none"`` -> {phase: mode}; one-line ConfigError."""
    if value in RECOMPUTE_MODES:
        return dict.fromkeys(RECOMPUTE_PHASES, value)
    modes = dict.fromkeys(RECOMPUTE_PHASES, "none")
    for item in value.split(","):
        phase, sep, mode = (part.strip() for part in item.partition(":"))
        if not sep or phase not in RECOMPUTE_PHASES or mode not in RECOMPUTE_MODES:
            raise ConfigError(
                f"{source}: {key}={value!r}: expected one of {', '.join(RECOMPUTE_MODES)} or PHASE:MODE[,...] "
                f"with PHASE among {', '.join(RECOMPUTE_PHASES)}"
            )
        modes[phase] = mode
    return modes


@dataclass
class LoraConfig:
    """LoRA adapters on the generator's tensor-parallel linears (``adm_megatron.lora``)."""

    rank: int = 16
    alpha: float = 16.0  # the adapter output is scaled by alpha / rank
    # diffusers module names (PEFT's matching: a name or a suffix after a dot)
    target_modules: list[str] = field(
        default_factory=lambda: ["to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2"]
    )


@dataclass
class ModelConfig:
    teacher: str = ""  # diffusers transformer dir, CogVideoX pipeline dir, or megatron checkpoint
    pipeline: str = ""  # pipeline dir (VAE, text encoder) for samples; default: teacher if a pipeline
    generator_init: str = ""  # diffusers transformer dir (e.g. an earlier run's generator/) to start G from
    impl: str = "auto"  # auto | local | te
    # the local spec's attention kernel: default (torch's choice) | auto (fastest, timed once per
    # shape) | flash | efficient | cudnn | math (torch SDPBackend) | te (the TE spec's), models/attention_backend.py
    attention_backend: str = "default"
    # FP8 (compute capability >= 8.9): null | hybrid | e4m3 (Transformer Engine's spec, with the
    # delayed-scaling recipe's options below, TE's DelayedScaling; models/fp8.py) | tensorwise | rowwise |
    # rowwise_with_gw_hp (torchao's dynamic scaling in the local spec's linears, one TP rank; models/fp8_torchao.py)
    fp8: str | None = None
    fp8_margin: int = 0
    fp8_amax_history_len: int = 1024
    fp8_amax_compute_algo: str = "max"  # max | most_recent
    sequence_parallel: bool = False
    recompute: RecomputeConfig = field(default_factory=RecomputeConfig)  # per network and phase
    # fp32 | bf16 (autocast on GPU; the frozen teacher is then held in bf16) | fp64 (exact checks on CPU)
    dtype: str = "fp32"
    # with dtype=bf16: the trainable networks' weights in bf16 too, fp32 main params in the optimizer
    bf16_params: bool = False
    # with bf16_params: gradients accumulated over micro-batches and reduced over DP in fp32 buffers
    # (Megatron-LM's and NeMo's bf16 default); false keeps them bf16, half the grad memory
    grad_reduce_in_fp32: bool = True
    lora: LoraConfig | None = None  # LoRA generator (only the adapters train); null: full fine-tune
    # none | blocks: torch.compile of each transformer block of every backbone (models/compile.py)
    compile: str = "none"


@dataclass
class ParallelConfig:
    tensor_parallel: int = 1
    context_parallel: int = 1
    timeout_s: float = 600.0  # process-group timeout: a dead rank makes the others exit after it
    # megatron DDP: reduce each bucket of gradients over data parallel as soon as the backward has
    # produced it, overlapping the backward's remaining compute (adm_megatron.train.grad_sync)
    overlap_grad_reduce: bool = False
    grad_bucket_size: int = 0  # elements per bucket with overlap; 0: megatron's max(4e7, 1e6 x DP)


@dataclass
class DataConfig:
    source: str = "synthetic"  # synthetic | shards
    path: str = ""  # text-embedding shards (tools/precompute_text_embeddings.py)
    num_prompts: int = 64  # synthetic source only
    batch_size: int = 1  # per data-parallel rank
    # rows per update over all ranks; 0: batch_size x data-parallel size. A multiple of that
    # runs global_batch_size / (batch_size x DP) micro-batches per update (gradient accumulation)
    global_batch_size: int = 0
    real_path: str = ""  # teacher ODE pairs (tools/collect_ode_pairs.py): dmd2's real samples, adp's data
    frames: int = 13  # latent frames
    height: int = 60  # latent height
    width: int = 90  # latent width


@dataclass
class DistillConfig:
    method: str = "adm"  # adm | dmd (plain DMD) | dmd2 (DMD2 as published) | adp (1-step pre-stage)
    generator_steps: int = 8
    delta_t: int = 16  # adm: the fake / teacher ODE step, in training timesteps (T/64)
    guidance_scale: tuple[float, float] = (5.0, 7.0)  # CFG scale range, drawn per sample
    ttur: int = 1  # generator and discriminator update every ttur-th iteration
    head_every: int = 3  # a discriminator head on every k-th block
    head_hidden: int = 256
    head_blocks: int = 2
    head_reduction: str = "sum"  # sum | mean over heads
    # ablation controls (adm): heads kept at their random start; no gradient through the fake step
    train_discriminator: bool = True
    fake_score_grad: bool = True
    # dmd / dmd2, defaults from DMD2's code (tianweiy/DMD2, SDXL scripts; see algorithms/dmd2.py)
    dmd_t_range: tuple[float, float] = (0.02, 0.98)  # DMD loss t range / T (min/max_step_percent)
    gan_weight: float = 5e-3  # dmd2: generator GAN term weight (gen_cls_loss_weight)
    cls_weight: float = 1e-2  # dmd2: classifier loss weight in the fake-score phase (guidance_cls_loss_weight)
    gan_t_max: float = 1.0  # dmd2 / adp: discriminator inputs noised to t < gan_t_max * T (dmd2's diffusion_gan_max_timestep)
    # adp (algorithms/adp.py): hinge losses of a latent (teacher backbone + head_* heads) and a pixel
    # discriminator (the VAE-decoded frames through a frozen vision encoder + 2D heads on its layers)
    latent_weight: float = 0.85  # λ1
    pixel_weight: float = 0.15  # λ2; 0 builds no pixel branch (no VAE decode, no encoder)
    pixel_encoder: str = "sam"  # sam (SamVisionModel) | dinov2 (Dinov2Model, the paper's ablation)
    pixel_encoder_path: str = ""  # a local transformers directory of that encoder
    pixel_layers: list[int] = field(default_factory=lambda: [3, 6, 9, 12])  # 1-based encoder layers
    # recompute the pixel branch in backward, block by block (the VAE decoder's blocks and the encoder's
    # layers keep only their inputs): far less memory for one more decode + encode per generator step
    pixel_recompute: bool = False
    # adp: the noise that re-noises the pair's x_0 and the generator's x0_hat to the latent
    # discriminator's t' (algorithms/adp.py): independent (a draw each), shared (one fresh draw for
    # both: a real / fake pair then differs only by alpha(t') (x_0 - x0_hat)), pair (the pair's own
    # x_T for both: each side lies on its RF line from x_T, so the discriminator sees which x_0 goes
    # with which x_T); docs/toy_study.md says what each changes
    renoise: str = "independent"
    # adp: the share of the generator's inputs put at pure noise (RF time s = 1: exactly where the
    # 1-step sampler starts) instead of the warp's draw. With a zero-terminal-SNR teacher (CogVideoX,
    # the toy) the warp lands there for about 5% of the inputs and the teacher-initialised output
    # there is the conditional mean whatever the noise (docs/toy_study.md); 0 is the paper's warp alone
    pure_noise_share: float = 0.0


# the keys only some methods read (build_algorithm in adm_megatron/train/trainer.py, the data and the
# LoRA export): set away from their defaults for another method they change nothing, which the trainer
# says at its start (a warning, not a refusal: one base config commonly serves several methods), but
# for REFUSED_ELSEWHERE
METHOD_KEYS: dict[str, tuple[str, ...]] = {
    "distill.delta_t": ("adm",), "distill.train_discriminator": ("adm",), "distill.fake_score_grad": ("adm",),
    "distill.dmd_t_range": ("dmd", "dmd2"), "distill.gan_weight": ("dmd2",), "distill.cls_weight": ("dmd2",),
    "distill.gan_t_max": ("dmd2", "adp"), "distill.latent_weight": ("adp",), "distill.pixel_weight": ("adp",),
    "distill.pixel_encoder": ("adp",), "distill.pixel_encoder_path": ("adp",), "distill.pixel_layers": ("adp",),
    "distill.pixel_recompute": ("adp",), "distill.renoise": ("adp",), "distill.pure_noise_share": ("adp",),
    "data.real_path": ("dmd2", "adp"),
}
# the keys only one data source reads (data.source): warned of, and free to change on a resume, under the other
SOURCE_KEYS: dict[str, tuple[str, ...]] = {"data.num_prompts": ("synthetic",), "data.path": ("shards",)}
# ADP's own settings of how its inputs are drawn: refused (not a warning) under another method
REFUSED_ELSEWHERE = ("distill.renoise", "distill.pure_noise_share", "distill.pixel_recompute")


def unused_keys(config: "Config") -> list[tuple[str, Any, str, str]]:
    """(key, value, the runs that read it, what this run is instead) for each of :data:`METHOD_KEYS`
    (:data:`SOURCE_KEYS`) set away from its default under a method (a data source) that does not read
    it, and ``train.export_lora`` without ``model.lora``."""
    defaults, found = Config(), []
    for keys, setting in ((METHOD_KEYS, "distill.method"), (SOURCE_KEYS, "data.source")):
        now = getattr(getattr(config, setting.split(".")[0]), setting.split(".")[1])
        for key, readers in keys.items():
            section, name = key.split(".")
            value = getattr(getattr(config, section), name)
            if now not in readers and value != getattr(getattr(defaults, section), name):
                found.append((key, value, " / ".join(f"{setting}={r}" for r in readers), f"{setting}={now}"))
    if config.model.lora is None and config.train.export_lora != defaults.train.export_lora:
        found.append(("train.export_lora", config.train.export_lora, "LoRA runs (model.lora)",
                      "a run without model.lora"))
    return found


def start_warnings(config: "Config") -> list[str]:
    """What the trainer warns of at its start: each of :func:`unused_keys` (an ablation that would change
    nothing), an ADP run whose samples and export would not be 1-step, and sequence parallelism without
    tensor parallelism (nothing to split over; Megatron-LM turns it off with a warning)."""
    found = [f"{key}={value!r} applies to {readers} only: {this_run} does not read it"
             for key, value, readers, this_run in unused_keys(config)]
    if config.distill.method == "adp" and config.distill.generator_steps != 1:
        found.append(f"distill.method=adp trains a 1-step generator: distill.generator_steps="
                     f"{config.distill.generator_steps} only sets the steps its samples and distillation.json name "
                     "(the DMDX recipes set 1)")
    if config.model.sequence_parallel and config.parallel.tensor_parallel == 1:
        found.append("model.sequence_parallel=true does nothing with parallel.tensor_parallel=1 (it splits the "
                     "tensor-parallel group's activations)")
    return found


@dataclass
class OptimizerConfig:
    lr: float = 1e-6
    betas: tuple[float, float] = (0.0, 0.99)
    weight_decay: float = 0.0
    grad_clip: float = 1.0  # max global grad norm; 0 disables clipping
    # learning-rate schedule over this network's updates in the run (megatron-core's
    # OptimizerParamScheduler): linear warmup from 0, then constant or a decay to min_lr
    warmup_iters: int = 0
    decay_style: str = "constant"  # constant | linear | cosine | inverse-square-root
    min_lr: float = 0.0
    # memory (adm_megatron.train.sharded_optimizer / offload): this network's fp32 main params and
    # Adam moments sharded over the data-parallel group (each rank steps 1/DP of them; needs DP > 1)
    shard_over_dp: bool = False
    # between this network's updates: none | optimizer (its Adam state and fp32 main params wait in
    # CPU memory, pinned when CUDA) | optimizer_and_params (its weights too, in phases that do not run it)
    offload: str = "none"


@dataclass
class OptimConfig:
    generator: OptimizerConfig = field(default_factory=lambda: OptimizerConfig(lr=1e-7))
    fake_score: OptimizerConfig = field(default_factory=lambda: OptimizerConfig(lr=1e-6))
    discriminator: OptimizerConfig = field(default_factory=lambda: OptimizerConfig(lr=5e-6))


NETWORKS = tuple(f.name for f in dataclasses.fields(OptimConfig))  # the trainable networks' optim.<network> sections


@dataclass
class TrainConfig:
    max_iterations: int = 1000
    log_every: int = 1
    save_every: int = 0  # 0: a checkpoint at the end only
    ema_decay: float = 0.0  # generator EMA; 0 disables it
    nan_policy: str = "error"  # error | skip (skip the update of a non-finite phase)
    max_skipped_steps: int = 10  # nan_policy=skip: a network's updates skipped this many times in a row stop the run
    resume: str = "auto"  # auto (latest checkpoint in output_dir) | never | a checkpoint or run dir
    keep_checkpoints: int = 0  # keep the last K checkpoints in output_dir/checkpoints; 0 keeps all
    save_interval_minutes: float = 0.0  # also save when this much time passed since the last save
    # write the periodic checkpoints in a process of their own while training goes on (host memory
    # for a copy of each rank's share while it is written); the last one and a preemption's are
    # written before the run ends (adm_megatron/train/background_save.py)
    async_save: bool = False
    num_samples: int = 2  # samples of the first prompts rendered at the end (adm_megatron/train/samples.py)
    sample_every: int = 0  # also every this many iterations, into samples/iter_NNNNNNN/ and wandb; 0: at the end only
    sample_vae_tiling: bool = False  # the samples' VAE decodes in tiles (diffusers' enable_tiling): less memory
    export: bool = True  # export the generator as a diffusers directory at the end
    # a LoRA generator's export: merged (generator/, a full diffusers transformer), adapter
    # (generator_lora/pytorch_lora_weights.safetensors for load_lora_weights) or both
    export_lora: str = "merged"
    # on a GPU, refuse before building anything a run the memory planner says does not fit the card
    # (families with planner formulas; adm-megatron plan shows the terms)
    memory_check: bool = True


@dataclass
class ProfileConfig:
    """Profiling a window of iterations (``adm_megatron.train.profiling``), as Megatron-LM's --profile."""

    start: int = 10  # the first iteration profiled
    end: int = 12  # the first iteration not profiled
    ranks: list[int] = field(default_factory=lambda: [0])  # global ranks that profile
    mode: str = "torch"  # torch (a Chrome trace per rank) | nsys (cudaProfilerStart / Stop and NVTX ranges)
    memory: bool = False  # torch: also every allocation and the tensor shapes


@dataclass
class LoggingConfig:
    wandb_mode: str = "offline"  # offline | online | disabled
    wandb_project: str = "adm-megatron"
    wandb_name: str = ""  # the wandb run's name; empty: output_dir's name (one run across resumes)
    # TensorBoard event files in output_dir/tensorboard (the metrics, image samples), as Megatron-LM's
    # --tensorboard-dir; needs the tensorboard package (pip install 'adm-megatron[tensorboard]')
    tensorboard: bool = False
    progress: bool = True
    # warn once when the discriminator's paired accuracy, averaged over this many of its last
    # updates, is at most dead_discriminator_accuracy (0.5 is chance); 0 disables the check
    dead_discriminator_window: int = 100
    dead_discriminator_accuracy: float = 0.55
    profile: ProfileConfig | None = None  # null: no profiling


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    output_dir: str = "outputs/run"
    seed: int = 1234


DECAY_STYLES = ("constant", "linear", "cosine", "inverse-square-root")
OFFLOAD_CHOICES = ("none", "optimizer", "optimizer_and_params")
PROFILE_MODES = ("torch", "nsys")
FP8_TE_RECIPES = ("hybrid", "e4m3")  # Transformer Engine's delayed scaling, models/fp8.py
FP8_TORCHAO_RECIPES = ("tensorwise", "rowwise", "rowwise_with_gw_hp")  # torchao's, models/fp8_torchao.py
CHOICES = {
    "model.impl": ("auto", "local", "te"),
    "model.attention_backend": ("default", "auto", "te", "flash", "efficient", "cudnn", "math"),
    "model.fp8": (None, *FP8_TE_RECIPES, *FP8_TORCHAO_RECIPES),
    "model.fp8_amax_compute_algo": ("max", "most_recent"),
    "model.dtype": ("fp32", "bf16", "fp64"),
    "model.compile": ("none", "blocks"),
    "data.source": ("synthetic", "shards"),
    "distill.method": ("adm", "dmd", "dmd2", "adp"),
    "distill.pixel_encoder": ("sam", "dinov2"),
    "distill.head_reduction": ("sum", "mean"),
    "distill.renoise": ("independent", "shared", "pair"),
    "train.nan_policy": ("error", "skip"),
    "train.export_lora": ("merged", "adapter", "both"),
    "logging.wandb_mode": ("offline", "online", "disabled"),
}


def _optional_dataclass(hint: Any) -> type | None:
    """The dataclass ``D`` of a ``D | None`` field, else None."""
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if type(None) in typing.get_args(hint) and len(args) == 1 and dataclasses.is_dataclass(args[0]):
        return args[0]
    return None


def _setting(key: str, value: Any, written: str | None) -> str:
    """``key=value`` as a message shows it; an empty YAML value as ``key is empty``."""
    if value is None:
        return f"{key} is empty" if written == "" else f"{key}=null"
    return f"{key}={value!r}"


def _choices(key: str) -> tuple | None:
    """The values a string key takes, where they are fixed (checked in ``_check_fields``), else None."""
    section, name = key.split(".")[0], key.split(".")[-1]
    if section == "optim":
        return {"decay_style": DECAY_STYLES, "offload": OFFLOAD_CHOICES}.get(name)
    return PROFILE_MODES if key == "logging.profile.mode" else CHOICES.get(key)


def _not_a_string(key: str, value: Any, source: str, written: str | None) -> str:
    """Why ``value`` is no string. YAML 1.1 reads an unquoted off / yes as a boolean and 2024 as a
    number: then say so with the value as written, and how to quote it (on a shell too) -- unless
    the key takes fixed values and quoted it would be none of them: then name those."""
    if written is None or not isinstance(value, (bool, int, float, datetime.date)):
        return f"{_setting(key, value, written)}: expected a string"
    allowed = _choices(key)
    if allowed is not None and written not in allowed:
        return f"{key}={written}: expected one of {', '.join('null' if a is None else a for a in allowed)}"
    quoted = f'"{written}"'
    if source == "command line" and "[" not in key:  # the shell takes the quotes off key="..."
        quoted = f"'{key}={quoted}' on a shell"
    read = (str(value).lower() if isinstance(value, bool) else "a date" if isinstance(value, datetime.date)
            else "a number")
    return f"{key}={written}: expected a string; YAML reads {written} as {read}: quote it ({quoted})"


# integers YAML 1.1 reads in another base: 0123 (octal: 83), 1:30 (base 60: 90), 1:30.5 (90.5)
_OTHER_BASE = re.compile(r"[-+]?(0[0-7_]+|[0-9][0-9_]*(:[0-5]?[0-9])+(\.[0-9_]*)?)")


def _coerce(value: Any, hint: Any, key: str, source: str, written: str | None = None) -> Any:
    """``value`` as a field of type ``hint``; ``written``: its text, where YAML read it from a plain scalar."""
    optional = [a for a in typing.get_args(hint) if a is not type(None)]
    if type(None) in typing.get_args(hint) and len(optional) == 1:  # ``X | None``: null or an X
        return None if value is None else _coerce(value, optional[0], key, source, written)
    if hint in (int, float) and written is not None and _OTHER_BASE.fullmatch(written):
        raise ConfigError(f"{source}: {key}={written}: YAML reads {written} as {value!r} (a number in base "
                          f"{8 if ':' not in written else 60}); write the number in decimal, without leading zeros")
    origin = typing.get_origin(hint)
    if origin is list:
        (item_type,) = typing.get_args(hint)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{source}: {_setting(key, value, written)}: expected a list")
        return _coerce_items(value, [item_type] * len(value), key, source)
    if origin is tuple:
        item_types = typing.get_args(hint)
        if not isinstance(value, (list, tuple)) or len(value) != len(item_types):
            raise ConfigError(f"{source}: {_setting(key, value, written)}: "
                              f"expected a list of {len(item_types)} numbers")
        return tuple(_coerce_items(value, item_types, key, source))
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{source}: {_setting(key, value, written)}: expected true or false")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{source}: {_setting(key, value, written)}: expected an integer")
        return value
    if hint is float:
        if isinstance(value, str):  # YAML 1.1 reads 1e-3 (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{source}: {_setting(key, value, written)}: expected a number")
        try:
            number = float(value)
        except OverflowError:  # an integer past float's range
            number = math.inf
        if not math.isfinite(number):  # NaN passes every range check, inf every lower bound: no field takes them
            raise ConfigError(f"{source}: {key}={value if written is None else written}: expected a finite number")
        return number
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{source}: {_not_a_string(key, value, source, written)}")
        return value
    raise ConfigError(f"{source}: {key}: unsupported field type {hint}")


def _coerce_items(values: list | tuple, hints: typing.Sequence, key: str, source: str) -> list:
    """A list's items as ``hints`` say, item i named ``key[i]``."""
    written = getattr(values, "written", {})
    return [_coerce(v, hint, f"{key}[{i}]", source, written.get(i)) for i, (v, hint) in enumerate(zip(values, hints))]


def _apply(obj: Any, values: dict, prefix: str, source: str) -> None:
    hints = typing.get_type_hints(type(obj))
    names = {f.name for f in dataclasses.fields(obj)}
    for key, value in values.items():
        dotted = f"{prefix}{key}"
        if key not in names:
            raise ConfigError(f"{source}: unknown key {dotted!r} (known: {', '.join(sorted(names))})")
        current = getattr(obj, key)
        optional = _optional_dataclass(hints[key])
        if optional is not None:  # a section that may be null (e.g. model.lora)
            if value is None:
                setattr(obj, key, None)
                continue
            if current is None:
                current = optional()
                setattr(obj, key, current)
        if dataclasses.is_dataclass(current) and not isinstance(value, dict) and hasattr(current, "shorthand"):
            current.shorthand(value, dotted, source)
        elif dataclasses.is_dataclass(current):
            if not isinstance(value, dict):
                raise ConfigError(f"{source}: {dotted} must be a mapping, got {value!r}")
            _apply(current, value, dotted + ".", source)
        else:
            written = getattr(values, "written", {}).get(key)
            if _clears(obj, key, value, written, source):
                value = ""
            setattr(obj, key, _coerce(value, hints[key], dotted, source, written))


def _clears(obj: Any, key: str, value: Any, written: str | None, source: str) -> bool:
    """Whether ``value`` is an empty command-line value (``model.generator_init=``, which YAML reads as
    null) for a string key whose default is '': it sets the key back to '', clearing what a config
    file set. Where '' is no default (``output_dir=``) the empty value is refused as such."""
    default = next(f.default for f in dataclasses.fields(obj) if f.name == key)
    return source == "command line" and value is None and written == "" and default == ""


def _nest(dotted: str, value: Any, written: str) -> dict:
    """``a.b.c`` and its value -> {a: {b: {c: value}}}, the innermost mapping keeping how it was written."""
    *sections, name = dotted.split(".")
    out = _Mapping({name: value})
    out.written = {name: written}
    for section in reversed(sections):
        out = {section: out}
    return out


# the keys that take a model directory, or a Hugging Face repo id in the local cache (hub_cache.py)
MODEL_DIR_KEYS = ("model.teacher", "model.pipeline", "model.generator_init", "distill.pixel_encoder_path")


def load_config(path: str | None = None, overrides: list[str] = ()) -> Config:
    """A ``Config`` from a YAML file (optional) and ``key=value`` overrides, type-checked."""
    config = Config()
    values: dict = {}
    if path is not None:
        values = _read_yaml(path) or {}
        if not isinstance(values, dict):
            raise ConfigError(f"{path}: expected a mapping at the top level")
        _apply(config, values, "", path)
    overridden = []
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r}: expected key=value (e.g. train.max_iterations=10)")
        try:
            value = yaml.load(raw, _Loader)
        except _DuplicateKeyError as err:
            raise ConfigError(f"command line: {item}: {_yaml_problem(err)}") from None
        except yaml.YAMLError:  # not YAML: the text itself (a path, a name)
            value = raw
        else:
            dropped = _dropped_by_yaml(raw)
            if dropped:
                raise ConfigError(f"command line: {item}: YAML reads {dropped} and drops it; leave it out, or quote "
                                  f"a text that holds it ('{key}=\"{raw.strip()}\"' on a shell)")
        _apply(config, _nest(key, value, raw.strip()), "", "command line")
        overridden.append(key)

    def where(key: str) -> str:
        """The command line for a key it set (or a section holding it, or a key inside it), else the file
        when it sets the key, else the default."""
        if any(key == o or key.startswith(f"{o}.") or o.startswith(f"{key}.") for o in overridden):
            return "command line"
        if path is None:
            return "default"
        return path if _sets(values, key) else f"default (not set in {path})"

    config.where = where  # not a field: config_to_dict and the comparisons leave it out
    _check_fields(config, where, new_run=True)
    for key in MODEL_DIR_KEYS:  # a repo id names its snapshot in the local hub cache, as in from_pretrained
        section, name = key.split(".")
        setattr(getattr(config, section), name, local_dir(getattr(getattr(config, section), name), key))
    return config


def _dropped_by_yaml(raw: str) -> str | None:
    """What of a command-line value YAML reads as no part of it: a comment (``run #1`` is ``run``)
    or an anchor (``&x y`` is ``y``), as a message names it; None when it keeps all of it."""
    node = yaml.compose(raw, _Loader)
    rest = raw[node.end_mark.index:].strip() if node is not None else ""
    if rest.startswith("#"):
        return f"{rest!r} as a comment"
    anchors = [event.anchor for event in yaml.parse(raw, _Loader) if getattr(event, "anchor", None)]
    return f"'&{anchors[0]}' as an anchor" if anchors else None


def _sets(values: Any, key: str) -> bool:
    """Whether the YAML mapping ``values`` holds dotted ``key``, or a section holding it."""
    for part in key.split("."):
        if not isinstance(values, dict) or part not in values:
            return False
        values = values[part]
    return True


def _is_key(config: Config, dotted: str) -> bool:
    node: Any = config
    for part in dotted.split("."):
        if not dataclasses.is_dataclass(node) or part not in {f.name for f in dataclasses.fields(node)}:
            return False
        node = getattr(node, part)
    return True


_LEADING_KEY = re.compile(r"^(?:config: )?([a-z_][a-z0-9_]*(?:\.[a-z_][a-z0-9_]*)+|seed|output_dir)(?==|\[|:)")


def located(message: str, config: Config) -> str:
    """A check's message that begins with the key it is about (``distill.head_every=3: ...``), led by
    where that key was set: the YAML file, the command line or the default (:func:`load_config`)."""
    match = _LEADING_KEY.match(message)
    where = getattr(config, "where", None)
    if match is None or where is None or not _is_key(config, match.group(1)):  # e.g. a file name: run.yaml: ...
        return message
    return f"{where(match.group(1))}: {message[len('config: '):] if message.startswith('config: ') else message}"


@contextlib.contextmanager
def keys_located(config: Config, *kinds: type[Exception]):
    """Within it, a ConfigError (or one of ``kinds``) about one of ``config``'s keys says where the key
    was set."""
    try:
        yield
    except (ConfigError, *kinds) as err:
        raise type(err)(located(str(err), config)) from None


def config_from_dict(values: dict, source: str) -> Config:
    """A ``Config`` from a saved dict (``config_to_dict``'s output, e.g. a checkpoint's), type-checked."""
    config = Config()
    _apply(config, values, "", source)
    _check_fields(config, lambda _key: source)
    return config


def _check_torchao_fp8(config: Config, where) -> None:
    """torchao's FP8 recipes (``model.fp8=tensorwise | rowwise | rowwise_with_gw_hp``,
    models/fp8_torchao.py): in the local spec's linears on one tensor-parallel rank, without context
    parallelism."""
    m, p = config.model, config.parallel
    key = where("model.fp8")
    if m.impl == "te":
        raise ConfigError(f"{key}: model.fp8={m.fp8} runs in the local spec's linears, not with model.impl=te: set "
                          "model.impl=local (or auto without Transformer Engine), or use TE's model.fp8=hybrid")
    if p.tensor_parallel > 1 or m.sequence_parallel:
        raise ConfigError(f"{key}: model.fp8={m.fp8} computes in FP8 where a linear communicates nothing, one "
                          f"tensor-parallel rank without sequence parallelism (here parallel.tensor_parallel="
                          f"{p.tensor_parallel}, model.sequence_parallel={m.sequence_parallel}); with TP > 1 use "
                          "Transformer Engine's model.fp8=hybrid")
    if p.context_parallel > 1:
        raise ConfigError(f"{key}: model.fp8={m.fp8} with parallel.context_parallel={p.context_parallel}: each rank's "
                          "copy of the text tokens gets a partial gradient, whose FP8 scales and rounding would not be "
                          "one process's; use parallel.context_parallel=1 (or Transformer Engine's model.fp8=hybrid)")
    if m.dtype == "fp64":
        raise ConfigError(f"{key}: model.fp8={m.fp8} with model.dtype=fp64: expected bf16 or fp32")


MAX_TIMEOUT_S = 365 * 86400.0  # parallel.timeout_s's ceiling


def _check_fields(config: Config, where: Callable[[str], str], new_run: bool = False) -> None:
    """Choices and ranges that need no file system or model; ``where(key)`` names where a key was set.
    ``new_run``: a config to start or go on with, not a saved one read back as it was trained (the
    CFG range's floor of 1 came later)."""
    for dotted, allowed in CHOICES.items():
        section, name = dotted.split(".")
        value = getattr(getattr(config, section), name)
        if value not in allowed:
            names = ", ".join("null" if a is None else a for a in allowed)
            raise ConfigError(f"{where(dotted)}: {dotted}={value!r}: expected one of {names}")
    positive = {
        "parallel.tensor_parallel": config.parallel.tensor_parallel,
        "parallel.context_parallel": config.parallel.context_parallel,
        "data.batch_size": config.data.batch_size,
        "data.frames": config.data.frames,
        "data.height": config.data.height,
        "data.width": config.data.width,
        "data.num_prompts": config.data.num_prompts,
        "distill.generator_steps": config.distill.generator_steps,
        "distill.delta_t": config.distill.delta_t,
        "distill.ttur": config.distill.ttur,
        "distill.head_every": config.distill.head_every,
        "distill.head_hidden": config.distill.head_hidden,
        "distill.head_blocks": config.distill.head_blocks,
        "train.max_iterations": config.train.max_iterations,
        "train.log_every": config.train.log_every,
        "train.max_skipped_steps": config.train.max_skipped_steps,
    }
    for key, value in positive.items():
        if value < 1:
            raise ConfigError(f"{where(key)}: {key}={value}: must be >= 1")
    lo, hi = config.distill.guidance_scale
    floor = 1 if new_run else 0  # below 1 diffusers' pipelines run no CFG: the recorded CFG could not be sampled
    if not floor <= lo <= hi:
        raise ConfigError(f"{where('distill.guidance_scale')}: "
                          f"distill.guidance_scale=[{lo}, {hi}]: expected {floor} <= low <= high (1: no CFG)")
    for key, value in {"train.save_every": config.train.save_every,
                       "train.keep_checkpoints": config.train.keep_checkpoints,
                       "train.num_samples": config.train.num_samples, "train.sample_every": config.train.sample_every,
                       "train.save_interval_minutes": config.train.save_interval_minutes,
                       **{f"optim.{name}.{term}": getattr(getattr(config.optim, name), term)
                          for name in NETWORKS for term in ("grad_clip", "weight_decay")}}.items():
        if value < 0:
            raise ConfigError(f"{where(key)}: {key}={value}: must be >= 0")
    if not 0 <= config.seed <= 2**63 - 1:  # torch seeds generators with 64 bits; the run adds offsets to it
        raise ConfigError(f"{where('seed')}: seed={config.seed}: expected an integer in [0, 2**63 - 1]")
    if config.data.global_batch_size < 0:
        raise ConfigError(f"{where('data.global_batch_size')}: "
                          f"data.global_batch_size={config.data.global_batch_size}: expected >= 0 "
                          "(0: data.batch_size x data-parallel size)")
    if 0 < config.data.global_batch_size < config.data.batch_size:
        raise ConfigError(f"{where('data.global_batch_size')}: "
                          f"data.global_batch_size={config.data.global_batch_size}: smaller than "
                          f"data.batch_size={config.data.batch_size}, the rows of one micro-batch on one rank")
    if config.parallel.grad_bucket_size < 0:
        raise ConfigError(f"{where('parallel.grad_bucket_size')}: "
                          f"parallel.grad_bucket_size={config.parallel.grad_bucket_size}: expected >= 0 "
                          "(0: megatron's default)")
    if not 1 <= config.parallel.timeout_s <= MAX_TIMEOUT_S:  # below 1, the process group's own connection
        # timed out at once; past ~2.7e6 years, its timedelta overflowed (tracebacks)
        raise ConfigError(f"{where('parallel.timeout_s')}: parallel.timeout_s={config.parallel.timeout_s}: expected "
                          f"seconds in [1, {MAX_TIMEOUT_S:.0f}] (a year)")
    if not config.train.resume:
        raise ConfigError(f"{where('train.resume')}: train.resume is empty: expected auto, never or a checkpoint path")
    if not config.output_dir.strip():
        raise ConfigError(f"{where('output_dir')}: output_dir is empty: expected a directory path")
    profile = config.logging.profile
    if profile is not None:
        if not 0 <= profile.start < profile.end:
            raise ConfigError(f"{where('logging.profile')}: "
                              f"logging.profile: start={profile.start}, end={profile.end}: expected "
                              "0 <= start < end (iterations start .. end - 1 are profiled)")
        if profile.mode not in PROFILE_MODES:
            raise ConfigError(f"{where('logging.profile.mode')}: "
                              f"logging.profile.mode={profile.mode!r}: expected one of "
                              f"{', '.join(PROFILE_MODES)}")
        if profile.start >= config.train.max_iterations:
            # where the start was set ("default" when the user set another of the section's keys only)
            raise ConfigError(f"{where('logging.profile.start')}: logging.profile.start={profile.start}: the run ends "
                              f"before it (train.max_iterations={config.train.max_iterations}); nothing would be "
                              "profiled: set logging.profile.start / end below it")
        if not profile.ranks or any(r < 0 for r in profile.ranks):
            raise ConfigError(f"{where('logging.profile.ranks')}: "
                              f"logging.profile.ranks={profile.ranks}: expected a non-empty list of ranks >= 0")
    if not 0 <= config.train.ema_decay < 1:
        raise ConfigError(f"{where('train.ema_decay')}: "
                          f"train.ema_decay={config.train.ema_decay}: expected 0 <= decay < 1")
    for name in ("teacher", "fake_score", "generator"):
        key = f"model.recompute.{name}"
        parse_recompute(getattr(config.model.recompute, name), key, where(key))
    m = config.model
    if m.fp8 in FP8_TORCHAO_RECIPES:
        _check_torchao_fp8(config, where)
    elif m.fp8 is not None:
        if m.impl == "local":
            raise ConfigError(f"{where('model.fp8')}: "
                              f"model.fp8={m.fp8} needs the Transformer Engine spec (model.impl=te or auto); "
                              "model.impl=local has no FP8 kernels")
        if m.dtype == "fp64":
            raise ConfigError(f"{where('model.fp8')}: model.fp8={m.fp8} with model.dtype=fp64: expected bf16 or fp32")
    # whatever the recipe (TE's delayed scaling reads them): nonsense is refused as read
    if m.fp8_margin < 0:
        raise ConfigError(f"{where('model.fp8_margin')}: model.fp8_margin={m.fp8_margin}: expected >= 0")
    if m.fp8_amax_history_len < 1:
        raise ConfigError(f"{where('model.fp8_amax_history_len')}: model.fp8_amax_history_len="
                          f"{m.fp8_amax_history_len}: expected >= 1")
    if m.attention_backend == "te" and m.impl == "local":
        raise ConfigError(f"{where('model.attention_backend')}: "
                          f"model.attention_backend=te with model.impl=local: Transformer Engine's "
                          "attention comes with the TE spec (model.impl=te or auto)")
    if config.model.bf16_params and config.model.dtype != "bf16":
        raise ConfigError(f"{where('model.bf16_params')}: "
                          f"model.bf16_params=true needs model.dtype=bf16 (got {config.model.dtype})")
    if not config.model.grad_reduce_in_fp32 and not config.model.bf16_params:
        raise ConfigError(f"{where('model.grad_reduce_in_fp32')}: "
                          f"model.grad_reduce_in_fp32=false applies to bf16 weights (model.bf16_params=true); "
                          "fp32 weights' gradients are fp32")
    for name in NETWORKS:
        opt = getattr(config.optim, name)
        if opt.lr <= 0:
            raise ConfigError(f"{where(f'optim.{name}.lr')}: optim.{name}.lr={opt.lr}: must be > 0")
        if not all(0 <= beta < 1 for beta in opt.betas):
            raise ConfigError(f"{where(f'optim.{name}.betas')}: optim.{name}.betas={list(opt.betas)}: "
                              "expected each in [0, 1)")
        if opt.decay_style not in DECAY_STYLES:
            raise ConfigError(f"{where(f'optim.{name}.decay_style')}: "
                              f"optim.{name}.decay_style={opt.decay_style!r}: expected one of "
                              f"{', '.join(DECAY_STYLES)}")
        if opt.offload not in OFFLOAD_CHOICES:
            raise ConfigError(f"{where(f'optim.{name}.offload')}: "
                              f"optim.{name}.offload={opt.offload!r}: expected one of "
                              f"{', '.join(OFFLOAD_CHOICES)}")
        if opt.shard_over_dp and opt.offload == "optimizer_and_params":
            raise ConfigError(f"{where(f'optim.{name}.offload')}: "
                              f"optim.{name}.offload=optimizer_and_params with shard_over_dp=true: a "
                              "sharded network's weights are views into megatron DDP's parameter buffer and "
                              "cannot move; use offload=optimizer")
        if not 0 <= opt.min_lr <= opt.lr:
            raise ConfigError(f"{where(f'optim.{name}.min_lr')}: "
                              f"optim.{name}.min_lr={opt.min_lr}: expected 0 <= min_lr <= lr={opt.lr}")
        updates = network_updates(config, name)
        if not 0 <= opt.warmup_iters < updates:
            raise ConfigError(f"{where(f'optim.{name}.warmup_iters')}: "
                              f"optim.{name}.warmup_iters={opt.warmup_iters}: expected 0 <= warmup "
                              f"< the network's {updates} updates in train.max_iterations")
    d = config.distill
    lo, hi = d.dmd_t_range
    if not 0 <= lo < hi <= 1:
        raise ConfigError(f"{where('distill.dmd_t_range')}: "
                          f"distill.dmd_t_range=[{lo}, {hi}]: expected 0 <= low < high <= 1")
    if not 0 < d.gan_t_max <= 1:
        raise ConfigError(f"{where('distill.gan_t_max')}: distill.gan_t_max={d.gan_t_max}: expected 0 < gan_t_max <= 1")
    for key in ("gan_weight", "cls_weight", "latent_weight", "pixel_weight"):
        if getattr(d, key) < 0:
            raise ConfigError(f"{where(f'distill.{key}')}: distill.{key}={getattr(d, key)}: expected >= 0")
    if config.logging.dead_discriminator_window < 0:
        raise ConfigError(f"{where('logging.dead_discriminator_window')}: logging.dead_discriminator_window="
                          f"{config.logging.dead_discriminator_window}: expected >= 0 (0 disables)")
    if not 0 <= config.logging.dead_discriminator_accuracy <= 1:
        raise ConfigError(f"{where('logging.dead_discriminator_accuracy')}: logging.dead_discriminator_accuracy="
                          f"{config.logging.dead_discriminator_accuracy}: expected an accuracy in [0, 1] (0.5 is "
                          "chance)")
    if d.method in ("dmd2", "adp") and not config.data.real_path:
        raise ConfigError(f"{where('distill.method')}: "
                          f"distill.method={d.method} needs data.real_path (teacher ODE pairs from "
                          "tools/collect_ode_pairs.py)")
    if d.latent_weight + d.pixel_weight == 0:
        raise ConfigError(f"{where('distill.latent_weight')}: "
                          f"distill.latent_weight={d.latent_weight} / pixel_weight={d.pixel_weight}: "
                          "expected >= 0, not both 0")
    if len(set(d.pixel_layers)) != len(d.pixel_layers):
        raise ConfigError(f"{where('distill.pixel_layers')}: distill.pixel_layers={d.pixel_layers}: a layer given "
                          "twice (one head per layer)")
    if not 0 <= d.pure_noise_share <= 1:
        raise ConfigError(f"{where('distill.pure_noise_share')}: "
                          f"distill.pure_noise_share={d.pure_noise_share}: "
                          "expected a share in [0, 1]")
    for key, value, methods, _ in unused_keys(config):  # the rest are a warning at the trainer's start
        if key in REFUSED_ELSEWHERE:
            raise ConfigError(f"{where(key)}: {key}={value} is an ADP option ({methods}), got distill.method={d.method}")
    if d.method == "adp" and d.pixel_weight > 0 and not d.pixel_encoder_path:
        raise ConfigError(f"{where('distill.pixel_weight')}: "
                          f"distill.pixel_weight={d.pixel_weight} needs distill.pixel_encoder_path (a "
                          f"local {d.pixel_encoder} encoder directory), or set distill.pixel_weight=0")
    if not config.model.teacher:
        raise ConfigError(f"{where('model.teacher')}: "
                          f"model.teacher is required (a diffusers directory or megatron checkpoint)")
    if config.data.source == "shards" and not config.data.path:
        raise ConfigError(f"{where('data.source')}: data.source=shards needs data.path")
    lora = config.model.lora
    if lora is not None:
        if lora.rank < 1 or lora.alpha <= 0:
            raise ConfigError(f"{where('model.lora')}: "
                              f"model.lora: rank={lora.rank}, alpha={lora.alpha}: expected rank >= 1 "
                              "and alpha > 0")
        names = lora.target_modules
        if not names or any(not n for n in names) or len(set(names)) != len(names):
            raise ConfigError(f"{where('model.lora.target_modules')}: "
                              f"model.lora.target_modules={names!r}: expected distinct, non-empty "
                              "diffusers module names (e.g. [to_q, to_k, to_v, to_out.0])")


def network_updates(config: Config, name: str) -> int:
    """How many optimizer steps network ``name`` takes in the run (the length of its lr schedule)."""
    iterations = config.train.max_iterations
    return iterations if name == "fake_score" else -(-iterations // config.distill.ttur)


def config_to_dict(config: Config) -> dict:
    return dataclasses.asdict(config)


def flatten_keys(values: dict, prefix: str = "") -> dict:
    """A nested config dict as ``{dotted key: value}`` (tuples as lists, as YAML gives them back)."""
    out = {}
    for key, value in values.items():
        if isinstance(value, dict):
            out.update(flatten_keys(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = list(value) if isinstance(value, tuple) else value
    return out
