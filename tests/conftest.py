"""Suite-wide settings: offline hubs, small thread pools, the ``slow`` marker, parallel cleanup."""

from __future__ import annotations

import os
import sys

# Never reach a model hub or wandb's servers from a test (spawned worlds inherit these).
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["WANDB_MODE"] = "offline"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

# 2 cores here (and in CI): more intra-op threads than cores only adds contention.
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

_LAUNCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "slow: long test (multi-process worlds, end-to-end runs); `make test-slow`"
    )


def _destroy_leftover_parallel_state() -> None:
    if "torch.distributed" not in sys.modules:
        return
    import torch.distributed as dist

    if dist.is_initialized() or "megatron.core.parallel_state" in sys.modules:
        from adm_megatron.parallel import destroy_parallel

        destroy_parallel()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_teardown(item, nextitem):
    """Guard: an in-process test (module) that left torch.distributed / megatron initialized is
    cleaned up once its module is done, so the next module starts from nothing.  Module-scoped
    worlds stay usable across the tests of their module (their fixtures finalize first)."""
    yield
    if nextitem is None or nextitem.module is not item.module:
        _destroy_leftover_parallel_state()


@pytest.fixture
def world_of_one(monkeypatch):
    """An initialized world of one (gloo on CPU), destroyed after the test."""
    for key in _LAUNCH_VARS:
        monkeypatch.delenv(key, raising=False)
    for key in [k for k in os.environ if k.startswith("SLURM_")]:
        monkeypatch.delenv(key)
    from adm_megatron.parallel import destroy_parallel, initialize_parallel

    destroy_parallel()
    info = initialize_parallel(tensor_parallel=1, context_parallel=1, seed=1234)
    try:
        yield info
    finally:
        destroy_parallel()


@pytest.fixture(scope="session")
def sd3_pipeline(tmp_path_factory):
    """A tiny offline ``StableDiffusion3Pipeline`` directory (SD3-Medium-style, no QK norm)."""
    from adm_megatron.data.tiny_sd3_pipeline import build_tiny_sd3_pipeline

    return build_tiny_sd3_pipeline(str(tmp_path_factory.mktemp("sd3") / "pipe"), seed=0)


@pytest.fixture(scope="session")
def cogvideox_pipeline(tmp_path_factory):
    """A tiny offline ``CogVideoXPipeline`` directory (2b-style, seed 0); tests copy it to change it."""
    from adm_megatron.data.tiny_pipeline import build_tiny_pipeline

    return build_tiny_pipeline(str(tmp_path_factory.mktemp("cogvideox") / "pipe"), seed=0)


@pytest.fixture(scope="session")
def cogvideox_ode_pairs(cogvideox_pipeline, tmp_path_factory):
    """4 teacher ODE pairs (2 steps) of ``cogvideox_pipeline`` at 2 x 4 x 4 latents, from collect-ode, on
    the 4 synthetic prompts the tests train with (training refuses pairs of another prompt set)."""
    from adm_megatron.cli import main
    from adm_megatron.parallel import destroy_parallel

    out = tmp_path_factory.mktemp("pairs")
    config = out / "run.yaml"
    config.write_text(f"model: {{teacher: {cogvideox_pipeline}}}\n")
    assert main(["collect-ode", "--config", str(config), "--out", str(out / "pairs"), "--num-pairs", "4",
                 "--steps", "2", "--no-progress", "data.frames=2", "data.height=4", "data.width=4",
                 "data.num_prompts=4"]) == 0
    destroy_parallel()
    return str(out / "pairs")
