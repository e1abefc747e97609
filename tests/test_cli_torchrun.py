"""``torchrun --nproc-per-node 2 -m adm_megatron.cli train`` at TP = 2 with sequence parallelism:
the command line, checkpoint and export collectives work under a real launcher, and the exported
generator equals the checkpointed one."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import torch

from multiproc import free_port

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_torchrun_tp2_sp_run_checkpoints_and_exports(tmp_path, world_of_one):
    from diffusers import CogVideoXTransformer3DModel

    from adm_megatron.convert.checkpoint import load_megatron_checkpoint
    from adm_megatron.data.tiny_pipeline import build_tiny_pipeline

    teacher = build_tiny_pipeline(str(tmp_path / "pipe"), seed=0)
    out = tmp_path / "run"
    torchrun = shutil.which("torchrun", path=os.path.dirname(sys.executable))
    cmd = [
        torchrun, "--nproc-per-node", "2", "--master-port", str(free_port()), "-m", "adm_megatron.cli", "train",
        "--config", os.path.join(ROOT, "examples/cogvideox/tiny_cpu.yaml"),
        f"model.teacher={teacher}", f"output_dir={out}", "parallel.tensor_parallel=2",
        "model.sequence_parallel=true", "train.max_iterations=2", "train.num_samples=1",
        "logging.wandb_mode=disabled",
    ]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("run finished") == 1  # rank 0 reports
    exported = CogVideoXTransformer3DModel.from_pretrained(str(out / "generator"))
    trained = load_megatron_checkpoint(str(out / "checkpoints" / "iter_0000002" / "generator"))
    x, text, t = torch.randn(1, 3, 4, 8, 8), torch.randn(1, 16, 32), torch.tensor([500])
    with torch.no_grad():
        a, b = trained(x, text, t).sample, exported(x, text, t).sample
    assert ((a - b).abs().max() / b.abs().max()).item() <= 1e-5
    assert os.path.isfile(out / "samples" / "sample-000.gif")
