"""``parallel.overlap_grad_reduce``: megatron DDP reduces each gradient bucket over data parallel
from the backward hooks while the backward goes on. Three ADM iterations (and three DMD2 ones,
whose fake-score phase trains two DDP-wrapped networks in one backward) at DP = 2 with overlap and
small buckets give the same losses and weights as DP = 2 without overlap (bit for bit: a sum of
two numbers does not depend on how the buffer is cut into buckets) and as one process (1e-5
relative, fp64, as tests/test_trainer_parallel.py). The same holds with the optimizer state sharded
over DP (reduce-scatter instead of all-reduce), and with two micro-batches per update accumulated
(``data.global_batch_size``; ADM and DMD2, against one process with the whole global batch of 4).

The test also checks that the overlap is real and that idle networks stay quiet: from each
network's second update on, every one of its buckets was dispatched from a backward hook (before
``finish_grad_sync``), a network has several buckets, and a network's hooks registered gradients
only in the phases that train it (never in a phase where it is frozen or rolled out without grad).
With accumulation, every network trained in a phase (DMD2's co-trained heads too) counts each of its
parameters' gradients once per update, in the last micro-batch: the others run in its ``no_sync``.
"""

from __future__ import annotations

import pytest
import torch

from multiproc import run_world
from tiny_runs import tiny_fp64_run

TOL = 1e-5
ITERATIONS = 3
WEIGHT_ATOL = 1e-8  # fp64 weights of about 1e-2 after 3 steps of lr 1e-3; differences of 3e-10 seen
COMMON = tiny_fp64_run(ITERATIONS)
OVERLAP = ["parallel.overlap_grad_reduce=true", "parallel.grad_bucket_size=3000"]
ACCUMULATE = ["data.global_batch_size=4"]
SHARDED = [f"optim.{n}.shard_over_dp=true" for n in ("generator", "fake_score", "discriminator")]
# name: (reference layout, bit for bit?, overrides); the global batch is 2 everywhere. Sharded: the
# bucket size moves the DP shard boundaries, so the grad norm's partial sums (and the clip factor)
# are added in another order: equal to 1e-5, not bit for bit.
LAYOUTS = {
    "dp2": ("one-process", False, ["data.batch_size=1"]),
    "dp2-overlap": ("dp2", True, ["data.batch_size=1", *OVERLAP]),
    "dp2-sharded": ("one-process", False, ["data.batch_size=1", *SHARDED]),
    "dp2-overlap-sharded": ("dp2-sharded", False, ["data.batch_size=1", *OVERLAP, *SHARDED]),
    "dmd2-dp2": ("dmd2-one-process", False, ["data.batch_size=1", "distill.method=dmd2"]),
    "dmd2-dp2-overlap": ("dmd2-dp2", True, ["data.batch_size=1", "distill.method=dmd2", *OVERLAP]),
    # global batch 4: 2 ranks x 2 micro-batches of 1
    "dp2-accum2": ("one-process-4", False, ["data.batch_size=1", *ACCUMULATE]),
    "dp2-accum2-overlap": ("dp2-accum2", True, ["data.batch_size=1", *ACCUMULATE, *OVERLAP]),
    "dmd2-dp2-accum2-overlap": ("dmd2-one-process-4", False,
                                ["data.batch_size=1", *ACCUMULATE, "distill.method=dmd2", *OVERLAP]),
}
ONE_PROCESS = {"one-process": ["data.batch_size=2"], "dmd2-one-process": ["data.batch_size=2", "distill.method=dmd2"],
               "one-process-4": ["data.batch_size=4"], "dmd2-one-process-4": ["data.batch_size=4", "distill.method=dmd2"]}


class SyncLog:
    """Wraps megatron's bucket-group methods: which bucket groups were dispatched from a backward
    hook (not from ``finish_grad_sync``) per network update, and in which phase each network's
    hooks registered gradients."""

    def __init__(self, trainer):
        self.phase = None
        self.in_finish = False
        self.hooked: dict[str, list[int]] = {}  # network -> per update, groups dispatched from hooks
        self.counted: dict[str, list[int]] = {}  # network -> per update, gradients counted for dispatch
        self.ready_phases: dict[str, set] = {name: set() for name in trainer.trainable}
        self.groups = {name: len(net.module.bucket_groups) for name, net in trainer.trainable.items()}
        self.params = {name: sum(len(g.params) for g in net.module.bucket_groups)
                       for name, net in trainer.trainable.items()}
        for name, net in trainer.trainable.items():
            for group in net.module.bucket_groups:
                self._wrap(group, name)
        self._follow(trainer)

    def _wrap(self, group, network: str) -> None:
        """Instance attributes shadow the class's methods, for this trainer's groups only."""
        log = self
        start, finish, ready = group.start_grad_sync, group.finish_grad_sync, group.register_grad_ready

        def start_grad_sync(*args, **kwargs):
            if not log.in_finish:
                log.hooked[network][-1] += 1
            return start(*args, **kwargs)

        def finish_grad_sync(*args, **kwargs):
            log.in_finish = True
            try:
                return finish(*args, **kwargs)
            finally:
                log.in_finish = False

        def register_grad_ready(*args, **kwargs):
            log.ready_phases[network].add(log.phase)
            log.counted[network][-1] += group.is_last_microbatch  # megatron counts only then
            return ready(*args, **kwargs)

        group.start_grad_sync, group.finish_grad_sync = start_grad_sync, finish_grad_sync
        group.register_grad_ready = register_grad_ready

    def _follow(self, trainer) -> None:
        """Label hook activity with the phase that runs."""
        log = self
        run = trainer.phases.run

        def phase_run(phase, *args, **kwargs):
            log.phase = phase
            for name in (phase, *kwargs.get("co_trained", ())):
                log.hooked.setdefault(name, []).append(0)
                log.counted.setdefault(name, []).append(0)
            return run(phase, *args, **kwargs)

        trainer.phases.run = phase_run


def _run(pipeline_dir: str, output_dir: str, overrides: list[str]) -> dict:
    from adm_megatron.config import load_config
    from adm_megatron.models.weights import gather_tensor_parallel
    from adm_megatron.parallel import destroy_parallel
    from adm_megatron.train.trainer import Trainer

    config = load_config(None, [f"model.teacher={pipeline_dir}", f"output_dir={output_dir}", *COMMON, *overrides])
    trainer = Trainer(config)
    log = SyncLog(trainer)
    losses = []
    for iteration in range(ITERATIONS):
        metrics = trainer.train_iteration(iteration)
        losses.append({k: v for k, v in metrics.items() if k.endswith("/loss")})
    weights = {
        phase: {n: gather_tensor_parallel(p.detach(), p).clone() for n, p in net.module.named_parameters()}
        for phase, net in trainer.trainable.items()
    }
    destroy_parallel()
    return {"losses": losses, "weights": weights, "hooked": log.hooked, "groups": log.groups,
            "ready_phases": log.ready_phases, "counted": log.counted, "params": log.params}


def _dp_layouts(pipeline_dir, output_dir, real_path):
    return {name: _run(pipeline_dir, f"{output_dir}/{name}", [*overrides, f"data.real_path={real_path}"])
            for name, (_, _, overrides) in LAYOUTS.items()}


def _check_overlap(name: str, result: dict) -> None:
    overlapped = "overlap" in name
    for network, per_update in result["hooked"].items():
        assert len(per_update) == ITERATIONS, (name, network, per_update)
        if overlapped:
            # first update: counting only; then every bucket group goes from the hooks
            assert per_update == [0] + [result["groups"][network]] * (ITERATIONS - 1), (name, network, per_update)
            assert result["groups"][network] > 1, (name, network)
            counted = result["counted"][network]
            assert counted == [result["params"][network]] * ITERATIONS, (name, network, counted)
        else:
            assert per_update == [0] * ITERATIONS, (name, network, per_update)
    trained_in = {"fake_score": {"fake_score"}, "generator": {"generator"},
                  "discriminator": {"fake_score"} if name.startswith("dmd2") else {"discriminator"}}
    for network, phases in result["ready_phases"].items():
        assert phases == (trained_in[network] if overlapped else set()), (name, network, phases)


def test_overlapped_grad_reduce_equals_dp2_and_one_process(cogvideox_pipeline, cogvideox_ode_pairs, tmp_path,
                                                          world_of_one):
    references = {name: _run(cogvideox_pipeline, str(tmp_path / name),
                             [*overrides, f"data.real_path={cogvideox_ode_pairs}"])
                  for name, overrides in ONE_PROCESS.items()}
    ranks = run_world(_dp_layouts, 2, cogvideox_pipeline, str(tmp_path), cogvideox_ode_pairs, timeout_s=600)
    results = {name: [r[name] for r in ranks] for name in LAYOUTS}
    for name, (reference_name, exact, _) in LAYOUTS.items():
        dp_reference = reference_name in LAYOUTS
        for result in results[name]:
            _check_overlap(name, result)
        for i in range(ITERATIONS):
            for key in results[name][0]["losses"][i]:
                if dp_reference:
                    ref = results[reference_name][0]["losses"][i][key]
                else:
                    ref = references[reference_name]["losses"][i][key]
                for got in (r["losses"][i][key] for r in results[name]):  # each rank: the global batch's
                    if exact:
                        assert got == ref, (name, i, key, got, ref)
                    else:
                        assert abs(got - ref) <= TOL * max(1.0, abs(ref)), (name, i, key, got, ref)
        for rank, result in enumerate(results[name]):
            ref_weights = (results[reference_name][rank] if dp_reference else references[reference_name])["weights"]
            for network, weights in ref_weights.items():
                for param, ref in weights.items():
                    got = result["weights"][network][param]
                    if exact:
                        assert torch.equal(got, ref), (name, network, param)
                    else:
                        assert torch.allclose(got, ref, rtol=TOL, atol=WEIGHT_ATOL), \
                            (name, network, param, (got - ref).abs().max())


def test_a_parameter_without_gradient_is_refused_in_one_line(world_of_one):
    from megatron.core.distributed import DistributedDataParallel
    from megatron.core.transformer.module import MegatronModule
    from megatron.core.transformer.transformer_config import TransformerConfig

    from adm_megatron.config import ParallelConfig
    from adm_megatron.train.grad_sync import GradSyncError, check_grads_arrived, ddp_config

    class TwoLinears(MegatronModule):
        def __init__(self, config):
            super().__init__(config=config)
            self.used, self.unused = torch.nn.Linear(4, 4), torch.nn.Linear(4, 4)

        def forward(self, x):
            return self.used(x)

    config = TransformerConfig(num_layers=1, hidden_size=4, num_attention_heads=1)
    ddp = DistributedDataParallel(config, ddp_config(ParallelConfig(overlap_grad_reduce=True), sharded=False),
                                  TwoLinears(config))
    ddp(torch.randn(2, 4)).sum().backward()
    with pytest.raises(GradSyncError, match=r"2 trainable parameter\(s\) of the generator .*unused.bias") as err:
        check_grads_arrived(ddp, "generator")
    assert "\n" not in str(err.value)
    # without overlap nothing is checked
    plain = DistributedDataParallel(config, ddp_config(ParallelConfig(), sharded=False), TwoLinears(config))
    plain(torch.randn(2, 4)).sum().backward()
    check_grads_arrived(plain, "generator")


def test_the_train_command_reports_it_in_one_line_with_exit_status_2(monkeypatch, capsys, tmp_path):
    from adm_megatron import cli
    from adm_megatron.train import trainer
    from adm_megatron.train.grad_sync import GradSyncError

    class Refused:
        def __init__(self, config):
            pass

        def fit(self):
            raise GradSyncError("parallel.overlap_grad_reduce=true: 1 trainable parameter(s) of the generator "
                                "received no gradient in its update (first: x)")

    monkeypatch.setattr(trainer, "Trainer", Refused)
    config = tmp_path / "run.yaml"
    config.write_text("model: {teacher: x}\n")
    assert cli.main(["train", "--config", str(config)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["adm-megatron: training stopped: parallel.overlap_grad_reduce=true: 1 trainable parameter(s) "
                   "of the generator received no gradient in its update (first: x)"]
