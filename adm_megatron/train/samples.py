"""The generator's samples during a run (every ``train.sample_every`` iterations) and at its end.

The trained generator in memory renders them: no export, no second copy of the model, on the
training device and dtype. The first ``train.num_samples`` prompts are split over the data-parallel
replicas in contiguous shares (replica r of D takes samples [r k, (r + 1) k), k = ceil(count / D)):
each replica's ranks run the generator's N-step PF-ODE (``Distillation.sample_generator``: the
sampler the family's diffusers pipeline runs with ``num_inference_steps = N``) on its share,
``data.batch_size`` at a time, at the run's latent size, under BF16 autocast when the run uses it,
with the EMA weights swapped in when ``train.ema_decay`` > 0 (and swapped back, bit for bit). Sample
``i`` starts from noise seeded by ``seed + i`` as ``adm-megatron sample`` seeds the pipeline, the
same at every sampling iteration and for any layout, so the samples show the generator's progress;
the noise comes from its own generator, so a run's training numbers do not depend on whether or how
often it samples. The first rank of each replica (TP and CP rank 0) decodes its share with the
pipeline's VAE exactly as the pipeline does (``ModelFamily.decode_images``, then ``x / 2 + 0.5``
clamped to [0, 1]: the pipeline's postprocess; ``train.sample_vae_tiling``: in overlapping tiles, as
the pipeline after ``vae.enable_tiling()``, for less memory) and writes the files into the run's directory (which
every rank sees, as checkpoints need); the VAE waits in host memory between samplings, and a decode
that runs out of GPU memory costs its samples only (a warning; training goes on). So D replicas
render in about 1 / D of one replica's time. Files: ``samples/iter_NNNNNNN/`` during the run,
``samples/`` at the end, ``sample-iii.gif`` for videos and ``.png`` for images (and ``grid.png``
tiling them, by rank 0 from the written images), each directory written beside and renamed into
place by rank 0 when every writer is done; wandb gets them as media.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil

import torch

from adm_megatron.data.batch_layout import contiguous_share
from adm_megatron.models.frame_files import sample_name, write_frames, write_grid
from adm_megatron.parallel import barrier

logger = logging.getLogger("adm_megatron")


def sample_vae_dtype(config) -> torch.dtype:
    """The dtype a run's samples decode in: bf16 for bf16 runs, else the run's (fp32 / fp64)."""
    return {"bf16": torch.bfloat16, "fp64": torch.float64}.get(config.model.dtype, torch.float32)


def sample_vae(vae, config):
    """The pipeline's VAE as a run's samples use it: frozen, in ``sample_vae_dtype``, tiled with
    ``train.sample_vae_tiling``."""
    dtype = sample_vae_dtype(config)
    if next(vae.parameters()).dtype != dtype:
        vae = vae.to(dtype)
    vae = vae.eval().requires_grad_(False)
    if config.train.sample_vae_tiling:
        vae.enable_tiling()
    return vae


def decoded_pixels(family, vae, latents: torch.Tensor) -> torch.Tensor:
    """Latents -> every frame ``[N, h, w, 3]`` in [0, 1] on the VAE's device: the family's pipeline
    decode, then the pipelines' postprocess (``x / 2 + 0.5`` clamped)."""
    return (family.decode_images(vae, latents).float() / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1)


def sample_dir(output_dir: str, iteration: int | None) -> str:
    """Where the samples of ``iteration`` go (``None``: the finished run's)."""
    root = os.path.join(output_dir, "samples")
    return root if iteration is None else os.path.join(root, f"iter_{iteration:07d}")


class RunSamples:
    def __init__(self, trainer):
        self.trainer = trainer
        config = trainer.config
        source = trainer.text_source
        self.count = min(config.train.num_samples, len(source))
        self.fmt = "png" if trainer.family.latent_layout == "image" else "gif"
        self.vae = None
        indices = torch.arange(self.count)
        self.text = source.get(indices)
        self.pooled = source.get_pooled(indices) if source.pooled_dim else None

    @property
    def enabled(self) -> bool:
        return self.count > 0 and bool(self.trainer.teacher_source.pipeline_dir)

    def latent_shape(self) -> tuple[int, ...]:
        """One sample's latent shape at the run's size (no batch dimension)."""
        t = self.trainer
        d = t.config.data
        return t.family.latent_shape(t.arch, d.frames, d.height, d.width)

    def noise(self, index: int) -> torch.Tensor:
        """Sample ``index``'s starting noise (one row), as ``torch.Generator().manual_seed(seed + i)``."""
        t = self.trainer
        generator = torch.Generator().manual_seed(t.config.seed + index)
        return torch.randn((1, *self.latent_shape()), generator=generator, dtype=t.dtype)

    def share(self) -> range:
        """The samples this rank's data-parallel replica renders."""
        return contiguous_share(self.count, self.trainer.info.dp_rank, self.trainer.info.dp_size)

    @torch.no_grad()
    def latents(self, indices: range | None = None) -> torch.Tensor:
        """Collective over the model-parallel group: the clean latents of samples ``indices`` (default
        all), on each of its ranks; ``[0, ...]`` for an empty range."""
        from adm_megatron.algorithms.networks import text_condition

        t = self.trainer
        indices = range(self.count) if indices is None else indices
        rows = t.config.data.batch_size
        to = dict(device=t.device, dtype=t.dtype)
        bf16 = t.config.model.dtype == "bf16"
        out = [torch.empty(0, *self.latent_shape())]
        with self._ema_weights(), torch.autocast(t.device.type, torch.bfloat16, enabled=bf16):
            for lo in range(indices.start, indices.stop, rows):
                hi = min(lo + rows, indices.stop)
                noise = torch.cat([self.noise(i) for i in range(lo, hi)]).to(**to)
                cond = text_condition(self.text[lo:hi].to(**to),
                                      None if self.pooled is None else self.pooled[lo:hi].to(**to))
                out.append(t.algorithm.sample_generator(noise, cond).float().cpu())
        return torch.cat(out)

    def _ema_weights(self):
        """The generator holds its EMA weights inside the block (``ParameterEMA.swapped_in``)."""
        ema = self.trainer.ema
        return contextlib.nullcontext() if ema is None else ema.swapped_in(self.trainer.generator)

    @torch.no_grad()
    def frames(self, latents: torch.Tensor) -> list:
        """Each sample's frames ``[F, h, w, 3]`` in [0, 1] (numpy), decoded as the pipeline does, one
        sample at a time (each leaves the GPU before the next is decoded)."""
        t = self.trainer
        vae = self._vae().to(t.device)
        try:
            dtype = next(vae.parameters()).dtype
            return [decoded_pixels(t.family, vae, latent[None].to(t.device, dtype)).cpu().numpy() for latent in latents]
        finally:
            vae.to("cpu")  # its GPU memory goes back to training

    def _vae(self):
        if self.vae is None:
            t = self.trainer
            self.vae = sample_vae(t.family.load_vae(os.path.join(t.teacher_source.pipeline_dir, "vae")), t.config)
        return self.vae

    def _write_share(self, latents: torch.Tensor, share: range, directory: str, names: list[str],
                     iteration: int | None) -> None:
        """Decode and write this replica's samples. The decode is local (no collective), so a GPU
        out of memory in it costs these samples only: a warning, and training goes on (the samples
        watch the run; they must not end it)."""
        try:
            frames = self.frames(latents)
        except torch.OutOfMemoryError as err:
            logger.warning("samples of %s: the VAE decode ran out of GPU memory on rank %d (%s); samples %d..%d "
                           "skipped, training goes on", "the end" if iteration is None else f"iteration {iteration}",
                           self.trainer.info.rank, str(err).splitlines()[0][:120], share.start, share.stop - 1)
            if torch.cuda.is_available():  # (frames() has moved the VAE back to host memory)
                torch.cuda.empty_cache()
            return
        for i, sample in zip(share, frames):
            write_frames(sample, os.path.join(directory, names[i]), self.fmt)

    def render(self, iteration: int | None) -> list[str]:
        """Collective: render and write the samples of ``iteration`` (``None``: the end), each
        replica its share; returns the written paths on rank 0, [] elsewhere."""
        info = self.trainer.info
        out = sample_dir(self.trainer.config.output_dir, iteration)
        partial = f"{out}.partial"
        names = [sample_name(i, self.fmt) for i in range(self.count)]
        if info.rank == 0:
            shutil.rmtree(partial, ignore_errors=True)
            os.makedirs(partial)
        mine = self.share()
        latents = self.latents(mine)
        barrier()  # the directory exists
        if info.tp_rank == 0 and info.cp_rank == 0 and len(mine):
            self._write_share(latents, mine, partial, names, iteration)
        barrier()  # every share is written
        if info.rank != 0:
            return []
        names = [name for name in names if os.path.isfile(os.path.join(partial, name))]
        if self.fmt == "png" and names:  # images: also all of them in one grid
            write_grid([os.path.join(partial, name) for name in names], os.path.join(partial, "grid.png"))
            names.append("grid.png")
        if iteration is None:  # samples/ also holds the iterations' directories: move the files alone
            os.makedirs(out, exist_ok=True)
            for name in names:
                os.replace(os.path.join(partial, name), os.path.join(out, name))
            os.rmdir(partial)
        else:
            shutil.rmtree(out, ignore_errors=True)  # a resumed run redoing this iteration
            os.replace(partial, out)
        return [os.path.join(out, name) for name in names]
