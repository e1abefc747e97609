"""Gradient accumulation (``data.global_batch_size``) is exact, in one process:

- three iterations with micro-batches of 1 accumulated to a global batch of 2 equal three iterations
  with one batch of 2, for ADM, DMD2 (its heads co-trained in the fake-score phase, its real samples)
  and ADP (latent and SAM pixel discriminators, ODE pairs): every phase's loss and gradient norm,
  every discriminator statistic, and every weight of every network after the run (fp64, so
  summation order is all that may differ);
- a checkpoint saved with one batch of 2 goes on with 2 micro-batches of 1 (same global batch),
  its later losses equal to the uninterrupted run's, and a different global batch is refused in one
  line; so is a global batch that is not a multiple of ``data.batch_size`` x DP, before any model is
  built.

With data parallelism and the overlapped DP reduction: ``tests/test_grad_overlap.py``.
"""

from __future__ import annotations

import json
import os

import pytest
import torch

from adm_megatron.config import ConfigError, load_config
from adm_megatron.data.tiny_pixel_encoders import save_tiny_encoder
from tiny_runs import is_timing, tiny_fp64_run

ITERATIONS = 3
RTOL = 1e-9  # fp64: a sum of two rows in another order differs by ~1e-15
# Adam divides by sqrt(v): a near-zero gradient's rounding shows in its weight; a wrong split of the
# batch moves weights by about lr = 1e-3
WEIGHT_ATOL = 1e-8
HEALTH_RTOL = 1e-6  # the discriminator's statistics are computed in fp32 (algorithms/discriminator_health.py)
METHODS = {
    "adm": [],
    "dmd2": ["distill.method=dmd2"],
    "adp": ["distill.method=adp", "distill.pixel_layers=[2,4]"],
}
WHOLE = ["data.batch_size=2"]
ACCUMULATED = ["data.batch_size=1", "data.global_batch_size=2"]


def _config(pipeline_dir, out, *overrides):
    return load_config(None, [f"model.teacher={pipeline_dir}", f"output_dir={out}", *tiny_fp64_run(ITERATIONS),
                              *overrides])


def _train(pipeline_dir, out, overrides) -> tuple[list[dict], dict, int]:
    from adm_megatron.parallel import destroy_parallel
    from adm_megatron.train.trainer import Trainer

    trainer = Trainer(_config(pipeline_dir, out, *overrides))
    metrics = [trainer.train_iteration(i) for i in range(ITERATIONS)]
    weights = {name: {n: p.detach().clone() for n, p in net.module.named_parameters()}
               for name, net in trainer.trainable.items()}
    microbatches = trainer.layout.microbatches
    destroy_parallel()
    return metrics, weights, microbatches


def _close(got: float, want: float, rtol: float = RTOL) -> bool:
    return abs(got - want) <= rtol * max(1.0, abs(want))


@pytest.mark.parametrize("method", METHODS)
def test_accumulated_micro_batches_equal_one_batch(method, cogvideox_pipeline, cogvideox_ode_pairs, tmp_path,
                                                   world_of_one):
    data = [f"data.real_path={cogvideox_ode_pairs}"]
    if method == "adp":
        data.append(f"distill.pixel_encoder_path={save_tiny_encoder('sam', str(tmp_path / 'sam'))}")
    overrides = [*METHODS[method], *data]
    want_metrics, want_weights, one = _train(cogvideox_pipeline, tmp_path / "whole", [*WHOLE, *overrides])
    got_metrics, got_weights, two = _train(cogvideox_pipeline, tmp_path / "accumulated", [*ACCUMULATED, *overrides])
    assert (one, two) == (1, 2)
    for i, (got, want) in enumerate(zip(got_metrics, want_metrics)):
        compared = [k for k, v in want.items() if isinstance(v, float) and not is_timing(k)]
        assert {"generator/loss", "generator/grad_norm", "discriminator/loss"} <= set(compared)
        if method != "adp":
            assert "discriminator/paired_accuracy" in compared and "fake_score/loss" in compared
        for key in compared:
            rtol = HEALTH_RTOL if key.startswith("discriminator/") and not key.endswith("/loss") else RTOL
            assert _close(got[key], want[key], rtol), (method, i, key, got[key], want[key])
    for network, weights in want_weights.items():
        for name, want in weights.items():
            got = got_weights[network][name]
            assert torch.allclose(got, want, rtol=0, atol=WEIGHT_ATOL), (method, network, name, (got - want).abs().max())


def _losses(record: dict) -> dict:
    return {k: v for k, v in record.items() if k.endswith("/loss")}


def test_a_checkpoint_goes_on_with_another_split_of_the_same_global_batch(cogvideox_pipeline, tmp_path,
                                                                            world_of_one):
    from adm_megatron.parallel import destroy_parallel
    from adm_megatron.train.trainer import Trainer

    whole = tmp_path / "whole"
    Trainer(_config(cogvideox_pipeline, whole, *WHOLE, "train.save_every=1")).fit()
    destroy_parallel()
    want = [_losses(json.loads(line)) for line in open(whole / "metrics.jsonl")][1:]
    checkpoint = str(whole / "checkpoints" / "iter_0000001")

    trainer = Trainer(_config(cogvideox_pipeline, tmp_path / "split", *ACCUMULATED, f"train.resume={checkpoint}"))
    assert trainer.start_iteration == 1 and trainer.layout.microbatches == 2
    got = [_losses(trainer.train_iteration(i)) for i in range(1, ITERATIONS)]
    destroy_parallel()
    assert len(got) == len(want) == ITERATIONS - 1
    for i, (g, w) in enumerate(zip(got, want)):
        assert set(g) == set(w) and len(w) == 3
        assert all(_close(g[k], w[k]) for k in w), (i + 1, g, w)

    with pytest.raises(ConfigError, match=r"iter_0000001/trainer_state.json: global batch was 2, now 4 .*"
                                          r"set data.global_batch_size=2$") as err:
        Trainer(_config(cogvideox_pipeline, tmp_path / "bigger", "data.batch_size=1", "data.global_batch_size=4",
                        f"train.resume={checkpoint}"))
    assert "\n" not in str(err.value)


def test_a_global_batch_that_does_not_split_is_refused_before_any_model(cogvideox_pipeline, tmp_path, world_of_one):
    from adm_megatron.train import trainer as trainer_module

    built = []
    original = trainer_module.Trainer._build_networks
    trainer_module.Trainer._build_networks = lambda self: built.append(1) or original(self)
    try:
        with pytest.raises(ConfigError, match=r"data.global_batch_size=3: expected a multiple of data.batch_size x "
                                              r"data-parallel size = 2 x 1 = 2") as err:
            trainer_module.Trainer(_config(cogvideox_pipeline, tmp_path / "a", "data.batch_size=2",
                                           "data.global_batch_size=3"))
    finally:
        trainer_module.Trainer._build_networks = original
    assert "\n" not in str(err.value) and not built and not os.path.exists(tmp_path / "a")
    for value, expected in (("-2", "expected >= 0"), ("1", "smaller than data.batch_size=2")):
        with pytest.raises(ConfigError, match=f"data.global_batch_size={value}: {expected}"):
            _config(cogvideox_pipeline, tmp_path / "b", "data.batch_size=2", f"data.global_batch_size={value}")


@pytest.mark.parametrize("before, batch_size, dp", [(2, 2, 2), (2, 1, 1), (8, 3, 2), (12, 4, 3), (3, 1, 2)])
def test_the_refusal_of_a_changed_global_batch_names_settings_that_give_it_back(before, batch_size, dp):
    """What the refusal suggests is accepted and gives the run's global batch at the new layout (a
    suggestion of data.global_batch_size alone failed where data.batch_size x DP did not divide it)."""
    import re

    from adm_megatron.data.batch_layout import global_batch, microbatches_for
    from adm_megatron.train.resume import _same_global_batch

    hint = _same_global_batch(before, batch_size, dp)
    if before % dp:
        assert hint == (f"{dp} data-parallel ranks cannot share {before} samples; use a data-parallel size that "
                        f"divides {before}")
        return
    settings = dict(re.findall(r"data\.(\w+)=(\d+)", hint))
    assert hint.startswith(f"set data.global_batch_size={before}")
    micro = int(settings.get("batch_size", batch_size))
    assert micro <= batch_size
    microbatches_for(before, micro, dp)  # accepted: no ConfigError
    assert global_batch(before, micro, dp) == before
