"""The distillation run: set up, the iteration loop, and what a run leaves in ``output_dir``.

One iteration (ADM's Algorithm 1 with TTUR = ``distill.ttur``): the fake score is updated every
iteration; the generator and then (for methods with a discriminator phase) the discriminator every
``ttur``-th, the discriminator on the generator phase's ODE pair. Each update accumulates the
gradients of its micro-batches (``data.global_batch_size``, ``adm_megatron.data.batch_layout``); the
discriminator's micro-batch m reads the generator phase's micro-batch m. The method (``distill.method``:
ADM, DMD, DMD2 or ADP, ``METHODS``) says which networks each phase trains (ADP has no fake score:
none is built and its phase is not run); the loop does not know it.
Randomness is drawn for the global batch from generators seeded by (seed, iteration, stream), each
data-parallel rank and micro-batch keeping its rows: every rank of a replica draws the same, a run is
reproducible, its draws do not depend on how the global batch is split, and the two phases' starting
noises (z and ẑ of Algorithm 1) come from separate streams. The discriminator's paired accuracy is
watched (``DiscriminatorMonitor``) and a dead discriminator is reported while the run goes on.
Each iteration also reports its wall time and throughput as Megatron-LM does: model FLOPs counted
analytically per network call (``adm_megatron.bench.counting``, the benchmark's own count), per GPU
(a replica's FLOPs over its TP x CP GPUs), per second, and MFU against the card's dense BF16 peak in
BF16 runs on a known card (``adm_megatron.bench.report``).

Outputs: ``metrics.jsonl``, wandb files, ``config.yaml``, checkpoints, samples every
``train.sample_every`` iterations (``samples/iter_NNNNNNN/``) and at the end the generator as a
diffusers directory (``generator/``) and samples (``samples/``), rendered by the generator in memory
with the pipeline's sampler and VAE when the teacher came with a pipeline (``train.samples``). The backbone is the
teacher's model family (``adm_megatron.families``); nothing here depends on which one.

A run goes on from its latest checkpoint when started again (``train.resume``, see
``adm_megatron.train.resume``), stops cleanly on SIGTERM / SIGUSR1 after saving
(``adm_megatron.train.preemption``), and a finished run started again does nothing.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import os
import time
import zlib
from dataclasses import dataclass

import torch
import yaml
from megatron.core.distributed import DistributedDataParallel

from adm_megatron.algorithms.adm import ADM
from adm_megatron.algorithms.adp import ADP
from adm_megatron.algorithms.base import Distillation, PhaseBatch, RealBatch
from adm_megatron.algorithms.dmd import DMD
from adm_megatron.algorithms.dmd2 import DMD2
from adm_megatron.algorithms.networks import DiTFunction, Networks
from adm_megatron.algorithms.randomness import PhaseDraws
from adm_megatron.bench.counting import EvalCounter, instrument
from adm_megatron.bench.report import device_name, peak_tflops
from adm_megatron.config import Config, config_to_dict, network_updates, start_warnings
from adm_megatron.convert.checkpoint import CheckpointError
from adm_megatron.convert.distillation_record import distillation_record
from adm_megatron.data.batch_layout import BatchLayout, microbatches_for
from adm_megatron.heads import MultiHeadDiscriminator
from adm_megatron.heads.pixel import LatentPixelHeads, build_pixel_features
from adm_megatron.lora import apply_lora, check_targets
from adm_megatron.models import tapped_block_indices
from adm_megatron.parallel import initialize_parallel, launch_env
from adm_megatron.parallel.run_lock import RunLock
from adm_megatron.parallel.shared_dir import check_shared_dir
from adm_megatron.parallel.startup import confirm_start
from adm_megatron.models.kernel_options import apply_kernel_options
from adm_megatron.models.weights import load_full_state_dict
from adm_megatron.train.background_save import BackgroundSaves
from adm_megatron.train.input_identity import check_same_data, check_same_weights, data_identity, weights_identity
from adm_megatron.train.checkpoint import (
    STATE_FILE,
    load_training_checkpoint,
    read_training_state,
    remove_leftovers,
    save_training_checkpoint,
    start_training_checkpoint,
    write_latest_marker,
)
from adm_megatron.train.discriminator_monitor import DiscriminatorMonitor
from adm_megatron.train.ema import ParameterEMA
from adm_megatron.train.end_outputs import clear_earlier_end
from adm_megatron.train.export import export_generator
from adm_megatron.train.grad_sync import ddp_config
from adm_megatron.train.offload import Offloader
from adm_megatron.train.optimizer import NetworkOptimizer
from adm_megatron.train.phases import NonFiniteError, PhaseRunner, TrainableNetwork, mean_metrics, prefixed
from adm_megatron.train.preemption import StopPoll
from adm_megatron.train.profiling import IterationProfiler
from adm_megatron.train.recompute import RecomputeSwitch
from adm_megatron.train.resume import mark_finished, plan_resume, trim_metrics
from adm_megatron.train.run_log import RunLogger, check_loggers
from adm_megatron.train.run_starts import config_changes, record_start, start_record
from adm_megatron.train.samples import RunSamples
from adm_megatron.train.single_stage import SingleStage
from adm_megatron.train.teacher import TeacherSource, resolve_teacher
from adm_megatron.train.same_config import check_same_config, check_same_resume
from adm_megatron.train.validate import data_parallel_size, validate_run

logger = logging.getLogger("adm_megatron")


@dataclass
class RunResult:
    output_dir: str
    iterations: int
    generator_dir: str | None
    samples: list[str]
    last_metrics: dict
    trained: int = 0  # iterations this invocation ran (fewer than ``iterations`` after a resume)
    preempted: bool = False  # stopped by a signal after saving; run again to go on


def build_pixel_backbone(config: Config, teacher_source: TeacherSource, device, dtype):
    """ADP's frozen pixel backbone (the pipeline's VAE + the vision encoder), or None when the
    method has none or ``distill.pixel_weight`` is 0 (then nothing of it is loaded or run)."""
    d = config.distill
    if d.method != "adp" or d.pixel_weight == 0:
        return None
    return build_pixel_features(teacher_source.family, d.pixel_encoder, d.pixel_encoder_path,
                                os.path.join(teacher_source.pipeline_dir, "vae"), d.pixel_layers, device, dtype,
                                recompute=d.pixel_recompute)


def _seed(*parts) -> int:
    return zlib.crc32(repr(parts).encode()) & 0x7FFFFFFF


METHODS: dict[str, type[Distillation]] = {"adm": ADM, "dmd": DMD, "dmd2": DMD2, "adp": ADP}


def build_algorithm(config: Config, networks: Networks, schedule) -> Distillation:
    """ADM, a baseline (DMD, DMD2) or ADP: ``distill.method`` picks it, everything else is shared."""
    d = config.distill
    common = dict(networks=networks, schedule=schedule, generator_steps=d.generator_steps,
                  guidance_scale=d.guidance_scale, head_reduction=d.head_reduction)
    if d.method == "adm":
        return ADM(**common, delta_t=d.delta_t, train_discriminator=d.train_discriminator,
                   fake_score_grad=d.fake_score_grad)
    if d.method == "dmd":
        return DMD(**common, dmd_t_range=d.dmd_t_range)
    if d.method == "adp":
        return ADP(**common, latent_weight=d.latent_weight, pixel_weight=d.pixel_weight, disc_t_max=d.gan_t_max,
                   renoise=d.renoise, pure_noise_share=d.pure_noise_share)
    return DMD2(**common, dmd_t_range=d.dmd_t_range, gan_weight=d.gan_weight, cls_weight=d.cls_weight,
                gan_t_max=d.gan_t_max)


class Trainer:
    def __init__(self, config: Config):
        self.config = config
        data_parallel_size(config, launch_env().world_size)  # the layout first: a resume's checks need it
        self.resume_point = plan_resume(config, launch_env().world_size)
        if self.resume_point.finished:
            confirm_start(config.parallel.timeout_s)  # a rank that failed its checks waits for every rank
            return  # nothing to build: fit() reports the finished run and writes nothing
        if launch_env().rank == 0:
            for message in start_warnings(config):
                logger.warning(message)
            if self.resume_point.note:
                logger.warning(self.resume_point.note)
        self.teacher_source: TeacherSource = resolve_teacher(config.model.teacher, config.model.pipeline)
        validate_run(config, self.teacher_source, launch_env().world_size)
        self.text_source = self.teacher_source.text_source(config.data, config.seed)
        self.data_identity = data_identity(config, self.text_source)
        self.weights_identity = weights_identity(config, self.teacher_source)
        if self.resume_point.checkpoint is not None:
            state_file = os.path.join(self.resume_point.checkpoint, STATE_FILE)
            saved = read_training_state(self.resume_point.checkpoint)
            check_same_data(saved.get("data"), self.data_identity, state_file, config)
            self.weights_identity = check_same_weights(saved.get("weights"), self.weights_identity, state_file,
                                                       config)
        if launch_env().rank == 0:  # the rank that logs
            check_loggers(config.logging.wandb_mode, config.logging.tensorboard)
        self.schedule = self.teacher_source.schedule()
        self.info = initialize_parallel(
            config.parallel.tensor_parallel, config.parallel.context_parallel, seed=config.seed,
            timeout_s=config.parallel.timeout_s,
        )
        check_same_config(config)  # every replica trains the same run
        check_shared_dir(config.output_dir, "output_dir")  # every rank writes its share of the checkpoints there
        self.run_lock = RunLock(config.output_dir, self.info.rank == 0)  # one run at a time in output_dir
        check_same_resume(self.resume_point.checkpoint, config.train.resume)  # every rank from the same checkpoint
        self.device = self.info.device
        # parameters stay fp32 under BF16 autocast; fp64 makes layout comparisons exact
        self.dtype = torch.float64 if config.model.dtype == "fp64" else torch.float32
        self.arch = self.teacher_source.arch
        self.family = self.teacher_source.family
        self._build_networks()
        self.algorithm = build_algorithm(config, self.networks, self.schedule)
        self.flops = EvalCounter()  # every network call's analytic FLOPs (this replica's)
        instrument(self.networks, self.flops, self.arch)
        self.peak_tflops = peak_tflops(device_name(self.device), config.model.dtype, None)
        self._build_data()
        self.ema = (
            ParameterEMA(self.generator, config.train.ema_decay) if config.train.ema_decay > 0 else None
        )
        self.monitor = DiscriminatorMonitor(config.logging.dead_discriminator_window,
                                            config.logging.dead_discriminator_accuracy)
        self.start_iteration = 0
        if self.resume_point.checkpoint is not None:
            with self.resume_point.hold or contextlib.nullcontext():  # released once loaded
                self.start_iteration = load_training_checkpoint(self, self.resume_point.checkpoint)
                if self.resume_point.hold is not None:
                    self.resume_point.hold.check()
            logger.info("resumed from %s: iterations %d..%d to go", self.resume_point.checkpoint,
                        self.start_iteration, config.train.max_iterations - 1)

    # -- setup ---------------------------------------------------------------------------------
    def _wrap(self, module: torch.nn.Module, config, name: str) -> DistributedDataParallel:
        config.enable_autocast = self.config.model.dtype == "bf16"
        config.autocast_dtype = torch.bfloat16
        # a sharded optimizer needs DDP's per-DP-rank buffer shards (reduce-scatter, param all-gather)
        sharded = getattr(self.config.optim, name).shard_over_dp
        fp32_grads = self.config.model.bf16_params and self.config.model.grad_reduce_in_fp32
        return DistributedDataParallel(config, ddp_config(self.config.parallel, sharded, fp32_grads),
                                       module)

    def _build_networks(self) -> None:
        c = self.config
        m = c.model
        method = METHODS[c.distill.method]
        has_fake_score = bool(method.fake_phase_trains)  # ADP has none: not built, not stepped, not saved
        if m.lora is not None:  # a bad target list fails in one line before the networks are built
            check_targets(self.arch, m.lora.target_modules, m.lora.rank, m.impl)
        models = self.teacher_source.build_models(
            3 if has_fake_score else 2, sequence_parallel=m.sequence_parallel, impl=m.impl,
            params_dtype=self.dtype,
        )  # recompute is set per network and phase by RecomputeSwitch
        for model in models:  # before LoRA and DDP wrap them
            apply_kernel_options(model, m)
        teacher, self.generator = models[0], models[-1]
        self.fake_score = models[1] if has_fake_score else None
        teacher.eval().requires_grad_(False)
        if m.dtype == "bf16":  # frozen: held once, in bf16 (BF16 autocast computes in bf16 anyway)
            teacher.to(torch.bfloat16)
        # e.g. a two-stage run: start G from an earlier run's exported generator (a full generator's
        # resume takes all of it from the checkpoint; a LoRA generator's base is read at every start)
        if m.generator_init and (self.resume_point.checkpoint is None or m.lora is not None):
            load_full_state_dict(self.generator, self.family.load_hf_weights(m.generator_init, self.arch),
                                 source=m.generator_init)
            logger.info("generator initialised from %s", m.generator_init)
        if m.lora is not None:  # base frozen, only the adapters train (and reach DDP's grad buffers)
            adapters = apply_lora(self.generator, m.lora, seed=_seed(c.seed, "lora"))
            logger.info("LoRA generator: rank %d, alpha %g, %d adapted layers, %d trainable parameters on this rank",
                        m.lora.rank, m.lora.alpha, len(adapters), adapters.numel())
        trained_backbones = {"fake_score": self.fake_score, "generator": self.generator}
        trained_backbones = {name: net for name, net in trained_backbones.items() if net is not None}
        if m.bf16_params:  # fp32 main params live in the optimizer (train/main_params.py)
            for net in trained_backbones.values():
                net.to(torch.bfloat16)
        wrapped = {name: self._wrap(net, net.config, name) for name, net in trained_backbones.items()}
        self.heads = None
        self.pixel = build_pixel_backbone(c, self.teacher_source, self.device, self.dtype)
        if method.has_discriminator:
            with torch.random.fork_rng(devices=[]):  # the same heads whatever the layout or rank
                torch.manual_seed(_seed(c.seed, "discriminator heads"))
                self.heads = MultiHeadDiscriminator(
                    num_heads=len(tapped_block_indices(self.arch.num_layers, c.distill.head_every)),
                    in_channels=self.arch.hidden_size, kind=self.family.head_kind,
                    hidden_channels=c.distill.head_hidden, num_blocks=c.distill.head_blocks,
                ).to(self.device, torch.bfloat16 if m.bf16_params else self.dtype)
                if c.distill.method == "adp":
                    self.heads = LatentPixelHeads(self.heads, self._pixel_heads())
            # a config of its own: hooks are per network
            heads = SingleStage(self.heads, copy.copy(self.generator.config))
            wrapped["discriminator"] = self._wrap(heads, heads.config, "discriminator")
        optim = {"fake_score": c.optim.fake_score, "generator": c.optim.generator,
                 "discriminator": c.optim.discriminator}
        self.trainable = {
            name: TrainableNetwork(module, NetworkOptimizer(module, optim[name], network_updates(c, name)))
            for name, module in wrapped.items()
        }
        self.offload = Offloader(self.trainable, {name: optim[name].offload for name in self.trainable}, self.device)
        self.recompute = RecomputeSwitch({"teacher": teacher, **trained_backbones}, m.recompute)
        self.phases = PhaseRunner(
            self.trainable, nan_policy=c.train.nan_policy, max_skipped_steps=c.train.max_skipped_steps,
            offload=self.offload, before_phase=(self.recompute.before_phase,),
        )
        self.profiler = IterationProfiler(c.logging.profile, self.info.rank, self.device, c.output_dir)
        self.phases.run = self.profiler.wrap_phases(self.phases.run)
        d = c.data
        rotary = self.family.positional_inputs(self.arch, d.frames, d.height, d.width, device=self.device)
        self.networks = Networks(
            teacher=DiTFunction(teacher, rotary),
            fake_score=DiTFunction(wrapped["fake_score"], rotary) if has_fake_score else None,
            generator=DiTFunction(wrapped["generator"], rotary),
            heads=wrapped.get("discriminator"),
            head_every=c.distill.head_every,
            pixel=self.pixel,
        )

    def _pixel_heads(self) -> MultiHeadDiscriminator | None:
        """ADP's 2D heads on the pixel backbone's layers (drawn in the heads' seeded scope)."""
        if self.pixel is None:
            return None
        d = self.config.distill
        return MultiHeadDiscriminator(
            num_heads=len(self.pixel.layers), in_channels=self.pixel.channels, kind="2d",
            hidden_channels=d.head_hidden, num_blocks=d.head_blocks,
        ).to(self.device, self.dtype)

    def _build_data(self) -> None:
        from adm_megatron.data import PromptSampler

        d = self.config.data
        self.layout = BatchLayout(d.batch_size, self.info.dp_rank, self.info.dp_size,
                                  microbatches_for(d.global_batch_size, d.batch_size, self.info.dp_size))
        self.sampler = PromptSampler(self.text_source, self.layout, seed=self.config.seed)
        if self.info.rank == 0:
            logger.info("global batch %d: %d row(s) per micro-batch x %d data-parallel rank(s) x %d micro-batch(es) "
                        "per update", self.layout.global_batch, d.batch_size, self.info.dp_size,
                        self.layout.microbatches)
        self.real_sampler = None
        if self.algorithm.needs_real_samples:
            from adm_megatron.data.ode_pairs import OdePairs, RealSampler

            self.real_sampler = RealSampler(OdePairs(d.real_path), self.layout, seed=self.config.seed)

    # -- the loop ------------------------------------------------------------------------------
    def draws(self, iteration: int, phase: str) -> PhaseDraws:
        """A phase's draws in ``iteration`` for this rank's micro-batches (the same whatever the split
        of the global batch)."""
        generator = torch.Generator().manual_seed(_seed(self.config.seed, iteration, phase))
        return PhaseDraws(generator, self.layout)

    def batches(self, iteration: int) -> list[PhaseBatch]:
        """The iteration's micro-batches on this rank: prompts, the two phases' independent starting
        noises (z for the fake-score phase, ẑ for the generator phase, each from its own stream) and,
        if the method reads them, real samples."""
        fake_noise, generator_noise = self.draws(iteration, "noise/fake_score"), self.draws(iteration, "noise/generator")
        return [self._batch(iteration, m, fake_noise.micro(m), generator_noise.micro(m))
                for m in range(self.layout.microbatches)]

    def _batch(self, iteration: int, micro: int, fake_noise, generator_noise) -> PhaseBatch:
        text, negative = self.sampler.batch(iteration, micro)
        d = self.config.data
        shape = (d.batch_size, *self.family.latent_shape(self.arch, d.frames, d.height, d.width))
        template = torch.empty(shape, dtype=self.dtype)
        to = dict(device=self.device, dtype=self.dtype)
        real = None
        pooled = self.sampler.pooled(iteration, micro)  # (pooled, negative pooled) or None
        if self.real_sampler is not None:
            x_T, x0, prompt_ids = self.real_sampler.batch(iteration, micro)
            real = RealBatch(x0=x0.to(**to), text=self.text_source.get(prompt_ids).to(**to), x_T=x_T.to(**to),
                             pooled=self.text_source.get_pooled(prompt_ids).to(**to) if pooled else None)
        return PhaseBatch(
            text=text.to(**to), negative=negative.to(**to),
            pooled=pooled[0].to(**to) if pooled else None, negative_pooled=pooled[1].to(**to) if pooled else None,
            fake_noise=fake_noise.randn(template).to(**to), generator_noise=generator_noise.randn(template).to(**to),
            real=real,
        )

    def train_iteration(self, iteration: int) -> dict:
        metrics = {"iteration": iteration}
        try:
            return self._train_iteration(iteration, metrics)
        except NonFiniteError as stop:  # the record of the iteration that stopped: its phases up to the stop
            stop.metrics = {**metrics, **stop.metrics}
            raise

    def _train_iteration(self, iteration: int, metrics: dict) -> dict:
        start = time.perf_counter()
        self.flops.reset()
        batches = self.batches(iteration)
        k = self.layout.microbatches
        alg = self.algorithm
        if alg.fake_phase_trains:
            draws = self.draws(iteration, "fake_score")
            phase_metrics, _ = self.phases.run(
                "fake_score", lambda m: alg.fake_score_loss(batches[m], draws.micro(m)), iteration,
                co_trained=alg.fake_phase_trains[1:], microbatches=k,
            )
            metrics.update(phase_metrics)
        if iteration % self.config.distill.ttur == 0:
            draws = self.draws(iteration, "generator")
            phase_metrics, pairs = self.phases.run(
                "generator", lambda m: alg.generator_loss(batches[m], draws.micro(m)), iteration, microbatches=k
            )
            metrics.update(phase_metrics)
            if self.ema is not None and not phase_metrics["generator/skipped"]:  # a skipped update moves nothing
                self.ema.update(self.generator)
            if alg.discriminator_phase:
                phase_metrics, _ = self.phases.run(
                    "discriminator", lambda m: alg.discriminator_loss(pairs[m], batches[m]), iteration,
                    microbatches=k,
                )
                metrics.update(phase_metrics)
            elif pairs[0] is not None:  # heads kept frozen (an ablation): still report how they discriminate
                metrics.update(self._frozen_heads_metrics(pairs, batches))
        accuracy = metrics.get("discriminator/paired_accuracy")
        if accuracy is not None and self.monitor.update(accuracy) and self.info.rank == 0:
            logger.warning(self.monitor.message(iteration))
        metrics.update(self._throughput(time.perf_counter() - start))
        return metrics

    def _throughput(self, seconds: float) -> dict:
        """The iteration's wall time (its last phase's metrics were read on the host: the device work
        is done), samples per second, and model TFLOP/s per GPU (and MFU where the peak is known)."""
        gpus_per_replica = self.config.parallel.tensor_parallel * self.config.parallel.context_parallel
        tflops = sum(t.flops for t in self.flops.tallies.values()) / gpus_per_replica / seconds / 1e12
        out = {"throughput/iteration_seconds": seconds,
               "throughput/samples_per_second": self.layout.global_batch / seconds,
               "throughput/tflops_per_gpu": tflops}
        if self.peak_tflops:
            out["throughput/mfu"] = tflops / self.peak_tflops
        return out

    def _frozen_heads_metrics(self, pairs: list, batches: list[PhaseBatch]) -> dict:
        """The discriminator's loss and statistics on the generator phase's pairs, without an update."""
        bf16 = self.config.model.dtype == "bf16"  # as in the phases (the teacher is bf16 then)
        per_micro = []
        with torch.no_grad(), torch.autocast(self.device.type, torch.bfloat16, enabled=bf16):
            for pair, batch in zip(pairs, batches):
                loss, d_metrics, _ = self.algorithm.discriminator_loss(pair, batch)
                per_micro.append({"discriminator/loss": loss.item(), **prefixed(d_metrics, "discriminator")})
        return mean_metrics(per_micro)

    @staticmethod
    def _finish_save_before_stopping(saves: BackgroundSaves) -> None:
        """A NaN / Inf stop (``train.nan_policy``) comes at the same update on every rank (the decision
        is collective): a background checkpoint still being written holds the state staged before that
        update, so it is finished and published rather than thrown away with the rank's writer (the
        run would otherwise go back ``train.save_every`` iterations more). A write that fails here is
        logged; the stop stays the reason the run ends."""
        try:
            saves.wait()
        except CheckpointError as err:
            logger.error("%s", err)

    def fit(self) -> RunResult:
        c = self.config
        total = c.train.max_iterations
        if self.resume_point.finished:
            logger.info("%s: the run finished all %d iterations already; nothing to do", c.output_dir, total)
            return RunResult(c.output_dir, total, None, [], {}, trained=0)
        rank0 = self.info.rank == 0
        start = self.start_iteration
        # the stop signals' handler before the run's files are touched (a signal raising in the middle of
        # writing config.yaml would cut it) and before rank 0's wandb start, which takes seconds
        stops = StopPoll(c.train.save_interval_minutes)
        if rank0:
            os.makedirs(c.output_dir, exist_ok=True)
            config_path = os.path.join(c.output_dir, "config.yaml")
            if not os.path.exists(config_path):  # a resumed run keeps the config it started with
                with open(config_path, "w") as f:
                    yaml.safe_dump(config_to_dict(c), f, sort_keys=False)
            for name in remove_leftovers(c.output_dir):
                logger.info("removed %s left by an interrupted save", name)
            trim_metrics(c.output_dir, start)
            if self.resume_point.rolled_back:  # from now on the run's latest (a requeue before a save goes on here)
                write_latest_marker(c.output_dir, os.path.basename(self.resume_point.checkpoint))
            record_start(c.output_dir, start_record(self.info, start, self.resume_point.checkpoint,
                                                    self.resume_point.rolled_back,
                                                    config_changes(c.output_dir, config_to_dict(c))))
        run_log = RunLogger(
            c.output_dir, config_to_dict(c), total, start, rank0, c.train.log_every,
            c.logging.wandb_mode, c.logging.wandb_project, c.logging.progress, c.logging.wandb_name,
            c.logging.tensorboard,
        )
        samples = RunSamples(self)
        saves = BackgroundSaves(c.parallel.timeout_s)  # train.async_save's checkpoint in flight
        metrics: dict = {}
        done = start
        try:
            for iteration in range(start, total):
                with self.profiler.iteration(iteration):
                    metrics = self.train_iteration(iteration)
                run_log.log(metrics, last=iteration == total - 1)
                done = iteration + 1
                saves.poll()
                stop, due = stops.poll()
                periodic = c.train.save_every and done % c.train.save_every == 0
                if done < total and (periodic or due or stop):
                    saves.wait()  # one checkpoint at a time, published in order
                    if c.train.async_save and not stop:  # a stopping run's last one is written before it exits
                        saves.start(start_training_checkpoint(self, done))
                    else:
                        save_training_checkpoint(self, done)
                    stops.saved()
                # after the save: a run stopped here keeps these samples, and its next start renders
                # only later iterations'
                if c.train.sample_every and done % c.train.sample_every == 0 and done < total and samples.enabled:
                    self.offload.restore_weights()  # the next phase offloads again what it does not run
                    run_log.media(done, samples.render(done))
                if stop and done < total:
                    return RunResult(c.output_dir, done, None, [], metrics, trained=done - start, preempted=True)
            saves.wait()
            if start < total:  # (a run resumed at its end loaded this very checkpoint)
                save_training_checkpoint(self, total)
            generator_dir, paths = None, []
            if rank0:
                clear_earlier_end(c.output_dir)  # a lengthened run's earlier end: its export and samples
            self.offload.restore_weights()
            if c.train.export:
                if self.ema is not None:
                    self.ema.copy_to(self.generator)
                generator_dir = export_generator(self.generator, self.arch, os.path.join(c.output_dir, "generator"),
                                                 lora_mode=c.train.export_lora, record=distillation_record(c, total, self.arch, weights=self.weights_identity))
            if samples.enabled:
                paths = samples.render(None)
                run_log.media(total, paths)
        except NonFiniteError as stop:
            if stop.metrics:
                run_log.log(stop.metrics, last=True)
            self._finish_save_before_stopping(saves)
            raise
        finally:
            saves.abort()  # a save still in flight here means this rank failed: the previous one stays latest
            self.profiler.close()  # a window the run did not finish: what it recorded
            self.run_lock.release()
            run_log.close()
            stops.close()
        if rank0:
            mark_finished(c.output_dir, total)
        return RunResult(c.output_dir, total, generator_dir, paths, metrics, trained=done - start)
