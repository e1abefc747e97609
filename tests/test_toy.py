"""The toy distillation study's pieces (docs/toy_study.md): the synthetic data distribution, the
feature space and Fréchet distance, the classifier, the committed teacher
-- and one slow end-to-end check that ADM few-step beats the teacher's own few-step sampling."""

from __future__ import annotations

import json
import os
import sys

import pytest
import torch

from adm_megatron.toy import data as toy_data
from adm_megatron.toy.data import NUM_CLASSES, PATTERNS, balanced_labels, sample_dataset, sample_latents
from adm_megatron.toy.metrics import FeatureMap, diversity, frechet_distance, per_class_frechet

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TEACHER = os.path.join(ROOT, "assets", "toy_teacher")


@pytest.fixture(scope="module")
def features():
    return FeatureMap()


def test_data_is_deterministic_and_shaped():
    a, la = sample_dataset(16, seed=3)
    b, lb = sample_dataset(16, seed=3)
    c, _ = sample_dataset(16, seed=4)
    assert a.shape == (16 * NUM_CLASSES, *toy_data.LATENT_SHAPE) and a.dtype == torch.float32
    assert torch.equal(a, b) and torch.equal(la, lb) and not torch.equal(a, c)
    assert torch.equal(la, torch.arange(NUM_CLASSES).repeat_interleave(16))
    # one sample does not depend on what else is in the batch only through the generator's state
    g1, g2 = torch.Generator().manual_seed(0), torch.Generator().manual_seed(0)
    assert torch.equal(sample_latents(torch.tensor([2, 5]), g1), sample_latents(torch.tensor([2, 5]), g2))


def test_each_class_has_its_colour_position_and_motion():
    x, labels = sample_dataset(256, seed=0)
    for k, pattern in enumerate(PATTERNS):
        mean = x[labels == k].double().mean(0)  # [F, C, H, W]
        # colour: the channel mix of the class mean is the class colour
        mix = mean.sum(dim=(0, 2, 3))
        colour = torch.tensor(pattern.colour, dtype=torch.float64)
        assert torch.nn.functional.cosine_similarity(mix, colour, dim=0) > 0.99, k
        # position and motion: the intensity-weighted centre moves by the class velocity
        intensity = torch.einsum("fchw,c->fhw", mean, colour / colour.norm()).clamp_min(0)
        yy = torch.arange(8.0, dtype=torch.float64).view(8, 1)
        xx = torch.arange(8.0, dtype=torch.float64).view(1, 8)
        weight = intensity / intensity.sum(dim=(1, 2), keepdim=True)
        centre = torch.stack([(weight * yy).sum((1, 2)), (weight * xx).sum((1, 2))], dim=1)  # [F, 2]
        # frames 0 -> 1 (the border at frame 2 biases a centroid): about one pixel along the
        # class velocity, nothing across it; the start is the class start (stripes: its normal)
        step = centre[1] - centre[0]
        velocity = torch.tensor(pattern.velocity, dtype=torch.float64)
        along = float(step @ velocity)
        across = float((step - along * velocity).abs().max())
        assert 0.6 < along < 1.2 and across < 0.1, (k, step)
        axes = [0, 1] if pattern.shape == "blob" else [1 if pattern.shape == "vstripe" else 0]
        for axis in axes:
            assert abs(centre[0, axis] - pattern.start[axis]) < 0.3, (k, centre[0])
    # the classes differ: within-class spread is far smaller than the spread of class means
    assert diversity(x, labels) > 1.0


def test_frechet_distance_is_zero_for_identical_sets_and_grows_with_a_shift(features):
    x, labels = sample_dataset(64, seed=1)
    f = features(x)
    assert frechet_distance(f, f) < 1e-6
    assert per_class_frechet(f, labels, f, labels) < 1e-6
    shifted = f + 0.5
    assert frechet_distance(f, shifted) == pytest.approx(0.25 * f.shape[1], rel=1e-4)
    other, _ = sample_dataset(64, seed=2)
    same_distribution = frechet_distance(f, features(other))
    class_means = torch.stack([x[labels == k].mean(0) for k in range(NUM_CLASSES)])[labels]
    collapsed = frechet_distance(f, features(class_means))
    assert same_distribution < 0.5 < 3 * same_distribution < collapsed


def test_feature_map_is_fixed_and_standardised(features):
    again = FeatureMap()
    x, _ = sample_dataset(8, seed=5)
    assert torch.equal(features(x), again(x))
    f = features(sample_dataset(256, seed=6)[0])
    assert f.shape[1] == 64 and f.mean(0).abs().max() < 0.2 and (f.std(0) - 1).abs().max() < 0.2


def test_classifier_separates_the_true_classes():
    from adm_megatron.toy.metrics import accuracy, train_classifier

    model = train_classifier(steps=100, batch=128)
    x, labels = sample_dataset(64, seed=11)
    assert accuracy(model, x, labels) >= 0.98
    # a wrong label set scores at chance level or below
    assert accuracy(model, x, (labels + 1) % NUM_CLASSES) < 0.2


def test_committed_teacher_is_a_small_complete_pipeline():
    from adm_megatron.toy.pipeline import TOY_TRANSFORMER, load_prompts
    from adm_megatron.train.teacher import resolve_teacher

    size = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(TEACHER) for f in fs)
    assert size <= 5 * 2**20
    source = resolve_teacher(TEACHER)
    assert source.arch.num_layers == TOY_TRANSFORMER["num_layers"] and source.arch.in_channels == 4
    assert source.schedule().num_train_timesteps == 1000
    embeddings, negative = load_prompts(TEACHER)
    assert embeddings.shape == (NUM_CLASSES, TOY_TRANSFORMER["max_text_seq_length"],
                                TOY_TRANSFORMER["text_embed_dim"])
    assert torch.count_nonzero(negative) == 0
    with open(os.path.join(TEACHER, "training.json")) as f:
        info = json.load(f)
    assert "train_toy_teacher.py" in info["command"] and info["train_seconds"] > 0


def test_teacher_sampling_is_seeded_and_class_conditional():
    from adm_megatron.toy import pipeline as toy_pipeline
    from adm_megatron.toy.sampling import sample

    model = toy_pipeline.load_transformer(TEACHER)
    embeddings, negative = toy_pipeline.load_prompts(TEACHER)
    labels = balanced_labels(2)
    kwargs = dict(negative=negative, guidance=1.5)
    a = sample(model, toy_pipeline.schedule(), labels, embeddings, 2, seed=0, **kwargs)
    b = sample(model, toy_pipeline.schedule(), labels, embeddings, 2, seed=0, **kwargs)
    assert torch.equal(a, b) and a.shape == (len(labels), *toy_data.LATENT_SHAPE)
    # each sample's channel mix points to its class colour
    colours = torch.tensor([p.colour for p in PATTERNS], dtype=torch.float32)
    mix = a.sum(dim=(1, 3, 4))
    assert (torch.nn.functional.normalize(mix, dim=1) @ colours.T).argmax(1).eq(labels).float().mean() >= 0.9


sys.path.insert(0, os.path.join(ROOT, "tools"))


def _eval_toy():
    import eval_toy

    return eval_toy


def test_eval_toy_before_after_measures_both_and_draws_every_row(tmp_path):
    """``make demo``'s evaluation: with the teacher's transformer itself as the 'distilled' generator,
    before and after are the same model, so every figure agrees; the table, JSON and grid are written
    (a whole pipeline is refused as a generator: give its transformer)."""
    from PIL import Image

    eval_toy = _eval_toy()
    results = eval_toy.main(["--generator", os.path.join(TEACHER, "transformer"), "--steps", "2", "--per-class", "2",
                             "--out", str(tmp_path)])
    before, after = (r for r in results["rows"] if r["kind"] == "distilled")
    assert before["name"].startswith("before") and after["name"].startswith("after")
    for key in eval_toy.METRICS:
        assert before[key] == pytest.approx(after[key], rel=1e-6), key
    teacher = {r["steps"]: r for r in results["rows"] if r["kind"] == "teacher"}
    assert teacher[1]["fd_teacher"] > teacher[50]["fd_teacher"]  # 1 step is far from 50 steps
    assert results["targets"] == []  # no study targets for a single run
    with open(tmp_path / "toy_study.json") as f:
        assert json.load(f)["rows"] == json.loads(json.dumps(results["rows"]))
    grid = Image.open(tmp_path / "toy_samples.png")
    # rows: true data, teacher 50/4/2/1, before, after; one 3-frame group per class
    assert grid.height == 7 * (8 * 8 + 4) + 4
    assert grid.width > NUM_CLASSES * 3 * 8 * 8


def test_eval_toy_refuses_a_missing_generator(tmp_path):
    with pytest.raises(SystemExit, match=r"^eval_toy: --generator \S*nowhere: not found"):
        _eval_toy().main(["--generator", str(tmp_path / "nowhere"), "--out", str(tmp_path)])


def test_eval_toy_scores_a_generator_at_its_own_steps_and_cfg(tmp_path, monkeypatch):
    """A 1-step generator (ADP's stage) was scored at the default 2 steps, silently 20x worse; a run's
    directory given for its generator was a diffusers traceback."""
    import shutil

    eval_toy = _eval_toy()
    generator = tmp_path / "run" / "generator"
    shutil.copytree(os.path.join(TEACHER, "transformer"), generator)  # a transformer, as an export writes
    (generator / "distillation.json").write_text(json.dumps({"generator_steps": 1,
                                                             "teacher_guidance_scale": [1.0, 2.0]}))
    seen = []
    monkeypatch.setattr(eval_toy, "evaluate", lambda manifest, *a: seen.append(manifest) or (_ for _ in ()).throw(
        KeyboardInterrupt))
    with pytest.raises(KeyboardInterrupt):
        eval_toy.main(["--generator", str(generator), "--out", str(tmp_path / "e")])
    assert [run["steps"] for run in seen[0]["runs"]] == [1, 1] and seen[0]["guidance"] == 1.5
    with pytest.raises(KeyboardInterrupt):  # what is given still wins
        eval_toy.main(["--generator", str(generator), "--steps", "2", "--guidance", "3", "--out", str(tmp_path / "e")])
    assert [run["steps"] for run in seen[1]["runs"]] == [2, 2] and seen[1]["guidance"] == 3.0
    with pytest.raises(SystemExit, match=r"a run directory: its exported generator is \S*run/generator"):
        eval_toy.main(["--generator", str(tmp_path / "run"), "--out", str(tmp_path / "e")])


def test_study_targets_compare_the_seed_means_with_the_teacher():
    check = _eval_toy().check_targets
    teacher = {2: {"fd_teacher": 2.0}, 4: {"fd_teacher": 0.5}}
    names = {"adm_2": "ADM 2-step", "adm_4": "ADM 4-step", "two_stage_1": "two-stage"}
    rows = {"ADM 2-step": {"fd_teacher": 0.9, "accuracy": 0.95},
            "ADM 4-step": {"fd_teacher": 0.6, "accuracy": 0.85}}
    got = {(t["row"], "accuracy" in t["target"]): t for t in check(rows, teacher, names)}
    assert got["ADM 2-step", False]["passed"] and got["ADM 2-step", True]["passed"]
    assert not got["ADM 4-step", False]["passed"] and not got["ADM 4-step", True]["passed"]
    assert got["two-stage", False]["value"] is None and not got["two-stage", False]["passed"]
    assert check(rows, {2: teacher[2]}, names) == []  # no 4-step teacher row: nothing to compare


def test_study_settings_table_states_each_configs_generator_schedule():
    import run_toy_study

    configs = run_toy_study.config_settings(iterations=300)
    assert {c["iterations"] for c in configs.values()} == {300}
    assert configs["adm"]["schedule_generator"] == "cosine to 0"  # examples/cogvideox/toy_adm.yaml
    rows = [line for line in _eval_toy().settings_table(configs) if line.startswith("| `")]
    assert len(rows) == len(configs) and all("| cosine to 0 |" in row for row in rows)
    cells = {row.split("|")[1].strip(" `"): [c.strip() for c in row.split("|")[11:14]] for row in rows}
    adp = configs["adp"]  # ADP: no fake score; its heads' lr and width
    assert cells[adp["config"]] == ["", f"{adp['lr_discriminator']:g}", str(adp["head_hidden"])]
    adm = configs["adm"]
    assert cells[adm["config"]] == [f"{adm['lr_fake_score']:g}", f"{adm['lr_discriminator']:g}", str(adm["head_hidden"])]


def test_trajectory_measures_the_trainers_generator_like_the_exported_one(tmp_path, world_of_one):
    """tools/toy_trajectory.py: at iteration 0 the trainer's megatron generator is the teacher, so its
    figures equal eval_toy's for the teacher's diffusers weights as the same N-step generator; the
    raw weights then move while the EMA (decay 0.99) lags behind them."""
    import toy_trajectory

    eval_toy = _eval_toy()
    rows = toy_trajectory.main(["--config", os.path.join(ROOT, "examples/cogvideox/toy_adm.yaml"),
                                "--every", "3", "--per-class", "2", "--out", str(tmp_path / "run"),
                                "distill.generator_steps=2", "train.max_iterations=3"])
    teacher2, teacher50, first, last = rows
    assert (teacher2["teacher_steps"], teacher50["teacher_steps"]) == (2, 50)
    assert (first["iteration"], last["iteration"]) == (0, 3)
    before = eval_toy.Evaluator(TEACHER, 2, 1.5).generator_samples(TEACHER, 2)
    reference = eval_toy.Evaluator(TEACHER, 2, 1.5).measure(before)
    for key in eval_toy.METRICS:
        assert first[key] == pytest.approx(reference[key], rel=1e-4, abs=1e-5), key
        assert first["ema"][key] == first[key]
    assert last["fd_teacher"] != first["fd_teacher"]
    assert abs(last["ema"]["fd_teacher"] - first["fd_teacher"]) < abs(last["fd_teacher"] - first["fd_teacher"])
    with open(tmp_path / "run" / "trajectory.jsonl") as f:
        assert [json.loads(line) for line in f] == json.loads(json.dumps(rows))


@pytest.mark.slow
def test_reduced_study_adm_two_step_beats_the_teacher_two_step(tmp_path):
    """One seed, fewer iterations and samples: ADM 2-step is clearly closer to the teacher's
    50-step samples than the teacher's own 2-step sampling."""
    import run_toy_study

    results = run_toy_study.main([
        "--out", str(tmp_path / "docs"), "--work", str(tmp_path / "work"), "--seeds", "0",
        "--steps", "2", "--per-class", "64", "--jobs", "1", "--methods", "adm", "--no-sweep",
    ])
    rows = {r["name"]: r for r in results["rows"]}
    adm, teacher = rows["ADM 2-step"], rows["teacher 2-step"]
    assert adm["fd_teacher"] < 0.7 * teacher["fd_teacher"], (adm["fd_teacher"], teacher["fd_teacher"])
    assert adm["accuracy"] >= 0.9


def test_the_studys_paths_are_taken_from_where_it_is_run(tmp_path, monkeypatch):
    """run_toy_study works in the checkout (its configs' paths) and changed into it before reading
    --out / --work: run from elsewhere, `--out mystudy` wrote mystudy/ and outputs/toy_study/ into the
    checkout. Paths given are the caller's; the default teacher is the checkout's."""
    import run_toy_study

    class Planned(Exception):
        pass

    def collect_pairs(work, teacher):
        raise Planned(work, teacher)

    monkeypatch.setattr(run_toy_study, "collect_pairs", collect_pairs)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(Planned) as planned:
        run_toy_study.main(["--out", "mystudy", "--work", "mywork"])
    assert planned.value.args == (str(tmp_path / "mywork"), os.path.join(ROOT, "assets", "toy_teacher"))
    assert os.path.isdir(tmp_path / "mywork") and not os.path.exists(os.path.join(ROOT, "mywork"))


def test_eval_toy_refuses_a_generator_of_another_architecture_and_a_missing_manifest(cogvideox_pipeline, tmp_path,
                                                                                     capsys):
    """A generator that is not of the toy teacher's architecture (a tiny CogVideoX run's) failed in its
    first forward with a shape mismatch, after making --out; a missing --manifest was a traceback;
    toy_trajectory's config error a traceback too."""
    import eval_toy
    import toy_trajectory

    generator = os.path.join(cogvideox_pipeline, "transformer")
    with pytest.raises(SystemExit) as stop:
        eval_toy.main(["--generator", generator, "--steps", "2", "--out", str(tmp_path / "ev")])
    assert str(stop.value).startswith(f"eval_toy: {generator}: not of the teacher's architecture (")
    assert f"the teacher {os.path.join(ROOT, 'assets', 'toy_teacher')} has " in str(stop.value)
    assert not (tmp_path / "ev").exists()
    with pytest.raises(SystemExit) as stop:
        eval_toy.main(["--manifest", str(tmp_path / "none.json"), "--out", str(tmp_path / "ev")])
    assert str(stop.value) == f"eval_toy: --manifest {tmp_path / 'none.json'}: No such file or directory"
    with pytest.raises(SystemExit) as stop:
        toy_trajectory.main(["--config", str(tmp_path / "none.yaml"), "--out", str(tmp_path / "tr")])
    assert stop.value.code == 2
    assert capsys.readouterr().err.strip() == f"toy_trajectory: {tmp_path / 'none.yaml'}: config file not found"


def test_study_plans_the_adp_two_stage_chain_alone():
    """``--methods adp_two_stage``: per seed, ADP stage 1 (toy_adp.yaml) then ADM 1-step from its generator."""
    import run_toy_study

    runs = run_toy_study.plan_runs("W", [0, 1], [1, 2, 4], None, methods=["adp_two_stage"])
    assert [r["name"] for r in runs] == ["adp-two-stage-1-seed0", "adp-two-stage-2-seed0",
                                         "adp-two-stage-1-seed1", "adp-two-stage-2-seed1"]
    stage1, stage2 = runs[:2]
    assert stage1["config"] == "examples/cogvideox/toy_adp.yaml" and stage1["steps"] == 1
    assert stage2["config"] == "examples/cogvideox/toy_two_stage_2.yaml" and stage2["after"] == stage1["name"]
    assert "model.generator_init=W/adp-two-stage-1-seed0/generator" in stage2["overrides"]
    assert stage2["label"] == run_toy_study.ADP_TWO_STAGE_LABEL
    every = {r["name"] for r in run_toy_study.plan_runs("W", [0], [1], None)}  # the full study has both chains
    assert {"two-stage-2-seed0", "adp-two-stage-2-seed0"} <= every


def test_study_merge_adds_rows_and_checks_the_targets_again():
    import run_toy_study

    label = run_toy_study.ADP_TWO_STAGE_LABEL
    with open(os.path.join(ROOT, "docs", "toy_study.json")) as f:
        committed = json.load(f)
    committed["rows"] = [r for r in committed["rows"] if r["name"] != label]  # as before the ADP rows
    committed["runs"] = [r for r in committed["runs"] if r["name"] != "adp-two-stage-2-seed0"]
    t2 = next(r for r in committed["rows"] if r["name"] == "teacher 2-step")["fd_teacher"]
    row = {**{k: 1.0 for k in _eval_toy().METRICS}, "name": label, "kind": "distilled", "steps": 1,
           "method": "adp+adm", "group": "main", "fd_teacher": 0.4 * t2, "accuracy": 0.99}
    new = {"settings": dict(committed["settings"]), "rows": [committed["rows"][0], row],
           "runs": [{"name": "adp-two-stage-2-seed0", "label": label}], "eval_seconds": 1.0,
           "study": {"command": "python tools/run_toy_study.py --methods adp_two_stage", "train_wall_seconds": 2.0, "jobs": 1,
                     "configs": {"adp": run_toy_study.config_settings(None)["adp"]}}}
    merged = run_toy_study.merge_results(committed, new)
    assert [r["name"] for r in merged["rows"]] == [r["name"] for r in committed["rows"]] + [label]
    assert len(merged["runs"]) == len(committed["runs"]) + 1
    adp = [t for t in merged["targets"] if t["row"] == label]
    assert len(adp) == 2 and all(t["passed"] for t in adp)
    assert merged["study"]["configs"]["adp"]["config"] == "examples/cogvideox/toy_adp.yaml"
    again = run_toy_study.merge_results(merged, {**new, "rows": [{**row, "fd_teacher": 2 * t2}]})
    assert [r["name"] for r in again["rows"]] == [r["name"] for r in merged["rows"]]  # replaced, not added
    assert not next(t for t in again["targets"] if t["row"] == label and "accuracy" not in t["target"])["passed"]
    # a rerun of the same rows with a changed config: its settings replace the committed ones (only for
    # a config the new runs trained with) and the superseded added study is dropped
    changed = {"adp": {**new["study"]["configs"]["adp"], "lr_discriminator": 0.5},
               "adm": {**run_toy_study.config_settings(None)["adm"], "lr_discriminator": 0.5}}
    rerun = {**new, "runs": [{"name": "adp-two-stage-1-seed0", "label": label,
                              "command": "adm-megatron train --config examples/cogvideox/toy_adp.yaml seed=0"}],
             "study": {**new["study"], "configs": changed}}
    third = run_toy_study.merge_results(again, rerun)
    assert third["study"]["configs"]["adp"]["lr_discriminator"] == 0.5
    assert third["study"]["configs"]["adm"]["lr_discriminator"] != 0.5  # toy_adm.yaml not retrained: kept
    assert [a["rows"] for a in third["added_studies"]].count([label]) == 1
    assert len(third["added_studies"]) == len(merged["added_studies"])
    assert third["added_studies"][-1]["grid"] == f"toy_samples_added{len(third['added_studies'])}.png"
    with pytest.raises(ValueError, match="settings.per_class differs"):
        run_toy_study.merge_results(committed, {**new, "settings": {**new["settings"], "per_class": 8}})
    assert "rows added later" in _eval_toy().render_report(merged)
