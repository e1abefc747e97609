"""``adm-megatron plan`` / ``tools/plan_memory.py``: the memory plan of a run config on a card.

Prints the table, optionally writes the JSON, and exits 0 when the run fits, 1 when it does not
(on the card, or with ``--host`` in a node's host memory; with a one-line reason) and 2 for a bad
config or layout (one line, before any model is built).
"""

from __future__ import annotations

import argparse
import sys

from adm_megatron.config import ConfigError, keys_located, load_config
from adm_megatron.memory.plan import OFFLOAD, TRAINABLE, PlanError, gib
from adm_megatron.memory.report import format_table, plan_to_dict, samples_warning
from adm_megatron.families import preset_names
from adm_megatron.json_file import check_json_destination, write_json_atomically



def _host_advice(plan) -> str:
    """What would make a plan's host memory fit, from the host terms it has: offloaded state (offload
    less, or shard the offloaded optimizers not sharded yet), and checkpoint staging, which sharding
    does not change (the save is split over the DP x CP ranks whatever the optimizer)."""
    s = plan.settings
    advice = []
    offloaded = sorted(n for n in plan.networks if n in TRAINABLE and s.offload_mode(n) != "none")
    if offloaded:
        unsharded = [n for n in offloaded if s.offload_mode(n) == "optimizer" and n not in s.shard_optimizer]
        shard = (f" or shard their optimizer over data parallel (optim.<network>.shard_over_dp; not yet: "
                 f"{', '.join(unsharded)})" if unsharded else "")
        advice.append(f"offload less (optim.<network>.offload; now: {', '.join(offloaded)}){shard}")
    if plan.host["checkpoint staging"]:
        advice.append(f"the checkpoint staging ({gib(plan.host['checkpoint staging']):.2f} GiB a rank) shrinks only "
                      "with fewer ranks on a node (--gpus-per-node) or more data-parallel ranks to split it")
    return "; ".join(advice)


def _networks(value: str) -> frozenset:
    if value in ("", "none"):
        return frozenset()
    names = TRAINABLE if value == "all" else tuple(v.strip() for v in value.split(","))
    unknown = sorted({repr(n) for n in names} - {repr(n) for n in TRAINABLE})  # repr: an empty item shows as ''
    if unknown:
        raise argparse.ArgumentTypeError(f"{', '.join(unknown)}: expected all, none or names among "
                                         f"{', '.join(TRAINABLE)}")
    return frozenset(names)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="YAML run config (see examples/)")
    parser.add_argument("--arch", choices=preset_names("memory-plan"), default="",
                        help="plan a real-size architecture (built on the meta device) instead of reading "
                        "model.teacher")
    parser.add_argument("--gpus", type=int, required=True, help="world size (DP = gpus / (TP x CP))")
    parser.add_argument("--card", type=float, required=True, help="GPU memory in GiB (e.g. 80 or 40)")
    parser.add_argument("--margin", type=float, default=0.1,
                        help="fraction of the card (and of --host) kept free for what the formulas leave out "
                        "(default 0.1)")
    parser.add_argument("--gpus-per-node", type=int, default=8,
                        help="GPUs of one node, whose ranks share its host memory (default 8)")
    parser.add_argument("--host", type=float, default=0.0, metavar="GIB",
                        help="a node's host memory in GiB: also check that offloaded states and checkpoint "
                        "staging fit it (default: report them only)")
    parser.add_argument("--shard-optimizer", type=_networks, default=None, metavar="NETS",
                        help="optimizer state sharded over DP: all, none or e.g. generator,fake_score "
                        "(default: the config's optim.<network>.shard_over_dp)")
    parser.add_argument("--offload", choices=OFFLOAD, default=None,
                        help="idle networks' optimizer state (and params) in pinned CPU memory, for every "
                        "trainable network (default: the config's optim.<network>.offload)")
    parser.add_argument("--params", choices=("fp32", "bf16"), default=None,
                        help="trainable weights fp32, or bf16 with fp32 master copies (default: the config's "
                        "model.bf16_params)")
    parser.add_argument("--assume-pinned-memory", action="store_true",
                        help="plan offload from a machine without CUDA (the target can pin memory)")
    parser.add_argument("--json", default="", help="also write the plan as JSON to this file")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="dotted config overrides, e.g. parallel.tensor_parallel=2 model.recompute=full "
                        "optim.generator.shard_over_dp=true")


def run(args: argparse.Namespace) -> int:
    import torch

    from adm_megatron.memory.run_plan import plan_run

    try:
        if args.json:  # before the plan is printed: a plan whose JSON cannot be written is no plan
            check_json_destination(args.json, "--json")
    except ValueError as err:
        print(f"adm-megatron plan: {err}", file=sys.stderr)
        return 2
    try:
        config = load_config(args.config, args.overrides)
        with keys_located(config, PlanError):
            plan = plan_run(
                config, args.gpus, preset=args.arch, card_gib=args.card, margin=args.margin,
                shard_optimizer=args.shard_optimizer, offload=args.offload, params=args.params,
                pinned_memory=torch.cuda.is_available() or args.assume_pinned_memory,
                gpus_per_node=args.gpus_per_node, host_gib=args.host,
            )
    except (ConfigError, PlanError) as err:
        print(f"adm-megatron plan: {err}", file=sys.stderr)
        return 2
    print(format_table(plan, title=f"{args.arch or config.model.teacher} on {args.gpus} GPU{'s' * (args.gpus != 1)} of "
                                  f"{args.card:g} GiB"))
    if args.json:
        try:
            write_json_atomically(args.json, plan_to_dict(plan))
        except OSError as err:
            print(f"adm-megatron plan: --json {args.json}: cannot write it ({err.strerror})", file=sys.stderr)
            return 2
    if plan.fits and not plan.samples_fit:
        print(f"adm-megatron plan: warning: {samples_warning(plan)}", file=sys.stderr)
    if not plan.fits:
        print(f"adm-megatron plan: does not fit: peak {gib(plan.peak):.2f} GiB ({plan.peak_phase} phase) > "
              f"{gib(plan.budget):.2f} GiB usable of {args.card:g} GiB", file=sys.stderr)
        return 1
    if not plan.host_fits:
        print(f"adm-megatron plan: host memory does not fit: {plan.ranks_per_node} ranks x "
              f"{gib(sum(plan.host.values())):.2f} GiB = {gib(plan.host_per_node):.2f} GiB > "
              f"{gib(plan.host_budget):.2f} GiB usable of {args.host:g} GiB per node; {_host_advice(plan)}",
              file=sys.stderr)
        return 1
    return 0
