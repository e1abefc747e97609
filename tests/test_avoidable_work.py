"""An ADM iteration does no avoidable work, and each saving is exact (fp64, one process):

- the discriminator backbone stops after its last tapped block and the discriminator phase reuses
  the generator phase's backbone features of x_fake: the generator loss and gradients and the
  discriminator loss and gradients equal, to 1e-12, those of the straightforward computation (the
  whole teacher run on x_fake and again on x_real and x_fake), with one backbone call in the
  discriminator phase instead of two;
- the CFG teacher's cond / uncond branches are one call of twice the batch, and the teacher is held
  once (the same module is the real score and the discriminator backbone).
"""

from __future__ import annotations

import gc

import pytest
import torch

from adm_megatron.algorithms.losses import hinge_d_loss
from adm_megatron.config import load_config
from adm_megatron.data.tiny_pipeline import build_tiny_pipeline
from adm_megatron.models import CogVideoXTransformer, tapped_block_indices
from tiny_cogvideox import save_diffusers_model

BATCH = 2
BASE = [
    "data.num_prompts=4", f"data.batch_size={BATCH}", "data.frames=2", "data.height=4", "data.width=4",
    "distill.generator_steps=2", "distill.delta_t=100", "distill.head_every=2", "distill.head_hidden=16",
    "train.num_samples=0", "train.export=false", "logging.wandb_mode=disabled", "logging.progress=false",
    "model.dtype=fp64",
]
TIGHT = dict(rtol=1e-12, atol=1e-14)


@pytest.fixture(scope="module")
def teacher_dirs(tmp_path_factory):
    """A 3-block teacher (taps every 2nd block: block 1, so block 2 and the output layer are what a
    backbone call can skip) and a pipeline directory for its scheduler."""
    root = tmp_path_factory.mktemp("teacher")
    return save_diffusers_model("2b", str(root), num_layers=3), build_tiny_pipeline(str(root / "pipe"))


def _trainer(teacher_dirs, tmp_path):
    from adm_megatron.train.trainer import Trainer

    teacher, pipeline = teacher_dirs
    return Trainer(load_config(None, [f"model.teacher={teacher}", f"model.pipeline={pipeline}",
                                      f"output_dir={tmp_path}", *BASE]))


class WholeTeacher:
    """The teacher as a backbone the straightforward way: the whole forward (every block,
    ``norm_out``, ``proj_out``), the tapped blocks' outputs taken by hooks."""

    def __init__(self, dit):
        self.dit = dit
        self.calls = 0

    def __call__(self, x, t, text):
        return self.dit(x, t, text)

    def features(self, x, t, text, every):
        self.calls += 1
        module = self.dit.module
        taps = tapped_block_indices(len(module.blocks), every)
        outs = {}
        hooks = [module.blocks[i].register_forward_hook(lambda m, a, o, i=i: outs.__setitem__(i, o)) for i in taps]
        try:
            module(x, text, t, image_rotary_emb=self.dit.rotary)
        finally:
            for hook in hooks:
                hook.remove()
        b, f, _, h, w = x.shape
        p = module.arch.patch_size
        return [outs[i][text.shape[1]:].transpose(0, 1).reshape(b, f, h // p, w // p, -1).permute(0, 4, 1, 2, 3)
                for i in taps]


def _grads(loss, module):
    params = [p for p in module.parameters() if p.requires_grad]
    return torch.autograd.grad(loss, params)


def test_backbone_early_stop_and_feature_reuse_leave_losses_and_gradients_unchanged(teacher_dirs, tmp_path,
                                                                                    world_of_one):
    trainer = _trainer(teacher_dirs, tmp_path)
    alg, nets, batch = trainer.algorithm, trainer.networks, trainer.batches(0)[0]
    assert tapped_block_indices(3, 2) == [1]
    counter = trainer.flops  # the trainer counts every network call (its throughput metrics)
    counter.reset()

    counter.phase = "generator"
    loss_g, _, pair = alg.generator_loss(batch, trainer.draws(0, "generator").micro(0))
    grads_g = _grads(loss_g, trainer.generator)
    counter.phase = "discriminator"
    loss_d, _, _ = alg.discriminator_loss(pair, batch)
    grads_d = _grads(loss_d, trainer.heads)
    evals = counter.per_phase()
    assert evals["generator"]["teacher.features"]["calls"] == 1
    assert evals["generator"]["teacher"] == {"calls": 1, "samples": 2 * BATCH, "flops": pytest.approx(
        evals["generator"]["teacher"]["flops"])}  # CFG: cond and uncond in one call
    assert evals["discriminator"] == {"teacher.features": {"calls": 1, "samples": BATCH, "flops": pytest.approx(
        evals["discriminator"]["teacher.features"]["flops"])}}  # x_real only

    whole = WholeTeacher(nets.teacher.fn)
    nets.teacher = whole
    ref_loss_g, _, ref_pair = alg.generator_loss(batch, trainer.draws(0, "generator").micro(0))
    ref_grads_g = _grads(ref_loss_g, trainer.generator)
    torch.testing.assert_close(ref_pair.x_fake, pair.x_fake, **TIGHT)
    real = alg.nets.heads(whole.features(pair.x_real, alg.schedule.model_timestep(pair.t_prev), batch.text, 2))
    fake = alg.nets.heads(whole.features(pair.x_fake, alg.schedule.model_timestep(pair.t_prev), batch.text, 2))
    ref_loss_d = hinge_d_loss(real, fake, head_reduction=alg.head_reduction)
    ref_grads_d = _grads(ref_loss_d, trainer.heads)
    assert whole.calls == 3  # the straightforward way: once in the generator phase, twice in the D phase

    torch.testing.assert_close(loss_g, ref_loss_g, **TIGHT)
    torch.testing.assert_close(loss_d, ref_loss_d, **TIGHT)
    assert max(g.abs().max() for g in ref_grads_g) > 0 and max(g.abs().max() for g in ref_grads_d) > 0
    for new, ref in zip((*grads_g, *grads_d), (*ref_grads_g, *ref_grads_d)):
        torch.testing.assert_close(new, ref, **TIGHT)


def test_the_teacher_is_held_once_as_real_score_and_discriminator_backbone(teacher_dirs, tmp_path, world_of_one):
    def models():
        gc.collect()
        return sum(isinstance(o, CogVideoXTransformer) for o in gc.get_objects())

    before = models()
    trainer = _trainer(teacher_dirs, tmp_path)
    assert models() - before == 3  # teacher, fake score, generator
    runs = []
    trainer.networks.teacher.module.register_forward_hook(lambda m, a, o: runs.append(o.sample is None))
    trainer.algorithm.generator_loss(trainer.batches(0)[0], trainer.draws(0, "generator").micro(0))
    assert runs == [False, True]  # the same module: the CFG teacher's call, then the backbone's
