"""Peak GPU memory of an ADM iteration with the memory settings on and off (issue #12).

    python tools/gpu_memory_settings.py --out memory_settings.json   # DP = min(2, GPUs); --nproc N
    python tools/gpu_memory_settings.py --smoke     # tiny, on CPU: the script runs (no memory figures)

Each variant runs in its own ``torchrun`` (``--nproc`` processes), so no figure holds another
variant's memory; each also reports what outlived its trainer once deleted and collected.

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
import subprocess
import sys
import tempfile
import time

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
              "peak_gib": max(peaks.values()) if peaks else None, "losses": losses,
              "optimizer_state_numel": {n: net.optimizer.state_numel() for n, net in trainer.trainable.items()}}
    del trainer
    destroy_parallel()
    gc.collect()  # the trainer's reference cycles (hooks, closures) too
    return result


def _hop(node, below, module: str | None) -> str:
    """How ``node`` holds ``below``: a module global, a dict key, a sequence index or an attribute."""
    if isinstance(node, dict):
        key = next((k for k, v in node.items() if v is below), None)
        return f"module {module}, global {key!r}" if module else f"dict[{key!r}]"
    if isinstance(node, (list, tuple)):
        return f"{type(node).__name__}[{next((i for i, v in enumerate(node) if v is below), '?')}]"
    attribute = next((k for k, v in getattr(node, "__dict__", {}).items() if v is below), None)
    return type(node).__name__ + (f".{attribute}" if attribute else "")


def holders(tensors: list[torch.Tensor], max_nodes: int = 2000, max_seconds: float = 10.0) -> list[str] | None:
    """What keeps the largest of ``tensors`` alive: the chain of referrers from a module's global
    (``module NAME, global KEY``) down to it, one entry per hop, or None for no tensors. Run on the
    CUDA tensors left after a variant's trainer was deleted and collected: what outlived it. Each
    hop scans the whole heap (``gc.get_referrers``), so the walk stops after ``max_nodes`` referrers
    or ``max_seconds`` (the first GPU run's unbounded walk took most of a variant's time)."""
    if not tensors:
        return None
    target = max(tensors, key=lambda t: t.untyped_storage().nbytes())
    globals_of = {id(m.__dict__): name for name, m in list(sys.modules.items()) if hasattr(m, "__dict__")}
    ignore = {id(tensors)}
    below_of = {id(target): None}  # id(referrer) -> the object it was found referring to
    queue = [target]
    del tensors
    deadline = time.monotonic() + max_seconds
    while queue and len(below_of) < max_nodes and time.monotonic() < deadline:
        child = queue.pop(0)
        for ref in gc.get_referrers(child):
            if id(ref) in below_of or id(ref) in ignore or ref is queue or ref is below_of or type(ref).__name__ == "frame":
                continue
            below_of[id(ref)] = child
            if id(ref) in globals_of:  # reached a module global: the chain down to the tensor
                chain, node = [], ref
                while node is not target:
                    chain.append(_hop(node, below_of[id(node)], globals_of.get(id(node))))
                    node = below_of[id(node)]
                return chain + [f"Tensor {tuple(target.shape)} {target.dtype} "
                                f"({target.untyped_storage().nbytes() / 2**20:.1f} MiB)"]
            queue.append(ref)
    return [f"no module global within {len(below_of)} referrers ({max_seconds:g} s at most) of the largest tensor "
            f"({tuple(target.shape)} {target.dtype}): held from C / C++ (e.g. a signal handler, an autograd "
            "node) or by a cycle the collector cannot see"]


def run_variant(args) -> int:
    """One variant in this process's world (the driver's torchrun): rank 0 writes its figures."""
    from adm_megatron.memory.measure import live_tensors

    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    workdir = os.path.dirname(os.path.abspath(args.out))  # the driver's, shared by the ranks
    result = measure(args.teacher, workdir, args.variant, variants(world, args.smoke)[args.variant], args.smoke)
    left = torch.cuda.memory_allocated() if torch.cuda.is_available() else 0
    result["allocated_after_the_trainer_gib"] = left / 2**30 if torch.cuda.is_available() else None
    result["left_allocated_by"] = holders([t for t in live_tensors() if t.is_cuda]) if left else None
    if rank == 0:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)
    return 0


def report(result: dict, name: str, baseline: dict | None) -> dict:
    """``result`` with its largest loss difference to the baseline's (the baseline runs first),
    printed as one line at once: a step stopped by its time limit keeps the variants done."""
    base = (baseline or result)["losses"]
    result["max_loss_difference_to_baseline"] = max(
        abs(result["losses"][i][k] - base[i][k]) for i in range(len(base)) for k in base[i])
    peak = "n/a" if result["peak_gib"] is None else f"{result['peak_gib']:.3f} GiB"
    placed = ", ".join(f"{phase} {m['before_gib']:.2f}->{m['after_gib']:.2f}"
                       for phase, m in (result["placement_gib_per_phase"] or {}).items())
    print(f"{name:<30} peak {peak:>12}   loss diff to baseline {result['max_loss_difference_to_baseline']:.2e}"
          + (f"   allocated before->after placement (GiB): {placed}" if placed else ""), flush=True)
    if result["left_allocated_by"]:
        print(f"    {result['allocated_after_the_trainer_gib']:.3f} GiB outlived the trainer, held by: "
              + " <- ".join(reversed(result["left_allocated_by"])), flush=True)
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="memory_settings.json")
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--nproc", type=int, default=None,
                        help="processes (GPUs) per variant, DP = nproc (default: min(2, GPUs), 1 on CPU)")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, fp32: checks the script runs (CPU)")
    parser.add_argument("--variant", help=argparse.SUPPRESS)  # internal: one variant, in the driver's torchrun
    parser.add_argument("--teacher", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.variant:
        return run_variant(args)
    nproc = args.nproc or max(1, min(2, torch.cuda.device_count()))
    results = {}
    with tempfile.TemporaryDirectory(prefix="memory_settings_") as workdir:
        size = (2, 2, 8) if args.smoke else (args.layers, args.heads, args.head_dim)
        teacher = build_teacher(workdir, *size)
        # each variant in a fresh torchrun: in one process, a deleted and collected trainer's memory was
        # still allocated on the H200 when the next variant ran (0.5-1.7 GiB in every figure after the
        # first); the variant reports what outlived its trainer and what holds it (left_allocated_by)
        for k, (name, overrides) in enumerate(variants(nproc, args.smoke).items()):
            part = os.path.join(workdir, f"variant{k}.json")
            command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
                       os.path.abspath(__file__), "--variant", name, "--teacher", teacher, "--out", part, *(["--smoke"] if args.smoke else [])]
            code = subprocess.run(command).returncode
            if code != 0:
                print(f"variant {name!r}: exit status {code}", file=sys.stderr)
                return code
            with open(part) as f:
                results[name] = report(json.load(f), name, results.get("baseline"))
            with open(args.out, "w") as f:  # after each variant, for the same reason as the lines
                json.dump({"world_size": nproc, "device": torch.cuda.get_device_name() if torch.cuda.is_available()
                           else "cpu", "variants": results}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
