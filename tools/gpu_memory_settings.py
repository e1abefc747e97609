"""Peak GPU memory of an ADM iteration with the memory settings on and off (issue #12).

    torchrun --standalone --nproc_per_node=2 tools/gpu_memory_settings.py --out memory_settings.json
    python tools/gpu_memory_settings.py --smoke     # tiny, on CPU: the script runs (no memory figures)

Builds a medium random CogVideoX (diffusers directory: 8 blocks, hidden 512; ``--layers`` /
``--heads``) and runs, for each variant, two ADM iterations with BF16 autocast; the second
iteration's peak ``torch.cuda.max_memory_allocated`` of each phase is reported, with the losses and
the memory allocated right before and after the phase's offload placement.
Variants: baseline; the idle networks' optimizer state offloaded; optimizer state and weights
offloaded; bf16 trainable weights (fp32 main params) with fp32 and with bf16 grads; and, with two or
more ranks (DP >= 2), every
network's optimizer state sharded over DP, alone and with optimizer offload. Offload must not change
the losses (the JSON records the largest difference to the baseline). Part of
``tools/gpu_check.sh`` (its ``memory_settings_check`` step).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import tempfile

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

NETWORKS = ("generator", "fake_score", "discriminator")


def build_teacher(directory: str, layers: int, heads: int, head_dim: int) -> str:
    from diffusers import CogVideoXTransformer3DModel

    torch.manual_seed(0)
    model = CogVideoXTransformer3DModel(
        num_attention_heads=heads, attention_head_dim=head_dim, in_channels=16, out_channels=16,
        time_embed_dim=128, text_embed_dim=256, num_layers=layers, sample_width=32, sample_height=32,
        sample_frames=17, patch_size=2, temporal_compression_ratio=4, max_text_seq_length=32,
    )
    path = os.path.join(directory, "teacher")
    model.save_pretrained(path)
    from adm_megatron.data.tiny_pipeline import build_tiny_pipeline

    build_tiny_pipeline(os.path.join(directory, "pipe"))  # for its scheduler (CogVideoX-2b's) only
    return path


def variants(dp: int, smoke: bool) -> dict[str, list[str]]:
    out = {
        "baseline": [],
        "offload optimizer": [f"optim.{n}.offload=optimizer" for n in NETWORKS],
        "offload optimizer+params": [f"optim.{n}.offload=optimizer_and_params" for n in NETWORKS],
    }
    if not smoke:  # bf16 needs a GPU
        out["bf16 params"] = ["model.bf16_params=true"]  # fp32 grads (model.grad_reduce_in_fp32, the default)
        out["bf16 params + bf16 grads"] = ["model.bf16_params=true", "model.grad_reduce_in_fp32=false"]
    if dp >= 2:
        shard = [f"optim.{n}.shard_over_dp=true" for n in NETWORKS]
        out["sharded"] = shard
        out["sharded + offload optimizer"] = shard + [f"optim.{n}.offload=optimizer" for n in NETWORKS]
    return out


def measure(teacher: str, workdir: str, name: str, overrides: list[str], smoke: bool) -> dict:
    from adm_megatron.config import load_config
    from adm_megatron.parallel import destroy_parallel
    from adm_megatron.train.trainer import Trainer

    size = ["data.frames=2", "data.height=4", "data.width=4"] if smoke else \
        ["data.frames=5", "data.height=32", "data.width=32"]
    config = load_config(None, [
        f"model.teacher={teacher}", f"model.pipeline={os.path.dirname(teacher)}/pipe", f"output_dir={workdir}/{name.replace(' ', '_')}",
        "model.dtype=" + ("fp32" if smoke else "bf16"), *size, "data.num_prompts=8", "data.batch_size=1",
        "distill.generator_steps=2", "distill.head_every=2", "train.max_iterations=2", "train.num_samples=0",
        "train.export=false", "logging.wandb_mode=disabled", "logging.progress=false", *overrides,
    ])
    # what an earlier variant left allocated (nothing, if its trainer was collected) is in every figure below
    left_over = torch.cuda.memory_allocated() / 2**30 if torch.cuda.is_available() else None
    trainer = Trainer(config)
    cuda = trainer.device.type == "cuda"
    peaks: dict[str, float] = {}
    run = trainer.phases.run

    def measured(phase, *args, **kwargs):
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        out = run(phase, *args, **kwargs)
        if cuda:
            torch.cuda.synchronize()
            peaks[phase] = torch.cuda.max_memory_allocated() / 2**30
        return out

    trainer.phases.run = measured
    # where the memory is right before and right after the offload's placement of each phase (the
    # first GPU run's offload variants peaked 0.7-0.8 GiB above the baseline: these say whether the
    # placement frees what it moves)
    placement: dict[str, dict[str, float]] = {}
    place, *others = trainer.phases.before_phase

    def allocated() -> float:
        torch.cuda.synchronize()
        torch.empty(1, device="cuda")  # an allocation: blocks freed behind the side stream's copies return
        return torch.cuda.memory_allocated() / 2**30

    def placed(phase, trained):
        before = allocated() if cuda else None
        place(phase, trained)
        if cuda:
            placement[phase] = {"before_gib": before, "after_gib": allocated()}

    trainer.phases.before_phase = (placed, *others)
    losses = []
    for i in range(2):
        metrics = trainer.train_iteration(i)
        losses.append({k: v for k, v in metrics.items() if k.endswith("/loss")})
    result = {"overrides": overrides, "peak_gib_per_phase": peaks or None, "placement_gib_per_phase": placement or None,
              "allocated_before_the_trainer_gib": left_over,
              "peak_gib": max(peaks.values()) if peaks else None, "losses": losses,
              "optimizer_state_numel": {n: net.optimizer.state_numel() for n, net in trainer.trainable.items()}}
    del trainer
    destroy_parallel()
    gc.collect()  # the trainer's reference cycles (hooks, closures) too, before the next variant
    if cuda:
        torch.cuda.empty_cache()
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="memory_settings.json")
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, fp32: checks the script runs (CPU)")
    args = parser.parse_args(argv)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    with tempfile.TemporaryDirectory(prefix="memory_settings_") as workdir:
        size = "smoke" if args.smoke else f"{args.layers}x{args.heads}x{args.head_dim}"
        shared = workdir if world == 1 else os.path.join(tempfile.gettempdir(), f"memory_settings_teacher_{size}")
        teacher = os.path.join(shared, "teacher")
        if rank == 0 and not os.path.isdir(teacher):
            os.makedirs(shared, exist_ok=True)
            build_teacher(shared, 2 if args.smoke else args.layers, 2 if args.smoke else args.heads,
                          8 if args.smoke else args.head_dim)
        if world > 1:  # the others wait for rank 0's teacher without a process group
            import time

            while not os.path.isfile(os.path.join(teacher, "config.json")):
                time.sleep(1)
            time.sleep(2)
        results = {name: measure(teacher, workdir, name, overrides, args.smoke)
                   for name, overrides in variants(world, args.smoke).items()}
    base = results["baseline"]["losses"]
    for name, r in results.items():
        r["max_loss_difference_to_baseline"] = max(
            abs(r["losses"][i][k] - base[i][k]) for i in range(len(base)) for k in base[i])
    if rank == 0:
        with open(args.out, "w") as f:
            json.dump({"world_size": world, "device": torch.cuda.get_device_name() if torch.cuda.is_available()
                       else "cpu", "variants": results}, f, indent=2)
        for name, r in results.items():
            peak = "n/a" if r["peak_gib"] is None else f"{r['peak_gib']:.3f} GiB"
            placed = ", ".join(f"{phase} {m['before_gib']:.2f}->{m['after_gib']:.2f}"
                               for phase, m in (r["placement_gib_per_phase"] or {}).items())
            print(f"{name:<30} peak {peak:>12}   loss diff to baseline {r['max_loss_difference_to_baseline']:.2e}"
                  + (f"   allocated before->after placement (GiB): {placed}" if placed else "")
                  + ("" if not r["allocated_before_the_trainer_gib"] else
                     f"   (left allocated by earlier variants: {r['allocated_before_the_trainer_gib']:.3f} GiB)"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
