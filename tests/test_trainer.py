"""The ADM trainer on a tiny CogVideoX pipeline in one process: phase isolation (each network
changes only in its own phase, the teacher never), each update improves its own objective on its
batch, ADM and DMD2 differ only by the switch, NaN handling, and config errors before any process
group exists."""

from __future__ import annotations

import math
import os

import pytest
import torch
import torch.distributed as dist

from adm_megatron.algorithms.adm import ADM
from adm_megatron.algorithms.base import Distillation
from adm_megatron.algorithms.dmd import DMD
from adm_megatron.algorithms.dmd2 import DMD2
from adm_megatron.config import ConfigError, load_config
from adm_megatron.data.tiny_pipeline import build_tiny_pipeline
from tiny_runs import without_timing

CPU_ONLY = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
BASE = [
    "data.num_prompts=4", "data.batch_size=2", "data.frames=2", "data.height=4", "data.width=4",
    "distill.generator_steps=2", "distill.delta_t=100", "distill.head_every=1",
    "distill.head_hidden=16", "train.max_iterations=2", "train.num_samples=0", "train.export=false",
    "logging.wandb_mode=disabled", "logging.progress=false",
    "optim.generator.lr=1e-3", "optim.fake_score.lr=1e-3", "optim.discriminator.lr=1e-3",
]


@pytest.fixture(scope="module")
def pipeline_dir(tmp_path_factory):
    return build_tiny_pipeline(str(tmp_path_factory.mktemp("teacher") / "pipe"), seed=0)


@pytest.fixture(scope="module")
def real_pairs(pipeline_dir, tmp_path_factory):
    """Teacher ODE pairs of the tiny pipeline at the tests' latent size (DMD2's real samples)."""
    import subprocess
    import sys

    out = tmp_path_factory.mktemp("pairs") / "pairs"
    config = out.parent / "run.yaml"
    config.write_text(f"model: {{teacher: {pipeline_dir}}}\n")
    overrides = [o for o in BASE if o.startswith(("data.", "distill.head_every"))]
    subprocess.run([sys.executable, "-m", "adm_megatron.cli", "collect-ode", "--config", str(config),
                    "--out", str(out), "--num-pairs", "6", "--shard-size", "4", "--steps", "4",
                    "--no-progress", *overrides], check=True, capture_output=True)
    return str(out)


def _config(pipeline_dir, tmp_path, *extra):
    return load_config(None, [f"model.teacher={pipeline_dir}", f"output_dir={tmp_path}", *BASE, *extra])


def _snapshot(module):
    return {n: p.detach().clone() for n, p in module.named_parameters()}


def _changed(before, module):
    return any(not torch.equal(before[n], p) for n, p in module.named_parameters())


@pytest.fixture
def trainer(pipeline_dir, tmp_path, world_of_one):
    from adm_megatron.train.trainer import Trainer

    return Trainer(_config(pipeline_dir, tmp_path))


def test_each_network_changes_only_in_its_own_phase(trainer):
    nets = {
        "teacher": trainer.networks.teacher.module,
        "fake_score": trainer.trainable["fake_score"].module,
        "generator": trainer.trainable["generator"].module,
        "discriminator": trainer.trainable["discriminator"].module,
    }
    batch, alg = trainer.batches(0)[0], trainer.algorithm
    pair = None
    for phase in ("fake_score", "generator", "discriminator"):
        before = {name: _snapshot(m) for name, m in nets.items()}
        if phase == "fake_score":
            loss_fn = lambda _micro: alg.fake_score_loss(batch, trainer.draws(0, phase).micro(0))  # noqa: E731
        elif phase == "generator":
            loss_fn = lambda _micro: alg.generator_loss(batch, trainer.draws(0, phase).micro(0))  # noqa: E731
        else:
            loss_fn = lambda _micro: alg.discriminator_loss(pair, batch)  # noqa: E731
        metrics, extras = trainer.phases.run(phase, loss_fn, 0)
        pair = extras[0] if phase == "generator" else pair
        assert metrics[f"{phase}/grad_norm"] > 0 and not metrics[f"{phase}/skipped"]
        for name, module in nets.items():
            assert _changed(before[name], module) == (name == phase), (phase, name)


def test_discriminator_update_raises_its_margin_and_generator_update_lowers_its_loss(trainer):
    batch, alg = trainer.batches(0)[0], trainer.algorithm
    g_rng = lambda: trainer.draws(0, "generator").micro(0)  # noqa: E731  the same draws before and after
    with torch.no_grad():
        g_before = alg.generator_loss(batch, g_rng())[0].item()
    trainer.phases.run("generator", lambda _micro: alg.generator_loss(batch, g_rng()), 0)
    with torch.no_grad():
        loss, _, pair = alg.generator_loss(batch, g_rng())
    assert loss.item() < g_before

    def margin():
        with torch.no_grad():
            real = alg.discriminate(pair.x_real, pair.t_prev, batch)
            fake = alg.discriminate(pair.x_fake, pair.t_prev, batch)
        return (real - fake).mean().item()

    before = margin()
    for _ in range(3):
        trainer.phases.run("discriminator", lambda _micro: alg.discriminator_loss(pair, batch), 0)
    assert margin() > before


def test_teacher_is_bit_identical_after_training_and_metrics_are_logged(trainer, tmp_path):
    import json

    teacher = _snapshot(trainer.networks.teacher.module)
    trainer.fit()
    assert not _changed(teacher, trainer.networks.teacher.module)
    rows = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    assert [r["iteration"] for r in rows] == [0, 1]
    for phase in ("fake_score", "generator", "discriminator"):
        for key in ("loss", "grad_norm", "lr", "seconds"):
            assert math.isfinite(rows[-1][f"{phase}/{key}"]), (phase, key)
    assert "discriminator/d_real" in rows[-1] and "discriminator/d_fake" in rows[-1]


def test_ttur_updates_generator_and_discriminator_every_kth_iteration(pipeline_dir, tmp_path, world_of_one):
    from adm_megatron.train.trainer import Trainer

    trainer = Trainer(_config(pipeline_dir, tmp_path, "distill.ttur=2"))
    sections = lambda metrics: {k.split("/")[0] for k in without_timing(metrics) if "/" in k}  # noqa: E731
    assert sections(trainer.train_iteration(1)) == {"fake_score"}
    assert sections(trainer.train_iteration(2)) == {"fake_score", "generator", "discriminator"}


def test_methods_differ_only_by_the_switch_and_share_the_sampling_code(pipeline_dir, real_pairs, tmp_path,
                                                                        world_of_one):
    from adm_megatron.train.trainer import Trainer

    real = f"data.real_path={real_pairs}"  # read by DMD2 only
    adm = _config(pipeline_dir, tmp_path, real)
    for method, cls in (("dmd", DMD), ("dmd2", DMD2)):
        other = _config(pipeline_dir, tmp_path, real, f"distill.method={method}")
        for section in ("model", "parallel", "data", "optim", "train", "logging"):
            assert getattr(adm, section) == getattr(other, section)
        assert {k for k, v in vars(adm.distill).items() if getattr(other.distill, k) != v} == {"method"}
        # the shared sampling is one copy: the generator's x̂0, diffusion, teacher CFG, fake-score loss
        for name in ("generator_x0", "sample_generator", "diffuse", "teacher_output", "denoising_loss"):
            assert getattr(cls, name) is getattr(Distillation, name) is getattr(ADM, name)
    assert DMD.fake_score_loss is ADM.fake_score_loss
    trainer = Trainer(_config(pipeline_dir, tmp_path, "distill.method=dmd"))
    assert isinstance(trainer.algorithm, DMD) and trainer.heads is None and "discriminator" not in trainer.trainable
    metrics = trainer.train_iteration(0)
    assert math.isfinite(metrics["generator/dmd"]) and not any(k.startswith("discriminator/") for k in metrics)


def test_dmd2_is_published_dmd2_classifier_on_the_fake_score_trained_on_noisy_real_vs_fake(
        pipeline_dir, real_pairs, tmp_path, world_of_one):
    """DMD2: heads read the fake score's features, learn with the fake score in its phase (both
    change, weighted cls_weight), see real samples; the generator gets DMD + the GAN term."""
    from adm_megatron.train.trainer import Trainer

    trainer = Trainer(_config(pipeline_dir, tmp_path, "distill.method=dmd2", f"data.real_path={real_pairs}"))
    alg = trainer.algorithm
    assert isinstance(alg, DMD2) and not alg.discriminator_phase
    assert (alg.gan_weight, alg.cls_weight) == (5e-3, 1e-2)  # DMD2's SDXL defaults
    batch = trainer.batches(0)[0]
    assert batch.real is not None and batch.real.x0.shape == batch.fake_noise.shape
    rng = lambda: trainer.draws(0, "probe").micro(0)  # noqa: E731
    with torch.no_grad():
        before = alg.classify(batch.real.x0, batch.real.text, rng())
    nets = {"fake_score": trainer.trainable["fake_score"].module, "heads": trainer.trainable["discriminator"].module,
            "generator": trainer.trainable["generator"].module}
    snap = {k: _snapshot(m) for k, m in nets.items()}
    metrics = trainer.train_iteration(0)
    assert _changed(snap["fake_score"], nets["fake_score"]) and _changed(snap["heads"], nets["heads"])
    assert metrics["discriminator/grad_norm"] > 0 and "discriminator/seconds" not in metrics  # no D phase
    for key in ("generator/dmd", "generator/gan", "fake_score/denoising", "fake_score/classifier",
                "discriminator/paired_accuracy", "discriminator/loss_vs_chance"):
        assert math.isfinite(metrics[key]), key
    # the fake phase's loss is the denoising loss + cls_weight x the classifier loss
    assert metrics["fake_score/loss"] == pytest.approx(
        metrics["fake_score/denoising"] + 1e-2 * metrics["fake_score/classifier"], rel=1e-5)
    # the classifier's backbone is the (now trained) fake score, not the teacher
    with torch.no_grad():
        after = alg.classify(batch.real.x0, batch.real.text, rng())
        x_t, t = _noised(alg, batch.real.x0, rng())
        on_fake = trainer.networks.heads(trainer.networks.fake_score.features(x_t, t, batch.real.text, 1))
        on_teacher = trainer.networks.heads(trainer.networks.teacher.features(x_t, t, batch.real.text, 1))
    assert not torch.allclose(after, before)
    assert torch.equal(after, on_fake) and not torch.allclose(after, on_teacher)


def _noised(alg, x0, rng):
    x_t, t, _ = alg.diffuse(x0, rng, t_max=alg.gan_t_max)
    return x_t, alg.schedule.model_timestep(t)


def test_nan_policy_error_raises_and_skip_leaves_weights(pipeline_dir, tmp_path, world_of_one):
    from adm_megatron.train.phases import NonFiniteError
    from adm_megatron.train.trainer import Trainer

    trainer = Trainer(_config(pipeline_dir, tmp_path))
    nan_loss = lambda _micro: (trainer.algorithm.fake_score_loss(trainer.batches(0)[0], trainer.draws(0, "f").micro(0))[0] * math.nan, {}, None)  # noqa: E731,E501
    with pytest.raises(NonFiniteError, match="iteration 0, phase fake_score: loss is nan on this rank"):
        trainer.phases.run("fake_score", nan_loss, 0)
    # another rank's NaN: this rank's finite loss is not given as the culprit ("loss is 0.5 on this or another rank")
    with pytest.raises(NonFiniteError, match=r"phase fake_score: loss is not finite on another rank \(this rank's: 0.5\)"):
        trainer.phases._step("fake_score", 0.5, False, {"fake_score": math.nan}, 0, "fake_score")
    trainer.phases.nan_policy = "skip"
    before = _snapshot(trainer.trainable["fake_score"].module)
    metrics, _ = trainer.phases.run("fake_score", nan_loss, 0)
    assert metrics["fake_score/skipped"] is True
    assert not _changed(before, trainer.trainable["fake_score"].module)


def test_a_skipped_generator_update_leaves_the_ema_and_the_optimizer_as_they_were(pipeline_dir, tmp_path,
                                                                                  world_of_one):
    """The EMA moved towards the (unchanged) generator on a skipped update: each skip was an
    extra EMA step, pulling the average to the current weights."""
    from adm_megatron.train.trainer import Trainer

    trainer = Trainer(_config(pipeline_dir, tmp_path, "train.nan_policy=skip", "train.ema_decay=0.5"))
    trainer.train_iteration(0)  # the EMA and the generator now differ
    ema = {n: t.clone() for n, t in trainer.ema.shadow.items()}
    before = _snapshot(trainer.generator)
    optimizer = trainer.trainable["generator"].optimizer
    adam = {k: v.clone() for k, v in next(iter(optimizer.optimizer.state.values())).items()}
    updates = optimizer.scheduler.num_steps
    loss = trainer.algorithm.generator_loss
    trainer.algorithm.generator_loss = lambda *a: (loss(*a)[0] * math.nan, *loss(*a)[1:])
    metrics = trainer.train_iteration(1)
    assert metrics["generator/skipped"] is True and metrics["skipped_steps"] == 1
    assert not _changed(before, trainer.generator)
    assert all(torch.equal(ema[n], t) for n, t in trainer.ema.shadow.items())
    assert all(torch.equal(adam[k], v) for k, v in next(iter(optimizer.optimizer.state.values())).items())
    assert optimizer.scheduler.num_steps == updates


def test_a_phase_that_trains_two_networks_is_skipped_whole(pipeline_dir, real_pairs, tmp_path, world_of_one):
    """DMD2's fake-score phase also trains the classifier heads: a NaN gradient in the fake score
    skipped the fake score but still stepped the heads on the same loss."""
    from adm_megatron.train.phases import NonFiniteError
    from adm_megatron.train.trainer import Trainer

    trainer = Trainer(_config(pipeline_dir, tmp_path, "distill.method=dmd2", f"data.real_path={real_pairs}",
                              "train.nan_policy=skip"))
    assert trainer.algorithm.fake_phase_trains == ("fake_score", "discriminator")
    fake, heads = _snapshot(trainer.fake_score), _snapshot(trainer.heads)
    param = next(p for p in trainer.fake_score.parameters() if p.requires_grad)
    hook = param.register_hook(lambda grad: grad * math.nan)  # the loss stays finite
    metrics = trainer.train_iteration(0)
    assert metrics["fake_score/skipped"] is True and metrics["discriminator/skipped"] is True
    assert math.isfinite(metrics["discriminator/grad_norm"]) and metrics["skipped_steps"] == 2
    assert not _changed(fake, trainer.fake_score) and not _changed(heads, trainer.heads)
    assert trainer.trainable["discriminator"].optimizer.scheduler.num_steps == 0
    trainer.phases.nan_policy = "error"
    with pytest.raises(NonFiniteError, match="iteration 1, phase fake_score: fake_score gradient norm is nan"):
        trainer.train_iteration(1)
    assert not _changed(heads, trainer.heads)
    hook.remove()


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["distill.bogus=1"], "unknown key 'distill.bogus'"),
        (["parallel.tensor_parallel=3"],
         "parallel.tensor_parallel=3 x parallel.context_parallel=1: the world size 1 is not divisible by 3"),
        (["data.height=5"], "data.height=5: not divisible by the patch size 2 (latent pixels)"),
        (["distill.head_every=3"], "distill.head_every=3: the teacher has only 2 blocks"),
        (["distill.method=gan"], "distill.method='gan': expected one of adm, dmd, dmd2"),
        (["distill.method=dmd2"], "distill.method=dmd2 needs data.real_path"),
        (["distill.method=dmd2", "data.real_path=/nonexistent"], "data.real_path='/nonexistent': does not exist"),
        (["distill.dmd_t_range=[0.5, 0.2]"], "distill.dmd_t_range=[0.5, 0.2]: expected 0 <= low < high <= 1"),
        (["model.teacher=/nonexistent"], "model.teacher='/nonexistent': directory not found"),
        (["train.max_iterations=0"], "train.max_iterations=0: must be >= 1"),
        (["optim.generator.decay_style=step"], "optim.generator.decay_style='step': expected one of constant"),
        (["optim.fake_score.min_lr=1"], "optim.fake_score.min_lr=1.0: expected 0 <= min_lr <= lr=0.001"),
        (["optim.generator.warmup_iters=1", "distill.ttur=2"],
         "optim.generator.warmup_iters=1: expected 0 <= warmup < the network's 1 updates"),
        pytest.param(["model.impl=te"], "model.impl=te: Transformer Engine with CUDA is not available here",
                     marks=CPU_ONLY),
        pytest.param(["model.dtype=bf16"], "model.dtype=bf16: BF16 autocast needs a GPU here", marks=CPU_ONLY),
    ],
)
def test_bad_configs_fail_in_one_line_before_any_process_group(pipeline_dir, tmp_path, overrides, message):
    from adm_megatron.train.trainer import Trainer

    with pytest.raises(ConfigError) as err:
        Trainer(_config(pipeline_dir, tmp_path, *overrides))
    assert message in str(err.value) and "\n" not in str(err.value)
    assert str(err.value).count(message.split(":")[0]) == 1, err.value  # the key named once
    assert not dist.is_initialized()


def test_lr_schedule_warms_up_and_decays_over_each_networks_own_updates(pipeline_dir, tmp_path, world_of_one):
    from adm_megatron.train.trainer import Trainer

    trainer = Trainer(_config(
        pipeline_dir, tmp_path, "train.max_iterations=4", "distill.ttur=2",
        "optim.generator.decay_style=linear", "optim.generator.min_lr=1e-4",
        "optim.fake_score.warmup_iters=2", "optim.fake_score.decay_style=cosine",
    ))
    lrs = {"generator": [], "fake_score": [], "discriminator": []}
    for iteration in range(4):
        metrics = trainer.train_iteration(iteration)
        for phase in lrs:
            if f"{phase}/lr" in metrics:
                lrs[phase].append(metrics[f"{phase}/lr"])
    # the rate each update used: generator 2 updates (ttur 2), linear from 1e-3 towards 1e-4
    assert lrs["generator"] == pytest.approx([1e-3, 1e-3 - 0.9e-3 / 2])
    # fake score: 4 updates, warmup from 0 (megatron's first step) to 1e-3 over 2, then cosine to 0
    assert lrs["fake_score"] == pytest.approx([0.0, 0.5e-3, 1e-3, 0.5e-3], abs=1e-12)
    assert lrs["discriminator"] == pytest.approx([1e-3, 1e-3])  # constant (the default)


def test_generator_ema_follows_the_generator(pipeline_dir, tmp_path, world_of_one):
    from adm_megatron.train.trainer import Trainer

    trainer = Trainer(_config(pipeline_dir, tmp_path, "train.ema_decay=0.5"))
    start = _snapshot(trainer.generator)
    trainer.train_iteration(0)
    for name, param in trainer.generator.named_parameters():
        expected = 0.5 * start[name] + 0.5 * param.detach()
        assert torch.allclose(trainer.ema.shadow[name], expected, atol=1e-7), name


def test_the_ema_of_bf16_weights_is_held_in_fp32_and_swapped_in_and_out_bit_for_bit():
    """With bf16 parameters (model.bf16_params) the average is fp32 and moves: 1000 updates at decay
    0.999 from 1.0 towards 1.5 reach 1.5 - 0.5 x 0.999^1000 (a bf16 average stays at 1.0: each update
    is below its resolution). Swapped in, the module runs with the average rounded to bf16, and gets
    its own weights back bit for bit, the average untouched; fp32 weights are exchanged likewise."""
    from adm_megatron.train.ema import ParameterEMA

    for dtype in (torch.bfloat16, torch.float32):
        module = torch.nn.Linear(4, 3).to(dtype)
        with torch.no_grad():
            module.weight.fill_(1.0)
        ema = ParameterEMA(module, 0.999)
        with torch.no_grad():
            module.weight.fill_(1.5)
            module.bias.copy_(torch.tensor([0.1234, -2.5, 3.75]))
        for _ in range(1000):
            ema.update(module)
        assert ema.shadow["weight"].dtype == torch.float32
        assert ema.shadow["weight"][0, 0].item() == pytest.approx(1.5 - 0.5 * 0.999**1000, abs=1e-4), dtype
        own, average = _snapshot(module), {n: s.clone() for n, s in ema.shadow.items()}
        with ema.swapped_in(module):
            for name, param in module.named_parameters():
                assert param.dtype == dtype and torch.equal(param, average[name].to(dtype)), (dtype, name)
        for name, param in module.named_parameters():
            assert torch.equal(param, own[name]) and torch.equal(ema.shadow[name], average[name]), (dtype, name)


def test_generator_init_starts_the_generator_from_a_diffusers_dir(tmp_path, world_of_one):
    from adm_megatron.models.build import load_hf_weights
    from adm_megatron.train.trainer import Trainer

    teacher = build_tiny_pipeline(str(tmp_path / "teacher"), seed=0)
    other = build_tiny_pipeline(str(tmp_path / "other"), seed=1)
    base = [f"model.teacher={teacher}", f"output_dir={tmp_path / 'run'}", "data.num_prompts=2",
            "data.batch_size=1", "data.frames=2", "data.height=4", "data.width=4",
            "distill.head_every=1", "distill.head_hidden=16", "logging.wandb_mode=disabled"]
    with pytest.raises(ConfigError, match="model.generator_init='/nonexistent': directory not found"):
        Trainer(load_config(None, base + ["model.generator_init=/nonexistent"]))
    rope = build_tiny_pipeline(str(tmp_path / "rope"), seed=1, rope=True)
    with pytest.raises(ConfigError, match="architecture differs from the teacher's"):
        Trainer(load_config(None, base + [f"model.generator_init={rope}/transformer"]))
    run = tmp_path / "stage1"  # a run's directory, its checkpoint, its LoRA file: each says what to use
    (run / "generator").mkdir(parents=True)
    (run / "generator" / "config.json").write_text("{}")
    (run / "checkpoints" / "iter_0000002").mkdir(parents=True)
    (run / "checkpoints" / "iter_0000002" / "trainer_state.json").write_text("{}")
    (run / "generator_lora").mkdir()
    (run / "generator_lora" / "pytorch_lora_weights.safetensors").write_text("")
    for path, hint in ((run, f"a run directory: its exported generator is {run / 'generator'}"),
                       (run / "checkpoints" / "iter_0000002", "adm-megatron export --checkpoint "),
                       (run / "generator_lora", "a LoRA file without its base weights: use the run's merged generator/")):
        with pytest.raises(ConfigError) as err:
            Trainer(load_config(None, base + [f"model.generator_init={path}"]))
        assert str(err.value).startswith(f"model.generator_init='{path}': ") and hint in str(err.value), str(err.value)

    trainer = Trainer(load_config(None, base + [f"model.generator_init={other}/transformer"]))
    init = load_hf_weights(f"{other}/transformer", trainer.arch)
    generator = dict(trainer.generator.named_parameters())
    fake = dict(trainer.fake_score.named_parameters())
    teacher_weights = load_hf_weights(f"{teacher}/transformer", trainer.arch)
    for name, value in init.items():
        if name in generator:
            assert torch.equal(generator[name].detach(), value), name
            assert torch.equal(fake[name].detach(), teacher_weights[name]), name  # fake stays the teacher's


def test_print_config_shows_the_whole_run_without_training(tmp_path, capsys):
    """``train --print-config``: the YAML of the run as it would start (the file, the overrides and
    every default), which loads back to the same config; nothing is built or written."""
    import yaml

    from adm_megatron.cli import main
    from adm_megatron.config import config_to_dict, load_config

    example = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                           "examples", "cogvideox", "tiny_cpu.yaml")
    out = tmp_path / "run"
    overrides = ["train.max_iterations=7", f"output_dir={out}"]
    assert main(["train", "--config", example, "--print-config", *overrides]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["train"]["max_iterations"] == 7 and printed["train"]["ema_decay"] == 0.0  # a default
    def plain(config):  # as YAML holds it (tuples are lists)
        return yaml.safe_load(yaml.safe_dump(config_to_dict(config)))

    assert printed == plain(load_config(example, overrides))
    (tmp_path / "printed.yaml").write_text(yaml.safe_dump(printed))
    assert plain(load_config(str(tmp_path / "printed.yaml"))) == printed
    assert not out.exists()
    # overrides on both sides of the options are all taken, in order (argparse alone refused the second run)
    assert main(["train", "train.max_iterations=5", "--config", example, "train.ema_decay=0.5", "--print-config",
                 f"output_dir={out}", "train.max_iterations=7"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert (printed["train"]["max_iterations"], printed["train"]["ema_decay"], printed["output_dir"]) == (7, 0.5, str(out))
    with pytest.raises(SystemExit) as exit_:
        main(["train", "--config", example, "--print-config", "x=1", "--no-such-flag"])
    assert exit_.value.code == 2 and "unrecognized arguments: --no-such-flag" in capsys.readouterr().err


def test_an_impossible_layout_for_a_saved_run_names_the_layout(pipeline_dir, tmp_path, world_of_one):
    """The resume's check of the global batch needs the data-parallel size: it came first and said
    the global batch 'was 2, now 0 (... data-parallel size 0)'."""
    from adm_megatron.train.trainer import Trainer

    run = ["train.max_iterations=1", "train.num_samples=0", "train.export=false"]
    Trainer(_config(pipeline_dir, tmp_path, *run)).fit()
    with pytest.raises(ConfigError) as err:
        Trainer(_config(pipeline_dir, tmp_path, *run, "parallel.context_parallel=2"))
    assert str(err.value) == ("parallel.context_parallel=2 x parallel.tensor_parallel=1: the world size 1 is not "
                              "divisible by 2")


def test_keys_the_method_does_not_read_are_named_at_the_start(pipeline_dir, tmp_path, caplog, world_of_one):
    """An ablation that changes nothing (DMD with ADM's delta_t or DMD2's GAN weight, a LoRA export
    without LoRA) is said at the start; a key the method reads, or one left at its default, is not."""
    import logging

    from adm_megatron.config import unused_keys
    from adm_megatron.train.trainer import Trainer

    config = _config(pipeline_dir, tmp_path, "distill.method=dmd", "distill.delta_t=100", "distill.gan_weight=0.5",
                     "distill.dmd_t_range=[0.1, 0.9]", "train.export_lora=adapter")
    assert [key for key, *_ in unused_keys(config)] == ["distill.delta_t", "distill.gan_weight", "train.export_lora"]
    with caplog.at_level(logging.WARNING, logger="adm_megatron"):
        Trainer(config)
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert "distill.delta_t=100 applies to distill.method=adm only: distill.method=dmd does not read it" in warned
    assert ("distill.gan_weight=0.5 applies to distill.method=dmd2 only: distill.method=dmd does not read it"
            in warned)
    assert ("train.export_lora='adapter' applies to LoRA runs (model.lora) only: a run without model.lora does not "
            "read it" in warned)
    assert not any("dmd_t_range" in w for w in warned)
    assert unused_keys(_config(pipeline_dir, tmp_path, "distill.method=adm", "distill.delta_t=100")) == []


def test_an_adp_run_that_is_not_1_step_is_warned_of():
    """ADP trains the 1-step generator; the default generator_steps (8) would render its samples and
    name its export at 8 steps without a word."""
    from adm_megatron.config import start_warnings

    adp = ["model.teacher=teacher", "distill.method=adp", "data.real_path=pairs", "distill.pixel_weight=0"]
    assert start_warnings(load_config(None, adp)) == [
        "distill.method=adp trains a 1-step generator: distill.generator_steps=8 only sets the steps its samples and "
        "distillation.json name (the DMDX recipes set 1)"]
    assert start_warnings(load_config(None, [*adp, "distill.generator_steps=1"])) == []
    assert start_warnings(load_config(None, ["model.teacher=teacher", "distill.method=adm"])) == []


def test_sequence_parallel_without_tensor_parallel_is_warned_of():
    from adm_megatron.config import start_warnings

    assert start_warnings(load_config(None, ["model.teacher=teacher", "model.sequence_parallel=true"])) == [
        "model.sequence_parallel=true does nothing with parallel.tensor_parallel=1 (it splits the tensor-parallel "
        "group's activations)"]
    assert start_warnings(load_config(None, ["model.teacher=teacher", "model.sequence_parallel=true",
                                             "parallel.tensor_parallel=2"])) == []

def test_a_latent_size_that_does_not_patch_says_where_it_was_set(pipeline_dir, tmp_path, capsys):
    """The message named 'data.height/width', no key of the config, so it did not say where it was set."""
    from adm_megatron.cli import main

    config = tmp_path / "run.yaml"
    config.write_text(f"model: {{teacher: {pipeline_dir}}}\ndata: {{height: 4, width: 7}}\n")
    assert main(["train", "--config", str(config), f"output_dir={tmp_path / 'run'}", "data.height=5"]) == 2
    assert capsys.readouterr().err.strip() == (
        "adm-megatron: config error: command line: data.height=5: not divisible by the patch size 2 (latent pixels)")
    assert main(["train", "--config", str(config), f"output_dir={tmp_path / 'run'}"]) == 2
    assert capsys.readouterr().err.strip() == (
        f"adm-megatron: config error: {config}: data.width=7: not divisible by the patch size 2 (latent pixels)")
