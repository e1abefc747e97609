"""Evaluate the toy study: sample the teacher and the distilled generators, measure them against
the teacher's 50-step samples and the true data, write the table, the JSON and the sample grid.

    OMP_NUM_THREADS=1 python tools/eval_toy.py --manifest outputs/toy_study/manifest.json --out docs/
    python tools/eval_toy.py --generator outputs/demo/generator --out outputs/demo/eval   # its steps and CFG: its distillation.json

The manifest (written by ``tools/run_toy_study.py``) names the teacher and the runs: for each
run the method label, the number of generator steps, the training seed and the exported generator
directory. ``--generator`` instead measures one generator beside the teacher's weights used as the
same N-step generator (before / after distillation, ``make demo``). Every model is sampled with
``adm_megatron.diffusion.rollout`` on its N-step trailing schedule: generators without CFG, the
teacher with 1, 2, 4 and 50 DDIM steps and the CFG scale the distillation targets. Figures
(``adm_megatron.toy.metrics``): Fréchet distance (FD) in the fixed random-conv feature space to the
teacher's 50-step samples and to the true data, overall and averaged per class; accuracy of a
classifier trained on true data; within-class diversity. Distilled figures are the mean and the
spread (sample std) over the training seeds.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402

from adm_megatron.mcore_compat import quiet_import_notices  # noqa: E402
from adm_megatron.sampling import generator_steps, teacher_guidance  # noqa: E402
from adm_megatron.toy import pipeline as toy_pipeline  # noqa: E402
from adm_megatron.toy.data import balanced_labels, sample_dataset  # noqa: E402
from adm_megatron.toy.metrics import (FeatureMap, accuracy, diversity, frechet_distance,  # noqa: E402
                                      per_class_frechet, train_classifier)
from adm_megatron.toy.sampling import sample  # noqa: E402

REF_SEED, EVAL_SEED, TRUE_REF_SEED, TRUE_EVAL_SEED = 1000, 2000, 3000, 4000
TEACHER_STEPS = (1, 2, 4, 50)
METRICS = ("fd_teacher", "fd_teacher_class", "fd_true", "fd_true_class", "accuracy", "diversity")


class Evaluator:
    def __init__(self, teacher_dir: str, per_class: int, guidance: float, cache_dir: str | None = None):
        self.teacher_dir = teacher_dir
        self.per_class = per_class
        self.guidance = guidance
        self.cache_dir = cache_dir
        self.schedule = toy_pipeline.schedule()
        self.embeddings, self.negative = toy_pipeline.load_prompts(teacher_dir)
        self.labels = balanced_labels(per_class)
        self.features = FeatureMap()
        self.classifier = train_classifier()
        self.teacher = toy_pipeline.load_transformer(teacher_dir)
        ref = self.teacher_samples(50, REF_SEED)
        self.ref_feat = self.features(ref)
        true_ref, _ = sample_dataset(per_class, TRUE_REF_SEED)
        self.true_feat = self.features(true_ref)

    def teacher_samples(self, steps: int, seed: int) -> torch.Tensor:
        path = None
        if self.cache_dir:
            weights = os.path.join(self.teacher_dir, "transformer", "diffusion_pytorch_model.safetensors")
            stamp = int(os.path.getmtime(weights)) if os.path.isfile(weights) else 0
            path = os.path.join(self.cache_dir, f"teacher-{stamp}-s{steps}-seed{seed}-m{self.per_class}"
                                                f"-g{self.guidance}.pt")
            if os.path.isfile(path):
                return torch.load(path)
        x = sample(self.teacher, self.schedule, self.labels, self.embeddings, steps, seed,
                   negative=self.negative, guidance=self.guidance)
        if path:
            os.makedirs(self.cache_dir, exist_ok=True)
            torch.save(x, path)
        return x

    def generator_samples(self, generator_dir: str, steps: int) -> torch.Tensor:
        model = toy_pipeline.load_transformer(generator_dir)
        return sample(model, self.schedule, self.labels, self.embeddings, steps, EVAL_SEED)

    def measure(self, x: torch.Tensor) -> dict:
        feat = self.features(x)
        lab = self.labels
        return {
            "fd_teacher": frechet_distance(feat, self.ref_feat),
            "fd_teacher_class": per_class_frechet(feat, lab, self.ref_feat, lab),
            "fd_true": frechet_distance(feat, self.true_feat),
            "fd_true_class": per_class_frechet(feat, lab, self.true_feat, lab),
            "accuracy": accuracy(self.classifier, x, lab),
            "diversity": diversity(x, lab),
        }


def _summary(entries: list[dict]) -> dict:
    out = {"seeds": [e.get("seed") for e in entries]}
    for key in METRICS:
        values = [e[key] for e in entries]
        out[key] = statistics.fmean(values)
        out[key + "_std"] = statistics.stdev(values) if len(values) > 1 else 0.0
        out[key + "_values"] = values
    return out


def _curve_summary(entries: list[dict]) -> dict | None:
    """The runs' discriminator curves (tools/run_toy_study.py) averaged over seeds, window by window."""
    curves = [e["discriminator"] for e in entries if e.get("discriminator")]
    if not curves:
        return None
    n = min(len(c["start"]) for c in curves)
    mean = lambda key, i: statistics.fmean(c[key][i] for c in curves)  # noqa: E731
    return {"window": curves[0]["window"], "start": curves[0]["start"][:n],
            "accuracy": [mean("accuracy", i) for i in range(n)], "margin": [mean("margin", i) for i in range(n)],
            "above_chance": statistics.fmean(c["above_chance"] for c in curves)}


def evaluate(manifest: dict, per_class: int = 128, cache_dir: str | None = None,
             grid_path: str | None = None) -> dict:
    """All figures of the study as one JSON-able dict (see the module docstring)."""
    start = time.time()
    ev = Evaluator(manifest["teacher"], per_class, manifest["guidance"], cache_dir)
    rows: list[dict] = []
    grid: list[tuple[str, torch.Tensor]] = []
    pick = torch.arange(0, len(ev.labels), per_class)  # the first sample of each class

    true_eval, _ = sample_dataset(per_class, TRUE_EVAL_SEED)
    rows.append({"name": "true data", "kind": "data", "steps": None, **ev.measure(true_eval)})
    grid.append(("true data", true_eval[pick]))
    for steps in sorted(TEACHER_STEPS, reverse=True):
        x = ev.teacher_samples(steps, EVAL_SEED)
        rows.append({"name": f"teacher {steps}-step", "kind": "teacher", "steps": steps, **ev.measure(x)})
        grid.append((f"teacher {steps}-step", x[pick]))

    runs = []
    for run in manifest["runs"]:
        x = ev.generator_samples(run["generator"], run["steps"])
        entry = {**run, **ev.measure(x)}
        runs.append(entry)
        if run["seed"] == manifest["runs"][0]["seed"]:
            grid.append((f"{run['label']} (seed {run['seed']})", x[pick]))
        print(f"{run['label']} seed {run['seed']}: FD-teacher {entry['fd_teacher']:.3f} "
              f"acc {entry['accuracy']:.3f}", flush=True)
    groups: dict[str, list[dict]] = {}
    for entry in runs:
        groups.setdefault(entry["label"], []).append(entry)
    for label, entries in groups.items():
        rows.append({"name": label, "kind": "distilled", "steps": entries[0]["steps"],
                     "method": entries[0]["method"], "group": entries[0].get("group", "main"),
                     "discriminator": _curve_summary(entries), **_summary(entries)})

    teacher = {r["steps"]: r for r in rows if r["kind"] == "teacher"}
    by_name = {r["name"]: r for r in rows}
    floor = frechet_distance(ev.features(ev.teacher_samples(50, EVAL_SEED)), ev.ref_feat)
    results = {
        "settings": {
            "teacher": manifest["teacher"], "guidance": manifest["guidance"], "per_class": per_class,
            "samples_per_set": len(ev.labels), "ref_seed": REF_SEED, "eval_seed": EVAL_SEED,
            "true_ref_seed": TRUE_REF_SEED, "true_eval_seed": TRUE_EVAL_SEED,
        },
        "noise_floor": {
            "teacher50_vs_teacher50": floor,
            "true_vs_true": by_name["true data"]["fd_true"],
        },
        "rows": rows,
        "runs": runs,
        "targets": check_targets(by_name, teacher, manifest.get("target_names", {})),
        "eval_seconds": round(time.time() - start, 1),
    }
    if grid_path:
        from adm_megatron.toy.render import save_grid

        os.makedirs(os.path.dirname(os.path.abspath(grid_path)), exist_ok=True)
        save_grid(grid, grid_path)
        results["grid"] = grid_path
    return results


def check_targets(by_name: dict, teacher: dict, names: dict) -> list[dict]:
    """The issue's targets on the mean over seeds; a missing row is reported as not run."""
    if 2 not in teacher or 4 not in teacher:
        return []
    t2, t4 = teacher[2]["fd_teacher"], teacher[4]["fd_teacher"]
    checks = [
        ("adm_2", "ADM 2-step FD-to-teacher-50 <= 0.5 x teacher 2-step", lambda r: r["fd_teacher"] <= 0.5 * t2),
        ("adm_4", "ADM 4-step FD-to-teacher-50 <= teacher 4-step", lambda r: r["fd_teacher"] <= t4),
        ("two_stage_1", "two-stage 1-step FD-to-teacher-50 <= 0.5 x teacher 2-step",
         lambda r: r["fd_teacher"] <= 0.5 * t2),
        ("adp_two_stage_1", "ADP -> ADM 1-step FD-to-teacher-50 <= 0.5 x teacher 2-step",
         lambda r: r["fd_teacher"] <= 0.5 * t2),
    ]
    out = []
    for key, text, test in checks:
        if key not in names:
            continue
        row = by_name.get(names[key])
        out.append({"target": text, "row": names[key], "value": row and row["fd_teacher"],
                    "passed": bool(row and test(row))})
    for key in ("adm_2", "adm_4", "two_stage_1", "adp_two_stage_1"):
        if key not in names:
            continue
        row = by_name.get(names[key])
        out.append({"target": f"class accuracy >= 90% ({names[key]})", "row": names[key],
                    "value": row and row["accuracy"], "passed": bool(row and row["accuracy"] >= 0.9)})
    return out


def _fmt(row: dict, key: str, digits: int = 3) -> str:
    value = row[key]
    if key == "accuracy":
        text = f"{100 * value:.1f}%"
        return text + (f" ± {100 * row[key + '_std']:.1f}" if len(row.get(key + "_values", [])) > 1 else "")
    text = f"{value:.{digits}f}"
    return text + (f" ± {row[key + '_std']:.{digits}f}" if len(row.get(key + "_values", [])) > 1 else "")


def markdown_table(results: dict, group: str = "main") -> str:
    """The rows of the true data, the teacher and the distilled runs of ``group`` (main, control,
    sweep), as a markdown table."""
    head = ("| samples | steps | FD to teacher-50 | per-class FD to teacher-50 | FD to true data | "
            "per-class FD to true data | class accuracy | diversity |")
    lines = [head, "|" + "---|" * 8]
    for row in results["rows"]:
        if row["kind"] == "distilled" and row.get("group", "main") != group:
            continue
        if row["kind"] != "distilled" and group != "main":
            continue
        steps = "" if row["steps"] is None else str(row["steps"])
        cells = [row["name"], steps] + [_fmt(row, k, 2 if k == "diversity" else 3) for k in METRICS]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def discriminator_table(results: dict) -> str:
    """Each distilled row's discriminator over training: paired accuracy (margin) per window, mean
    over seeds, and the share of windows with accuracy above chance."""
    rows = [r for r in results["rows"] if r.get("discriminator")]
    if not rows:
        return ""
    starts = max((r["discriminator"]["start"] for r in rows), key=len)  # runs may differ in length
    window = rows[0]["discriminator"]["window"]
    head = "| run | " + " | ".join(f"it {s}-{s + window - 1}" for s in starts) + " | windows above chance |"
    lines = [head, "|" + "---|" * (len(starts) + 2)]
    for r in rows:
        d = r["discriminator"]
        cells = [f"{a:.3f} ({m:+.4f})" for a, m in zip(d["accuracy"], d["margin"])]
        cells += [""] * (len(starts) - len(cells))
        lines.append(f"| {r['name']} | " + " | ".join(cells) + f" | {100 * d['above_chance']:.0f}% |")
    return "\n".join(lines)


def targets_table(results: dict) -> str:
    lines = ["| target | row | value | met |", "|---|---|---|---|"]
    for t in results["targets"]:
        value = "not run" if t["value"] is None else (
            f"{100 * t['value']:.1f}%" if "accuracy" in t["target"] else f"{t['value']:.3f}")
        lines.append(f"| {t['target']} | {t['row']} | {value} | {'yes' if t['passed'] else 'NO'} |")
    return "\n".join(lines)


TOY_GUIDANCE = 1.5  # the toy configs' CFG


def single_generator_manifest(teacher: str, generator: str, steps: int, guidance: float) -> dict:
    """Before / after for one run (``make demo``): the teacher's weights used as the N-step
    generator (what the generator is at iteration 0) and the distilled generator."""
    return {
        "teacher": teacher, "guidance": guidance,
        "runs": [
            {"label": f"before: teacher weights as {steps}-step generator", "method": "init",
             "steps": steps, "seed": 0, "generator": teacher},
            {"label": f"after: distilled {steps}-step generator", "method": "distilled",
             "steps": steps, "seed": 0, "generator": generator},
        ],
    }


def _check_architectures(manifest: dict) -> None:
    """Each generator is a transformer of the teacher's architecture (another one's, e.g. a tiny
    CogVideoX run's, failed deep in its first forward with a shape mismatch)."""
    try:
        want = toy_pipeline.transformer_config(manifest["teacher"])
        for run in manifest["runs"]:
            got = toy_pipeline.transformer_config(run["generator"])
            differ = [k for k in toy_pipeline.TOY_TRANSFORMER if got.get(k) != want.get(k)]
            if differ:
                raise ValueError(f"{run['generator']}: not of the teacher's architecture ({differ[0]}="
                                 f"{got.get(differ[0])!r}, the teacher {manifest['teacher']} has "
                                 f"{want.get(differ[0])!r})")
    except (OSError, ValueError) as err:  # read_model_config's one line
        raise SystemExit(f"eval_toy: {err}") from None


def main(argv: list[str] | None = None) -> dict:
    quiet_import_notices()  # torchao's and torch's import-time notices (adm_megatron/mcore_compat.py)
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--manifest", help="manifest.json from tools/run_toy_study.py")
    source.add_argument("--generator", help="one distilled generator directory (before / after, make demo)")
    parser.add_argument("--steps", type=int, default=None,
                        help="with --generator: its number of steps (default: its distillation.json's)")
    parser.add_argument("--teacher", default=os.path.join(ROOT, "assets", "toy_teacher"),
                        help="with --generator: the teacher (default: the checkout's assets/toy_teacher)")
    parser.add_argument("--guidance", type=float, default=None,
                        help="with --generator: the CFG scale distilled (default: the middle of its distillation.json's "
                             f"range, else {TOY_GUIDANCE})")
    parser.add_argument("--out", required=True, help="directory for toy_study.json and toy_samples.png")
    parser.add_argument("--per-class", type=int, default=256)
    parser.add_argument("--cache", default=None, help="directory to cache the teacher's samples in")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.manifest:
        try:
            with open(args.manifest) as f:
                manifest = json.load(f)
        except (OSError, ValueError) as err:
            raise SystemExit(f"eval_toy: --manifest {args.manifest}: {getattr(err, 'strerror', None) or err}") from None
    else:
        try:  # the generator's own step count and CFG (it was scored at 2 steps whatever it was distilled for)
            steps = generator_steps(args.generator, args.steps)
        except ValueError as err:
            raise SystemExit(f"eval_toy: {err}") from None
        guidance = teacher_guidance(args.generator, args.guidance, default=TOY_GUIDANCE)  # its distillation.json's
        manifest = single_generator_manifest(args.teacher, args.generator, steps, guidance)
    for path in [manifest["teacher"]] + [run["generator"] for run in manifest["runs"]]:
        if not os.path.isdir(path):
            raise SystemExit(f"eval_toy: {path}: no such model directory")
    _check_architectures(manifest)
    os.makedirs(args.out, exist_ok=True)
    results = evaluate(manifest, args.per_class, args.cache, os.path.join(args.out, "toy_samples.png"))
    with open(os.path.join(args.out, "toy_study.json"), "w") as f:
        json.dump(results, f, indent=1)
    print(markdown_table(results))
    if results["targets"]:
        print(targets_table(results))
    print(f"samples: {results['grid']}")
    return results


def _seconds(values: list[float]) -> str:
    return f"{statistics.fmean(values):.0f} s" if values else "n/a"


def settings_table(configs: dict[str, dict]) -> list[str]:
    """The training settings of the study's configs (one row each), as markdown lines."""
    if not configs:
        return []
    lines = ["### Training settings", "",
             "| config | method | iterations | batch | G:F updates | Δt | CFG | G lr | G lr schedule | G betas | "
             "fake-score lr | D lr | D width | DMD2 GAN / cls weights | exported generator |", "|" + "---|" * 15]
    for c in configs.values():
        ema = f"EMA {c['ema_decay']}" if c["ema_decay"] else "raw weights"
        gan = f"{c['gan_weight']} / {c['cls_weight']}" if c["method"] == "dmd2" else ""
        width = str(c["head_hidden"]) if c["method"] in ("adm", "dmd2", "adp") else ""
        fake_lr = f"{c['lr_fake_score']:g}" if c["method"] != "adp" else ""  # ADP has no fake score
        delta_t = str(c["delta_t"]) if c["method"] == "adm" else ""
        d_lr = f"{c['lr_discriminator']:g}" if width else ""
        lines.append(f"| `{c['config']}` | {c['method']} | {c['iterations']} | {c['batch_size']} | 1:{c['ttur']} | "
                     f"{delta_t} | {c['guidance_scale'][0]} | {c['lr_generator']:g} | "
                     f"{c['schedule_generator']} | {tuple(c['betas_generator'])} | "
                     f"{fake_lr} | "
                     f"{d_lr} | {width} | {gan} | {ema} |")
    return lines + ["", "Every config: AdamW (fake score and heads: betas (0, 0.99), constant lr), weight decay 0, gradient "
                        "clipping at norm 1, fp32, one process, one thread; Δt in training timesteps of T = 1000.", ""]


def render_report(results: dict, notes: str = "") -> str:
    """``docs/toy_study.md``: what was run, the table, the targets, the times, the commands."""
    s = results["settings"]
    study = results.get("study", {})
    teacher = results.get("teacher_training", {})
    runs = results["runs"]
    floor = results["noise_floor"]
    lines = [
        "# Toy distillation study: does the trainer distil, and what does each part of ADM do? (issues #4, #9)",
        "",
        "Generated by `tools/run_toy_study.py` (do not edit by hand: rerun it). "
        "Numbers are in `docs/toy_study.json`, samples in `docs/toy_samples.png`.",
        "",
        "## Results",
        "",
        f"{s['samples_per_set']} samples per set ({s['per_class']} per class). Distilled rows: mean ± "
        f"sample std over the training seeds {study.get('seeds', '')}; the generators are sampled "
        "without CFG on their own N-step schedule, the teacher with "
        f"CFG {s['guidance']} (the scale the distillation targets). FD: Fréchet distance in the "
        "fixed random-conv feature space (lower is better). Noise floor of FD at this sample size: "
        f"teacher-50 vs teacher-50 with other noise {floor['teacher50_vs_teacher50']:.3f}, true data "
        f"vs true data {floor['true_vs_true']:.3f}.",
        "",
        markdown_table(results),
        "",
        "### Controls (issue 9)",
        "",
        "Same budget, seeds and evaluation as ADM: (a) ADM with its discriminator heads frozen at their "
        "random start; (b) ADM without the generator's gradient path through the fake score's ODE step "
        "(x_fake from a stop-gradient fake output); (c) plain DMD (no discriminator). Faithful DMD2 is a "
        "main row above.",
        "",
        markdown_table(results, "control"),
        "",
        "### Settings sweep (2-step, first seed; the same search for ADM and DMD2)",
        "",
        markdown_table(results, "sweep"),
        "",
        "### The discriminator over training",
        "",
        "Paired accuracy: the share of (sample, head) pairs with D(real) > D(fake), 0.5 at chance; in "
        "brackets the paired margin mean[D(real) - D(fake)]. For ADM real and fake share x_t (teacher vs "
        "fake-score ODE step); for DMD2 they are noisy teacher ODE-pair samples vs noisy generator samples "
        "on the fake score's features; for ADP the pair's x_0 vs the generator's sample, both re-noised to t' "
        "(in the toy with the pair's own x_T) on the teacher's features. Means over each 100-iteration window of the run's metrics "
        "(every 10th iteration logged) and over seeds.",
        "",
        discriminator_table(results),
        "",
        "### Targets (mean over seeds)",
        "",
        targets_table(results),
        "",
        *settings_table(study.get("configs", {})),
        "![samples](toy_samples.png)",
        "",
        "`toy_samples.png`: one sample of each class (8 groups of 3 frames) per row; rows are the true "
        "data, the teacher at 50 / 4 / 2 / 1 steps and each distilled generator (first seed). A tile "
        "is one latent frame, the 4 channels mixed to RGB (channel 0 red, 1 green, 2 blue, 3 magenta).",
        "",
        "## Time",
        "",
    ]
    if teacher:
        lines.append(f"- teacher: {teacher.get('train_seconds')} s wall, "
                     f"{teacher.get('train_cpu_seconds', 'n/a')} s CPU ({teacher.get('parameters')} "
                     "parameters, one thread).")
    by_label: dict[str, list[dict]] = {}
    for run in runs:
        by_label.setdefault(run["label"], []).append(run)
    for label, entries in by_label.items():
        walls = [e["wall_seconds"] for e in entries if "wall_seconds" in e]
        cpus = [e["cpu_seconds"] for e in entries if "cpu_seconds" in e]
        lines.append(f"- {label}: {_seconds(walls)} wall, {_seconds(cpus)} CPU per run (mean of {len(entries)}).")
    if study:
        lines.append(f"- the whole study (`{study['command']}`): trainings {study['train_wall_seconds']:.0f} s, "
                     f"evaluation {results['eval_seconds']:.0f} s, total {study['total_wall_seconds']:.0f} s wall "
                     f"with {study['jobs']} trainings at a time on a 2-core machine (shared, so wall times vary; "
                     "CPU times are the figure to compare)"
                     + (f"; {study['runs_resumed']} finished runs were kept from earlier invocations (`--resume`), "
                        "so the trainings figure is that of the last invocation that trained any; the per-run "
                        "times above cover every run." if study.get("runs_resumed") else "."))
    for added in results.get("added_studies", []):
        lines.append(f"- rows added later ({', '.join(added['rows'])}; `{added['command']}`): trainings "
                     f"{added['train_wall_seconds']:.0f} s, evaluation {added['eval_seconds']:.0f} s wall, "
                     f"{added['jobs']} trainings at a time; their samples: `{added['grid']}`.")
    lines += ["", "## Commands", "", "```bash"]
    if teacher:
        lines.append(f"# the teacher (committed in assets/toy_teacher/)\n{teacher.get('command')}")
    if study:
        lines.append("# the whole study: every training below, then the evaluation and this page\n"
                     "python tools/run_toy_study.py --out docs/")
    for added in results.get("added_studies", []):
        lines.append(f"# rows added later, merged into this page\npython {added['command'].removeprefix('python ')}")
    lines.append("# each training (run by the study; adm-megatron is `python -m adm_megatron.cli`)")
    lines += [run["command"] for run in runs if "command" in run]
    lines += ["# the evaluation alone, from the study's manifest",
              "OMP_NUM_THREADS=1 python tools/eval_toy.py --manifest outputs/toy_study/manifest.json --out docs/",
              "```", ""]
    if notes:
        lines += [notes.strip(), ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
