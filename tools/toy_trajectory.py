"""One toy distillation with its quality measured along the way (the pilots behind the study's
settings, docs/toy_study.md).

    OMP_NUM_THREADS=1 python tools/toy_trajectory.py --config examples/cogvideox/toy_adm.yaml \\
        --every 200 --out /tmp/trajectory distill.generator_steps=2 distill.delta_t=250

Trains with the project's ``Trainer`` (the config plus ``key=value`` overrides, one process) and
every ``--every`` iterations samples the generator -- its raw weights and, when the config keeps
one, its EMA -- with the same noise and measures it as ``tools/eval_toy.py`` does (Fréchet distance
to the teacher's 50-step samples, per class, class accuracy, diversity). Prints one JSON line per
measurement, the teacher's own N-step figures first, and writes them to ``trajectory.jsonl``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tools"))

import torch  # noqa: E402

import eval_toy  # noqa: E402
from adm_megatron.config import ConfigError, load_config  # noqa: E402
from adm_megatron.toy.sampling import sample_fn  # noqa: E402
from adm_megatron.train.trainer import Trainer  # noqa: E402


def measure(trainer: Trainer, ev: eval_toy.Evaluator, steps: int, use_ema: bool) -> dict:
    """The generator's figures now (its EMA weights when ``use_ema``; the raw ones are restored)."""
    generator = trainer.generator
    backup = None
    if use_ema:
        backup = [p.detach().clone() for p in generator.parameters()]
        trainer.ema.copy_to(generator)
    x = sample_fn(trainer.networks.generator, ev.schedule, ev.labels, ev.embeddings, steps, eval_toy.EVAL_SEED)
    if backup is not None:
        with torch.no_grad():
            for p, b in zip(generator.parameters(), backup):
                p.copy_(b)
    return ev.measure(x)


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True)
    parser.add_argument("--every", type=int, default=100, help="measure every N iterations")
    parser.add_argument("--out", required=True, help="run directory (trajectory.jsonl goes there)")
    parser.add_argument("--per-class", type=int, default=128)
    parser.add_argument("--cache", default=None, help="directory to cache the teacher's samples in")
    parser.add_argument("overrides", nargs="*", help="key=value config overrides")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)

    try:
        config = load_config(args.config, [*args.overrides, f"output_dir={args.out}", "train.export=false",
                                           "logging.progress=false", "logging.wandb_mode=disabled"])
    except ConfigError as err:
        print(f"toy_trajectory: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    guidance = config.distill.guidance_scale[0]
    ev = eval_toy.Evaluator(config.model.teacher, args.per_class, guidance, args.cache)
    steps = config.distill.generator_steps
    rows = [{"teacher_steps": n, **ev.measure(ev.teacher_samples(n, eval_toy.EVAL_SEED))}
            for n in (steps, 50)]
    trainer = Trainer(config)
    os.makedirs(args.out, exist_ok=True)
    start = time.time()
    with open(os.path.join(args.out, "trajectory.jsonl"), "w") as log:

        def emit(row: dict) -> None:
            for stream in (log, sys.stdout):
                print(json.dumps(row), file=stream, flush=True)

        for row in rows:
            emit(row)
        for iteration in range(config.train.max_iterations + 1):
            if iteration % args.every == 0 or iteration == config.train.max_iterations:
                trainer.generator.eval()
                with torch.no_grad():
                    row = {"iteration": iteration, "seconds": round(time.time() - start, 1),
                           **measure(trainer, ev, steps, use_ema=False)}
                    if trainer.ema is not None:
                        row["ema"] = measure(trainer, ev, steps, use_ema=True)
                trainer.generator.train()
                rows.append(row)
                emit(row)
            if iteration < config.train.max_iterations:
                trainer.train_iteration(iteration)
    return rows


if __name__ == "__main__":
    main()
