"""One ADM iteration at DP = 2 and at TP = 2 (with sequence parallelism), one DMD2 iteration
at DP = 2 (its heads co-trained with the fake score) and one ADP iteration at DP = 2 (latent and
SAM pixel discriminators, no fake score) equal the one-process iteration with the
same seeds (gloo, 2 processes): every phase's loss and the discriminator's paired statistics (averaged
over the data-parallel group, so every rank reports the global batch's), every gathered gradient
before the optimizer step (1e-5 relative per tensor), and the updated weights wherever the gradient
is above rounding noise (Adam's first step moves each weight by about lr * sign(grad), so a weight
whose gradient is pure noise may move either way).

The run is in fp64 (``model.dtype=fp64``): in fp32 the iteration's long chain (rollout, fake step,
teacher features, heads) differs between a batch of 2 and two batches of 1 by up to 2e-5 in the
time-embedding gradient from summation order alone, which would hide nothing but also prove nothing
at 1e-5; in fp64 any real difference of the parallel algorithm stands out by many orders."""

from __future__ import annotations

import pytest
import torch

from multiproc import run_world
from tiny_cogvideox import assert_grads_match
from adm_megatron.data.tiny_pixel_encoders import save_tiny_encoder

TOL = 1e-5
COMMON = [
    "model.dtype=fp64",
    "data.num_prompts=4", "data.frames=2", "data.height=4", "data.width=4",
    "distill.generator_steps=2", "distill.delta_t=100", "distill.head_every=1", "distill.head_hidden=16",
    "train.max_iterations=1", "train.num_samples=0", "train.export=false",
    "logging.wandb_mode=disabled", "logging.progress=false",
    "optim.generator.lr=1e-3", "optim.fake_score.lr=1e-3", "optim.discriminator.lr=1e-3",
]
LAYOUTS = {  # name: overrides (global batch 2 everywhere)
    "one-process": ["data.batch_size=2"],
    "dp2": ["data.batch_size=1"],
    "tp2-sp": ["data.batch_size=2", "parallel.tensor_parallel=2", "model.sequence_parallel=true"],
    "dmd2-one-process": ["data.batch_size=2", "distill.method=dmd2"],
    "dmd2-dp2": ["data.batch_size=1", "distill.method=dmd2"],
    # ADP with both discriminators (tiny SAM on the tiny VAE's frames); the encoder path is added below
    "adp-one-process": ["data.batch_size=2", "distill.method=adp", "distill.pixel_layers=[2,4]"],
    "adp-dp2": ["data.batch_size=1", "distill.method=adp", "distill.pixel_layers=[2,4]"],
}
REFERENCE = {"dp2": "one-process", "tp2-sp": "one-process", "dmd2-dp2": "dmd2-one-process",
             "adp-dp2": "adp-one-process"}
HEALTH = ("discriminator/paired_margin", "discriminator/paired_accuracy", "discriminator/loss_vs_chance")


def _one_iteration(pipeline_dir: str, output_dir: str, overrides: list[str]) -> dict:
    """Run iteration 0 and return losses, gathered gradients and gathered weights after it."""
    from adm_megatron.config import load_config
    from adm_megatron.models.weights import gather_tensor_parallel
    from adm_megatron.parallel import destroy_parallel
    from adm_megatron.train.trainer import Trainer

    config = load_config(None, [f"model.teacher={pipeline_dir}", f"output_dir={output_dir}", *COMMON, *overrides])
    trainer = Trainer(config)
    grads = {}
    for phase, net in trainer.trainable.items():
        def step(skip_if_not_finite, norm=None, _phase=phase, _net=net, _step=net.optimizer.step):
            grads[_phase] = {
                n: gather_tensor_parallel(p.main_grad, p).clone() for n, p in _net.module.named_parameters()
            }
            return _step(skip_if_not_finite, norm=norm)
        net.optimizer.step = step
    metrics = trainer.train_iteration(0)
    weights = {
        phase: {n: gather_tensor_parallel(p.detach(), p).clone() for n, p in net.module.named_parameters()}
        for phase, net in trainer.trainable.items()
    }
    losses = {k: v for k, v in metrics.items() if k.endswith("/loss")}
    health = {k: metrics[k] for k in HEALTH}
    destroy_parallel()
    return {"losses": losses, "health": health, "grads": grads, "weights": weights, "dp_rank": trainer.info.dp_rank}


def _data(real_path, encoder):
    return [f"data.real_path={real_path}", f"distill.pixel_encoder_path={encoder}"]


def _parallel_layouts(pipeline_dir, output_dir, real_path, encoder):
    return {name: _one_iteration(pipeline_dir, f"{output_dir}/{name}", [*LAYOUTS[name], *_data(real_path, encoder)])
            for name in REFERENCE}


@pytest.fixture
def pipeline_dir(cogvideox_pipeline):
    return cogvideox_pipeline


@pytest.fixture
def real_pairs(cogvideox_ode_pairs):
    return cogvideox_ode_pairs


def test_dp2_and_tp2_iterations_equal_the_one_process_iteration(pipeline_dir, real_pairs, tmp_path, world_of_one):
    encoder = save_tiny_encoder("sam", str(tmp_path / "sam"))
    references = {name: _one_iteration(pipeline_dir, str(tmp_path / name), [*LAYOUTS[name], *_data(real_pairs, encoder)])
                  for name in set(REFERENCE.values())}
    ranks = run_world(_parallel_layouts, 2, pipeline_dir, str(tmp_path), real_pairs, encoder)
    for layout, reference_name in REFERENCE.items():
        reference = references[reference_name]
        results = [r[layout] for r in ranks]
        for result in results:
            for phase, loss in reference["losses"].items():  # every rank reports the global batch's
                got = result["losses"][phase]
                assert abs(got - loss) <= TOL * max(1.0, abs(loss)), (layout, phase, got, loss)
            for key, value in reference["health"].items():  # already the global batch's on every rank
                assert abs(result["health"][key] - value) <= TOL, (layout, key, result["health"][key], value)
            for phase, ref_grads in reference["grads"].items():
                assert_grads_match(result["grads"][phase], ref_grads, TOL, context=(layout, phase))
                scale = max(g.abs().max() for g in ref_grads.values())
                for name, ref_weight in reference["weights"][phase].items():
                    signal = ref_grads[name].abs() > 1e-3 * scale
                    got = result["weights"][phase][name]
                    assert torch.allclose(got[signal], ref_weight[signal], rtol=TOL, atol=1e-7), (layout, phase, name)
