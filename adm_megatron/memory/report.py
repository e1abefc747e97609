"""A memory plan as a terminal table and as JSON (GiB figures, the settings it was made for)."""

from __future__ import annotations

import dataclasses

from adm_megatron.memory.plan import GIB, PHASES, TRAINABLE, MemoryPlan, gib


def _recompute(s, network: str) -> str:
    modes = {p: s.recompute_mode(network, p) for p in PHASES}
    if len(set(modes.values())) == 1:
        return next(iter(modes.values()))
    return ",".join(f"{p}:{m}" for p, m in modes.items() if m != "none")


def _per_network(value, networks) -> str:
    values = {n: value(n) for n in networks}
    if len(set(values.values())) == 1:
        return next(iter(values.values()))
    return ", ".join(f"{n} {v}" for n, v in values.items())


def _r(value: float) -> float:
    # to the KiB (6 decimals of a GiB): a toy plan's MiB figures were 0.001 and 0.0 at 3 decimals
    return round(gib(value), 6)


def plan_to_dict(plan: MemoryPlan) -> dict:
    settings = dataclasses.asdict(plan.settings)
    settings["shard_optimizer"] = sorted(plan.settings.shard_optimizer)
    settings["grad_clip"] = sorted(plan.settings.grad_clip)
    return {
        "settings": settings,
        "units": "GiB per GPU",
        "networks": {name: {k: _r(v) for k, v in parts.items()} for name, parts in plan.networks.items()},
        "fixed": {k: _r(v) for k, v in plan.fixed.items()},
        "phases": {
            name: {
                "resident": _r(p.resident), "activations": _r(p.activations),
                "transients": {k: _r(v) for k, v in p.transients.items()},
                "peak": _r(p.peak), "peak_moment": p.peak_moment,
            }
            for name, p in plan.phases.items()
        },
        "samples": None if plan.samples is None else {
            "resident": _r(plan.samples.resident), "transients": {k: _r(v) for k, v in plan.samples.transients.items()},
            "peak": _r(plan.samples.peak), "peak_moment": plan.samples.peak_moment, "fits": plan.samples_fit},
        "host": {"units": "GiB per rank", **{k: _r(v) for k, v in plan.host.items()},
                 "ranks_per_node": plan.ranks_per_node, "per_node": _r(plan.host_per_node),
                 "node_memory": plan.settings.host_gib or None, "fits": plan.host_fits if plan.settings.host_gib else None},
        "peak_phase": plan.peak_phase,
        "peak": _r(plan.peak),
        "card": plan.settings.card_gib,
        "budget": _r(plan.budget),
        "fits": plan.fits,
    }


def samples_warning(plan: MemoryPlan) -> str:
    """One line: the run's samples will not fit the card (training may)."""
    return (f"the samples need {gib(plan.samples.peak):.2f} GiB per GPU at their {plan.samples.peak_moment}, more than "
            f"the {gib(plan.budget):.2f} GiB usable: each sampling would run out of memory and be skipped (training "
            "goes on); set train.sample_vae_tiling=true, or train.num_samples=0 and render the exported generator "
            "with adm-megatron sample")


def _unit(plan: MemoryPlan) -> tuple[str, float]:
    """The table's unit: GiB, or MiB for a plan whose peak is under 1 GiB (a tiny test model's table
    would read 0.00 throughout)."""
    biggest = max(plan.peak, plan.samples.peak if plan.samples is not None else 0.0)
    return ("GiB", GIB) if biggest >= GIB else ("MiB", 2.0**20)


def host_line(plan: MemoryPlan) -> str:
    """One line: the host memory the plan's terms take, per rank and per node, and against the
    node's memory when it was given."""
    unit, size = _unit(plan)
    held = plan.host["offloaded optimizer states"] + plan.host["offloaded weights"]
    line = (f"host memory per rank: {held / size:.2f} {unit} offloaded + "
            f"{plan.host['checkpoint staging'] / size:.2f} {unit} while a checkpoint is written; "
            f"{plan.ranks_per_node} rank{'s' * (plan.ranks_per_node != 1)} per node: {plan.host_per_node / size:.2f} {unit}")
    if plan.settings.host_gib:
        line += (f" of {plan.settings.host_gib:g} GiB with {plan.settings.margin:.0%} margin = "
                 f"{gib(plan.host_budget):.2f} GiB: {'fits' if plan.host_fits else 'DOES NOT FIT'}")
    return line


def format_table(plan: MemoryPlan, title: str = "") -> str:
    s = plan.settings
    unit, size = _unit(plan)
    lines = [title] if title else []
    lines.append(
        f"layout TP={s.tensor_parallel} CP={s.context_parallel} DP={s.data_parallel}, micro-batch {s.batch_size}"
        f"{f' x {s.microbatches} accumulated' if s.microbatches > 1 else ''}, "
        f"SP={'on' if s.sequence_parallel else 'off'}, activations {s.activations}, trainable params "
        f"{s.params}, teacher {'bf16' if s.teacher_bf16() else 'fp32'}"
    )
    lines.append(f"recompute {_per_network(lambda n: _recompute(s, n), ('teacher', *TRAINABLE[:2]))}; "
                 f"sharded optimizer: {', '.join(sorted(s.shard_optimizer)) or 'none'}; "
                 f"offload {_per_network(s.offload_mode, TRAINABLE)}")
    w = max([16, *(len(name) + 2 for name in plan.fixed)])  # the name column fits every row's name
    lines.append(f"{'network':<{w}}{'weights':>10}{'grads':>10}{'optimizer':>11}   ({unit} per GPU)")
    for name, parts in plan.networks.items():
        lines.append(f"{name:<{w}}{parts['weights'] / size:>10.2f}{parts['grads'] / size:>10.2f}"
                     f"{parts['optimizer'] / size:>11.2f}")
    for name, value in plan.fixed.items():
        lines.append(f"{name:<{w}}{value / size:>10.2f}   (fixed)")
    lines.append(f"{'phase':<{w}}{'resident':>10}{'activ.':>10}{'transient':>11}{'peak':>10}   at (largest transients)")
    for name, p in plan.phases.items():
        parts = ", ".join(f"{k} {v / size:.2f}" for k, v in sorted(p.transients.items(), key=lambda kv: -kv[1]))
        lines.append(f"{name:<{w}}{p.resident / size:>10.2f}{p.activations / size:>10.2f}"
                     f"{sum(p.transients.values()) / size:>11.2f}{p.peak / size:>10.2f}   {p.peak_moment}"
                     f"{f' ({parts})' if parts else ''}")
    if plan.samples is not None:
        p = plan.samples
        parts = ", ".join(f"{k} {v / size:.2f}" for k, v in sorted(p.transients.items(), key=lambda kv: -kv[1]))
        lines.append(f"{'(samples)':<{w}}{p.resident / size:>10.2f}{0:>10.2f}{sum(p.transients.values()) / size:>11.2f}"
                     f"{p.peak / size:>10.2f}   {p.peak_moment} ({parts})")
    verdict = "fits" if plan.fits else "DOES NOT FIT"
    lines.append(f"peak {plan.peak / size:.2f} {unit} in the {plan.peak_phase} phase; card {s.card_gib:g} GiB with "
                 f"{s.margin:.0%} margin = {gib(plan.budget):.2f} GiB: {verdict}")
    lines.append(host_line(plan))
    if not plan.samples_fit:
        lines.append(samples_warning(plan))
    return "\n".join(lines)
