"""A run's samples (``train.sample_every``, ``train.num_samples``; adm_megatron/train/samples.py):

- rendered by the generator in memory (its EMA weights swapped in), they are the images the
  family's real diffusers pipeline renders from the exported (EMA) generator with the same seeds and
  size (CogVideoX videos, SD3 images; fp32, 1e-4 in [0, 1] pixels);
- every rank of a TP = 2 (with SP) or CP = 2 world renders the one-process samples (gloo); the
  replicas of a DP = 2 world each render and write only their share, and the files are the
  one-process files;
- sampling changes nothing a run trains: metrics and weights of a run that samples every
  iteration (with the EMA weights swapped in) equal those of a run that does not, bit for bit;
- the files: ``samples/iter_NNNNNNN/`` per sampling iteration and ``samples/`` at the end, and the
  same images as wandb media;
- a run stopped by a signal at a sampling iteration keeps those samples, and started again renders
  only the iterations after its checkpoint, into the same wandb run;
- a sampling request without samples to render is a one-line error.
"""

from __future__ import annotations

import glob
import json
import os
import signal

import numpy as np
import pytest
import torch

from adm_megatron.config import ConfigError, load_config
from tiny_runs import without_timing

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLES = {"cogvideox": "examples/cogvideox/tiny_cpu.yaml", "sd3": "examples/sd35/tiny_cpu.yaml"}
QUIET = ["logging.progress=false", "data.source=synthetic", "data.num_prompts=4"]
LAYOUTS = {"tp2-sp": ["parallel.tensor_parallel=2", "model.sequence_parallel=true"],
           "cp2": ["parallel.context_parallel=2"]}


def _config(family, pipeline_dir, out, *overrides):
    return load_config(os.path.join(ROOT, EXAMPLES[family]),
                       [f"model.teacher={pipeline_dir}", f"output_dir={out}", *QUIET, *overrides])


def _pipeline_frames(family: str, pipeline_dir: str, generator_dir: str, trainer,
                     vae_tiling: bool = False) -> list[np.ndarray]:
    """The diffusers pipeline's render of the exported generator: sample i from seed + i, at the run's size."""
    config = trainer.config
    d, steps, count = config.data, config.distill.generator_steps, config.train.num_samples
    text = trainer.text_source.get(torch.arange(count))
    frames = []
    if family == "cogvideox":
        from adm_megatron.models.cogvideox_samples import _load_pipeline

        pipe = _load_pipeline(pipeline_dir, generator_dir, torch.float32, "cpu", vae_tiling)
        size = dict(height=d.height * pipe.vae_scale_factor_spatial, width=d.width * pipe.vae_scale_factor_spatial,
                    num_frames=(d.frames - 1) * pipe.vae_scale_factor_temporal + 1)
        for i in range(count):
            frames.append(pipe(prompt_embeds=text[i:i + 1], num_inference_steps=steps, guidance_scale=1.0,
                               generator=torch.Generator().manual_seed(config.seed + i), output_type="np",
                               **size).frames[0])
    else:
        from adm_megatron.models.sd3_samples import _load_pipeline

        pipe = _load_pipeline(pipeline_dir, generator_dir, torch.float32, "cpu", vae_tiling)
        pooled = trainer.text_source.get_pooled(torch.arange(count))
        for i in range(count):
            image = pipe(prompt_embeds=text[i:i + 1], pooled_prompt_embeds=pooled[i:i + 1], num_inference_steps=steps,
                         guidance_scale=1.0, height=d.height * pipe.vae_scale_factor,
                         width=d.width * pipe.vae_scale_factor, generator=torch.Generator().manual_seed(config.seed + i),
                         output_type="np").images[0]
            frames.append(image[None])
    return frames


@pytest.mark.parametrize("family", ["cogvideox", "sd3"])
def test_samples_are_the_pipelines_render_of_the_exported_generator(family, cogvideox_pipeline, sd3_pipeline,
                                                                     tmp_path, world_of_one):
    from adm_megatron.train.export import export_generator
    from adm_megatron.train.samples import RunSamples
    from adm_megatron.train.trainer import Trainer

    pipeline_dir = cogvideox_pipeline if family == "cogvideox" else sd3_pipeline
    trainer = Trainer(_config(family, pipeline_dir, tmp_path / "run", "train.num_samples=3", "data.batch_size=2",
                              "train.ema_decay=0.5"))
    trainer.train_iteration(0)  # a generator that is not the teacher, and an EMA that is neither
    samples = RunSamples(trainer)
    ours = samples.frames(samples.latents())  # the EMA weights swapped in
    trainer.ema.copy_to(trainer.generator)  # as a finished run exports
    generator_dir = export_generator(trainer.generator, trainer.arch, str(tmp_path / "generator"))
    theirs = _pipeline_frames(family, pipeline_dir, generator_dir, trainer)
    assert len(ours) == len(theirs) == 3
    for i, (a, b) in enumerate(zip(ours, theirs)):
        assert a.shape == b.shape and a.shape[-1] == 3, (i, a.shape, b.shape)
        assert np.abs(a - b).max() <= 1e-4, (family, i, np.abs(a - b).max())
    assert np.abs(ours[0] - ours[1]).max() > 0.01  # different prompts and noises, different samples


def test_tiled_samples_are_the_pipelines_tiled_render(cogvideox_pipeline, tmp_path, world_of_one, monkeypatch):
    """train.sample_vae_tiling: the VAE decodes the run's samples in tiles, exactly as the pipeline does
    after vae.enable_tiling(), and not as the untiled decode does. (diffusers sizes CogVideoX's tiles
    from the VAE's sample size, 480 x 720: tiles of 240 x 360 pixels step 200 x 288. The tiny VAE is
    given 48 x 40, tiles of 24 x 20 stepping 20 x 16, so its 32-pixel frames are 2 x 2 tiles.)"""
    import shutil

    from diffusers import AutoencoderKLCogVideoX

    from adm_megatron.train.export import export_generator
    from adm_megatron.train.samples import RunSamples
    from adm_megatron.train.trainer import Trainer

    tiled_calls = []
    tiled = AutoencoderKLCogVideoX.tiled_decode
    monkeypatch.setattr(AutoencoderKLCogVideoX, "tiled_decode",
                        lambda self, *a, **k: tiled_calls.append(1) or tiled(self, *a, **k))
    pipeline_dir = str(tmp_path / "pipe")
    shutil.copytree(cogvideox_pipeline, pipeline_dir)
    vae_config = os.path.join(pipeline_dir, "vae", "config.json")
    with open(vae_config) as f:
        config = json.load(f)
    with open(vae_config, "w") as f:
        json.dump({**config, "sample_height": 48, "sample_width": 40}, f)
    trainer = Trainer(_config("cogvideox", pipeline_dir, tmp_path / "run", "train.num_samples=2",
                              "train.sample_vae_tiling=true"))
    samples = RunSamples(trainer)
    latents = samples.latents()
    ours = samples.frames(latents)
    assert len(tiled_calls) == 2  # one tiled decode per sample
    generator_dir = export_generator(trainer.generator, trainer.arch, str(tmp_path / "generator"))
    theirs = _pipeline_frames("cogvideox", pipeline_dir, generator_dir, trainer, vae_tiling=True)
    untiled = _pipeline_frames("cogvideox", pipeline_dir, generator_dir, trainer)
    for a, b, c in zip(ours, theirs, untiled):
        assert a.shape == c.shape == (9, 32, 32, 3) and np.abs(a - b).max() <= 1e-4
        assert np.abs(a - c).max() > 1e-3  # the tiles are blended: not the whole-frame decode


def _metrics(out) -> list[dict]:
    return [without_timing(json.loads(line)) for line in open(os.path.join(out, "metrics.jsonl"))]


def test_sampling_changes_nothing_the_run_trains_and_writes_files_and_wandb_media(cogvideox_pipeline, tmp_path,
                                                                                   world_of_one):
    from adm_megatron.parallel import destroy_parallel
    from adm_megatron.train.trainer import Trainer

    common = ["train.max_iterations=3", "train.ema_decay=0.5", "train.export=false", "data.batch_size=1"]
    runs = {}
    for name, every in (("plain", 0), ("sampled", 1)):
        out = tmp_path / name
        trainer = Trainer(_config("cogvideox", cogvideox_pipeline, out, *common, f"train.sample_every={every}"))
        result = trainer.fit()
        runs[name] = (out, {n: p.detach().clone() for n, p in trainer.generator.named_parameters()},
                      {n: s.clone() for n, s in trainer.ema.shadow.items()}, result)
        destroy_parallel()
    (plain, plain_weights, plain_ema, _), (sampled, weights, ema, result) = runs["plain"], runs["sampled"]
    assert _metrics(sampled) == _metrics(plain) and len(_metrics(plain)) == 3
    assert all(torch.equal(weights[n], w) for n, w in plain_weights.items())
    assert all(torch.equal(ema[n], w) for n, w in plain_ema.items())

    for iteration in (1, 2):
        assert sorted(os.listdir(sampled / "samples" / f"iter_{iteration:07d}")) == ["sample-000.gif", "sample-001.gif"]
    assert result.samples == [str(sampled / "samples" / f"sample-00{i}.gif") for i in range(2)]
    assert sorted(os.listdir(plain / "samples")) == ["sample-000.gif", "sample-001.gif"]  # the end only
    assert not glob.glob(str(sampled / "samples" / "*.partial"))
    media = glob.glob(str(sampled / "wandb" / "offline-run-*" / "files" / "media" / "videos" / "*.gif"))
    assert len(media) == 6  # 2 samples at iterations 1, 2 and the end
    plain_media = glob.glob(str(plain / "wandb" / "offline-run-*" / "files" / "media" / "videos" / "*.gif"))
    assert len(plain_media) == 2


def test_a_stopped_run_keeps_its_samples_and_renders_only_later_ones(cogvideox_pipeline, tmp_path, world_of_one):
    from adm_megatron.parallel import destroy_parallel
    from adm_megatron.train import samples as samples_module
    from adm_megatron.train.trainer import Trainer

    rendered = []
    render = samples_module.RunSamples.render

    def recorded(self, iteration):
        rendered.append(iteration)
        return render(self, iteration)

    samples_module.RunSamples.render = recorded
    try:
        config = _config("cogvideox", cogvideox_pipeline, tmp_path / "run", "train.max_iterations=4",
                         "train.sample_every=1", "train.export=false", "data.batch_size=1")
        trainer = Trainer(config)
        train_iteration = trainer.train_iteration

        def stopped_in_iteration_1(iteration):
            metrics = train_iteration(iteration)
            if iteration == 1:
                os.kill(os.getpid(), signal.SIGTERM)  # as a scheduler would, during the iteration
            return metrics

        trainer.train_iteration = stopped_in_iteration_1
        assert trainer.fit().preempted
        destroy_parallel()
        assert rendered == [1, 2]  # the samples of the iteration it stopped at, after its checkpoint
        first = {i: os.stat(tmp_path / "run" / "samples" / f"iter_{i:07d}" / "sample-000.gif").st_mtime_ns
                 for i in (1, 2)}
        rendered.clear()
        resumed = Trainer(config)
        assert resumed.start_iteration == 2
        resumed.fit()
        assert rendered == [3, None]
        assert {i: os.stat(tmp_path / "run" / "samples" / f"iter_{i:07d}" / "sample-000.gif").st_mtime_ns
                for i in (1, 2)} == first
        # both starts logged to one wandb run: the id the first one chose
        run_id = json.load(open(tmp_path / "run" / "wandb_run.json"))["id"]
        starts = glob.glob(str(tmp_path / "run" / "wandb" / "offline-run-*"))
        assert len(starts) == 2 and all(s.endswith(f"-{run_id}") for s in starts)
    finally:
        samples_module.RunSamples.render = render


def test_sampling_without_samples_is_a_one_line_error(cogvideox_pipeline, tmp_path, world_of_one):
    from adm_megatron.train.trainer import Trainer

    with pytest.raises(ConfigError, match=r"train.sample_every=5: renders train.num_samples=0 samples") as err:
        Trainer(_config("cogvideox", cogvideox_pipeline, tmp_path / "a", "train.sample_every=5",
                        "train.num_samples=0"))
    assert "\n" not in str(err.value)
    with pytest.raises(ConfigError, match=r"train.sample_every=-1: must be >= 0"):
        _config("cogvideox", cogvideox_pipeline, tmp_path / "b", "train.sample_every=-1")


def _latents_at(pipeline_dir: str, out: str, overrides: list[str]):
    from adm_megatron.parallel import destroy_parallel
    from adm_megatron.train.samples import RunSamples
    from adm_megatron.train.trainer import Trainer

    trainer = Trainer(_config("cogvideox", pipeline_dir, out, "train.num_samples=3", "data.batch_size=2",
                              "train.ema_decay=0.5", *overrides))
    trainer.train_iteration(0)
    latents = RunSamples(trainer).latents()
    destroy_parallel()
    return latents


def _parallel_latents(pipeline_dir: str, root: str):
    return {name: _latents_at(pipeline_dir, f"{root}/{name}", overrides) for name, overrides in LAYOUTS.items()}


def test_tensor_and_context_parallel_samples_equal_one_process(cogvideox_pipeline, tmp_path, world_of_one):
    """Every rank of a TP = 2 (SP) or CP = 2 world renders the one-process samples (1e-5: the same
    trained generator, its EMA, its N steps; summation order only)."""
    from multiproc import run_world

    reference = _latents_at(cogvideox_pipeline, str(tmp_path / "one"), [])
    ranks = run_world(_parallel_latents, 2, cogvideox_pipeline, str(tmp_path), timeout_s=600)
    for name in LAYOUTS:
        for rank, result in enumerate(ranks):
            got = result[name]
            assert got.shape == reference.shape
            assert ((got - reference).abs().max() / reference.abs().max()).item() <= 1e-5, (name, rank)


def _render_counted(pipeline_dir: str, out: str) -> tuple[list[str], list[int]]:
    """An untrained SD3 run's samples at iteration 7: the written paths (rank 0) and the batch of
    each generator rollout this rank ran."""
    from adm_megatron.parallel import destroy_parallel
    from adm_megatron.train.samples import RunSamples
    from adm_megatron.train.trainer import Trainer

    trainer = Trainer(_config("sd3", pipeline_dir, out, "train.num_samples=3", "data.batch_size=2"))
    rows = []
    rollout = trainer.algorithm.sample_generator
    trainer.algorithm.sample_generator = lambda noise, cond: rows.append(noise.shape[0]) or rollout(noise, cond)
    paths = RunSamples(trainer).render(7)
    destroy_parallel()
    return paths, rows


def test_data_parallel_replicas_split_the_samples_and_write_the_one_process_files(sd3_pipeline, tmp_path,
                                                                                  world_of_one):
    """With DP = 2 each replica rolls out and writes only its share (3 samples: [0, 1] and [2]) and
    the files, the grid included, are the one-process files, pixel for pixel."""
    import imageio.v3 as iio
    from multiproc import run_world

    one_paths, one_rows = _render_counted(sd3_pipeline, str(tmp_path / "one"))
    ranks = run_world(_render_counted, 2, sd3_pipeline, str(tmp_path / "dp2"), timeout_s=600)
    assert one_rows == [2, 1] and [rows for _, rows in ranks] == [[2], [1]]
    paths = ranks[0][0]
    assert ranks[1][0] == [] and [os.path.basename(p) for p in paths] == [os.path.basename(p) for p in one_paths]
    assert [os.path.basename(p) for p in paths] == ["sample-000.png", "sample-001.png", "sample-002.png", "grid.png"]
    assert sorted(os.listdir(tmp_path / "dp2" / "samples")) == ["iter_0000007"]  # no partial directory left
    for got, want in zip(paths, one_paths):
        assert np.array_equal(iio.imread(got), iio.imread(want)), got


def test_a_decode_out_of_gpu_memory_costs_its_samples_not_the_run(cogvideox_pipeline, tmp_path, world_of_one, caplog):
    """The VAE decode is local to the writing rank: out of memory there, the run logs a warning,
    leaves those samples out and trains on, with the metrics and weights of a run that samples."""
    from adm_megatron.families import get_family
    from adm_megatron.parallel import destroy_parallel
    from adm_megatron.train.trainer import Trainer

    common = ["train.max_iterations=2", "train.export=false", "data.batch_size=1", "train.sample_every=1"]
    runs = {}
    family = get_family("cogvideox")
    decode = family.decode_images
    for name in ("fine", "oom"):
        def decode_or_oom(vae, latents, name=name):
            if name == "oom":
                raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
            return decode(vae, latents)

        object.__setattr__(family, "decode_images", decode_or_oom)
        try:
            trainer = Trainer(_config("cogvideox", cogvideox_pipeline, tmp_path / name, *common))
            with caplog.at_level("WARNING", logger="adm_megatron"):
                result = trainer.fit()
            runs[name] = (result, {n: p.detach().clone() for n, p in trainer.generator.named_parameters()})
        finally:
            object.__setattr__(family, "decode_images", decode)
            destroy_parallel()
    (fine, fine_weights), (oom, oom_weights) = runs["fine"], runs["oom"]
    assert _metrics(tmp_path / "oom") == _metrics(tmp_path / "fine") and oom.iterations == 2
    assert all(torch.equal(oom_weights[n], w) for n, w in fine_weights.items())
    assert oom.samples == [] and len(fine.samples) == 2
    assert os.listdir(tmp_path / "oom" / "samples" / "iter_0000001") == []
    assert "samples of iteration 1: the VAE decode ran out of GPU memory on rank 0" in caplog.text
