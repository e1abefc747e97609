"""The whole toy distillation study in one command (docs/toy_study.md).

    python tools/run_toy_study.py --out docs/            # the committed study (3 seeds)
    python tools/run_toy_study.py --out /tmp/pilot --seeds 0 --iterations 300 --per-class 64

Distils the committed toy teacher (``assets/toy_teacher``) with the project's trainer
(``adm-megatron train``) -- ADM and DMD2 into 1-, 2- and 4-step generators (same batch, iterations
and seeds), and a two-stage 1-step run (stage 1: DMD2 1-step, ``toy_two_stage_1.yaml``; stage 2:
ADM from its generator via ``model.generator_init``, ``toy_two_stage_2.yaml``) -- for each seed,
at most ``--jobs`` trainings at a time, one thread each. Then ``tools/eval_toy.py`` measures every generator and the teacher, and this script writes
``toy_study.md``, ``toy_study.json`` and ``toy_samples.png`` into ``--out``. ``--train-teacher``
first retrains the teacher with the committed command (about 15 minutes).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tools"))

CONFIGS = {
    "adm": "examples/cogvideox/toy_adm.yaml",
    "dmd2": "examples/cogvideox/toy_dmd2.yaml",
    "stage1": "examples/cogvideox/toy_two_stage_1.yaml",
    "two_stage": "examples/cogvideox/toy_two_stage_2.yaml",
}
LABELS = {"adm": "ADM", "dmd2": "DMD2"}
STAGE1_LABEL = "two-stage 1-step, stage 1 only (DMD2)"
TWO_STAGE_LABEL = "two-stage 1-step (DMD2 -> ADM)"
GUIDANCE = 1.5  # the configs' distill.guidance_scale (a fixed scale in the toy study)
NOTES = """
## Notes
"""


def plan_runs(work: str, seeds: list[int], steps: list[int], iterations: int | None) -> list[dict]:
    runs = []
    extra = [f"train.max_iterations={iterations}"] if iterations else []
    for seed in seeds:
        for method in ("adm", "dmd2"):
            for n in steps:
                name = f"{method}-{n}step-seed{seed}"
                runs.append({
                    "name": name, "label": f"{LABELS[method]} {n}-step", "method": method, "steps": n,
                    "seed": seed, "config": CONFIGS[method], "after": None,
                    "overrides": [f"distill.generator_steps={n}", f"seed={seed}",
                                  f"output_dir={work}/{name}", *extra],
                })
        if 1 in steps:
            stage1 = f"two-stage-1-seed{seed}"
            runs.append({
                "name": stage1, "label": STAGE1_LABEL, "method": "dmd2", "steps": 1, "seed": seed,
                "config": CONFIGS["stage1"], "after": None,
                "overrides": [f"seed={seed}", f"output_dir={work}/{stage1}", *extra],
            })
            name = f"two-stage-2-seed{seed}"
            runs.append({
                "name": name, "label": TWO_STAGE_LABEL, "method": "dmd2+adm", "steps": 1, "seed": seed,
                "config": CONFIGS["two_stage"], "after": stage1,
                "overrides": [f"seed={seed}", f"output_dir={work}/{name}",
                              f"model.generator_init={work}/{stage1}/generator", *extra],
            })
    for run in runs:
        run["output_dir"] = f"{work}/{run['name']}"
        run["generator"] = f"{run['output_dir']}/generator"
        run["command"] = ("OMP_NUM_THREADS=1 adm-megatron train --config " + run["config"] + " "
                          + " ".join(shlex.quote(o) for o in run["overrides"]))
    return runs


def execute(runs: list[dict], jobs: int, resume: bool) -> None:
    """Run the trainings, at most ``jobs`` at a time, each after the run it depends on."""
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", HF_HUB_OFFLINE="1",
               WANDB_MODE="disabled", TOKENIZERS_PARALLELISM="false")
    pending = list(runs)
    running: dict[int, tuple[dict, subprocess.Popen, float, object]] = {}
    done: set[str] = set()
    for run in runs:
        if resume and os.path.isfile(os.path.join(run["generator"], "config.json")):
            timing = os.path.join(run["output_dir"], "timing.json")
            if os.path.isfile(timing):
                with open(timing) as f:
                    run.update(json.load(f))
            done.add(run["name"])
            pending.remove(run)
    while pending or running:
        ready = [r for r in pending if r["after"] is None or r["after"] in done]
        while ready and len(running) < jobs:
            run = ready.pop(0)
            pending.remove(run)
            if os.path.isdir(run["output_dir"]):
                shutil.rmtree(run["output_dir"])
            os.makedirs(run["output_dir"])
            log = open(os.path.join(run["output_dir"], "train.log"), "w")
            cmd = [sys.executable, "-m", "adm_megatron.cli", "train", "--config", run["config"], *run["overrides"]]
            proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
            running[proc.pid] = (run, proc, time.time(), log)
            print(f"[{time.strftime('%H:%M:%S')}] start {run['name']}", flush=True)
        if not running:
            raise RuntimeError(f"runs waiting on runs that never finished: {[r['name'] for r in pending]}")
        pid, status, usage = os.wait4(-1, 0)
        if pid not in running:
            continue
        run, proc, started, log = running.pop(pid)
        proc.returncode = os.waitstatus_to_exitcode(status)
        log.close()
        run["wall_seconds"] = round(time.time() - started, 1)
        run["cpu_seconds"] = round(usage.ru_utime + usage.ru_stime, 1)
        with open(os.path.join(run["output_dir"], "timing.json"), "w") as f:
            json.dump({"wall_seconds": run["wall_seconds"], "cpu_seconds": run["cpu_seconds"]}, f)
        if proc.returncode != 0:
            raise RuntimeError(f"{run['name']} failed (exit {proc.returncode}); see {run['output_dir']}/train.log")
        done.add(run["name"])
        print(f"[{time.strftime('%H:%M:%S')}] done  {run['name']}: {run['wall_seconds']}s wall, "
              f"{run['cpu_seconds']}s cpu", flush=True)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="where toy_study.md / .json / toy_samples.png go")
    parser.add_argument("--work", default="outputs/toy_study", help="run directories")
    parser.add_argument("--teacher", default="assets/toy_teacher")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--iterations", type=int, default=None, help="override train.max_iterations")
    parser.add_argument("--per-class", type=int, default=256, help="evaluation samples per class")
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--resume", action="store_true", help="keep finished runs of --work")
    parser.add_argument("--train-teacher", action="store_true", help="retrain the teacher first")
    args = parser.parse_args(argv)

    import eval_toy

    start = time.time()
    os.chdir(ROOT)
    if args.train_teacher:
        import train_toy_teacher

        with open(os.path.join(args.teacher, "training.json")) as f:
            committed = json.load(f)["args"]
        train_toy_teacher.main(["--out", args.teacher] + [
            f"--{k.replace('_', '-')}={v}" for k, v in committed.items() if k != "out"])
    runs = plan_runs(args.work, args.seeds, args.steps, args.iterations)
    for run in runs:
        run["overrides"] = [f"model.teacher={args.teacher}", f"data.path={args.teacher}/prompts",
                            *run["overrides"]]
    execute(runs, args.jobs, args.resume)
    train_seconds = time.time() - start
    manifest = {
        "teacher": args.teacher, "guidance": GUIDANCE,
        "runs": [{k: r[k] for k in ("name", "label", "method", "steps", "seed", "generator", "command",
                                    "wall_seconds", "cpu_seconds") if k in r} for r in runs],
        "target_names": {"adm_2": "ADM 2-step", "adm_4": "ADM 4-step", "two_stage_1": TWO_STAGE_LABEL},
    }
    with open(os.path.join(args.work, "manifest.json"), "w") as f:
        json.dump(manifest, f, indent=1)
    os.makedirs(args.out, exist_ok=True)
    results = eval_toy.evaluate(manifest, args.per_class, os.path.join(args.work, "cache"),
                                os.path.join(args.out, "toy_samples.png"))
    results["study"] = {
        "command": "python tools/run_toy_study.py " + " ".join(shlex.quote(a) for a in (
            argv if argv is not None else sys.argv[1:])),
        "train_wall_seconds": round(train_seconds, 1),
        "total_wall_seconds": round(time.time() - start, 1),
        "jobs": args.jobs,
        "seeds": args.seeds,
        "configs": {k: v for k, v in CONFIGS.items()},
    }
    with open(os.path.join(args.teacher, "training.json")) as f:
        results["teacher_training"] = json.load(f)
    with open(os.path.join(args.out, "toy_study.json"), "w") as f:
        json.dump(results, f, indent=1)
    with open(os.path.join(args.out, "toy_study.md"), "w") as f:
        f.write(eval_toy.render_report(results, NOTES))
    print(eval_toy.markdown_table(results))
    print(eval_toy.targets_table(results))
    print(f"study finished in {results['study']['total_wall_seconds']}s")
    return results


if __name__ == "__main__":
    main()
