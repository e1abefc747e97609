"""``adm-megatron export`` writes a training checkpoint's generator as the finished run exports it:
its EMA (bit for bit the run's own ``generator/`` export at that iteration), or its raw weights,
with a ``distillation.json`` that ``adm-megatron sample`` reads; bad input is one line, before any
weight is read, and no earlier output is replaced unasked."""

from __future__ import annotations

import os
import shutil

import pytest
import torch
from safetensors.torch import load_file

from adm_megatron.config import load_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WEIGHTS = "diffusion_pytorch_model.safetensors"


def _weights(directory) -> dict[str, torch.Tensor]:
    return load_file(os.path.join(directory, WEIGHTS))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """2-iteration tiny runs (their end exports and last checkpoints are of the same iteration): with
    an EMA, without, and a LoRA generator with an EMA of its adapters exported merged and as a file."""
    from adm_megatron.data.tiny_pipeline import build_tiny_pipeline
    from adm_megatron.parallel import destroy_parallel, initialize_parallel
    from adm_megatron.train.trainer import Trainer

    root = tmp_path_factory.mktemp("export")
    pipeline = build_tiny_pipeline(str(root / "pipe"), seed=0)
    out = {}
    lora = ["model.lora.rank=2", "model.lora.target_modules=[to_out.0]", "train.export_lora=both"]
    for name, decay, extra in (("ema", 0.5, []), ("plain", 0.0, []), ("lora", 0.5, lora)):
        destroy_parallel()
        initialize_parallel(tensor_parallel=1, context_parallel=1, seed=1234)
        config = load_config(os.path.join(ROOT, "examples/cogvideox/tiny_cpu.yaml"), [
            f"model.teacher={pipeline}", f"output_dir={root / name}", "data.source=synthetic", "data.num_prompts=4",
            "data.batch_size=1", "train.max_iterations=2", f"train.ema_decay={decay}", "train.num_samples=0",
            "logging.progress=false", "logging.wandb_mode=disabled", *extra])
        Trainer(config).fit()
        destroy_parallel()
        out[name] = root / name
    return pipeline, out


def test_export_writes_the_runs_own_ema_export_or_the_raw_weights(runs, tmp_path, capsys):
    from adm_megatron.cli import main
    from adm_megatron.convert.distillation_record import read_distillation_record

    _, out = runs
    run = out["ema"]
    assert main(["export", "--checkpoint", str(run), "--out", str(tmp_path / "ema")]) == 0  # the run's latest
    assert "generator of iteration 2 (ema weights, 4 steps)" in capsys.readouterr().out
    reference, exported = _weights(run / "generator"), _weights(tmp_path / "ema")
    assert reference.keys() == exported.keys()
    assert all(torch.equal(reference[k], exported[k]) for k in reference)  # the finished run's export, exactly
    record = read_distillation_record(str(tmp_path / "ema"))
    assert {k: v for k, v in record.items() if k != "checkpoint"} == read_distillation_record(str(run / "generator"))
    assert record["checkpoint"] == str(run / "checkpoints" / "iter_0000002") and record["weights"] == "ema"
    marker = run / "checkpoints" / "latest"  # the marker itself names the same checkpoint (it was refused)
    assert main(["export", "--checkpoint", str(marker), "--out", str(tmp_path / "by_marker")]) == 0
    assert read_distillation_record(str(tmp_path / "by_marker"))["checkpoint"] == record["checkpoint"]

    assert main(["export", "--checkpoint", str(run / "checkpoints" / "iter_0000002"), "--weights", "raw",
                 "--out", str(tmp_path / "raw")]) == 0
    raw = _weights(tmp_path / "raw")
    assert any(not torch.equal(raw[k], reference[k]) for k in reference)  # the EMA differs from the raw weights
    assert read_distillation_record(str(tmp_path / "raw"))["weights"] == "raw"
    from adm_megatron.convert.checkpoint import megatron_to_hf_checkpoint

    converted = megatron_to_hf_checkpoint(str(run / "checkpoints" / "iter_0000002" / "generator"), str(tmp_path / "conv"))
    assert all(torch.equal(raw[k], t) for k, t in _weights(converted).items())  # raw: the converter's weights


def test_export_of_a_lora_run_writes_its_merged_ema_and_its_lora_file(runs, tmp_path):
    from adm_megatron.cli import main
    from adm_megatron.lora.export import LORA_WEIGHTS

    _, out = runs
    run = out["lora"]
    assert main(["export", "--checkpoint", str(run), "--out", str(tmp_path / "generator")]) == 0
    for name, weights in (("generator", WEIGHTS), ("generator_lora", LORA_WEIGHTS)):
        reference, exported = load_file(str(run / name / weights)), load_file(str(tmp_path / name / weights))
        assert reference.keys() == exported.keys()
        assert all(torch.equal(reference[k], exported[k]) for k in reference), name
    base = load_file(str(tmp_path / "generator" / WEIGHTS))
    raw_dir = tmp_path / "raw"
    assert main(["export", "--checkpoint", str(run), "--weights", "raw", "--out", str(raw_dir / "generator")]) == 0
    raw = load_file(str(raw_dir / "generator" / WEIGHTS))
    assert any(not torch.equal(raw[k], base[k]) for k in base)  # the adapters' EMA differs from their raw values


def test_export_of_a_lora_run_writes_what_lora_asks_and_replaces_no_lora_dir_unasked(runs, tmp_path, capsys):
    from adm_megatron.cli import main
    from adm_megatron.convert.checkpoint import CheckpointError, check_output_dir
    from adm_megatron.lora.export import LORA_WEIGHTS

    _, out = runs
    run = out["lora"]
    assert main(["export", "--checkpoint", str(run), "--lora", "adapter", "--out", str(tmp_path / "a")]) == 0
    assert capsys.readouterr().out.strip().endswith(f": {tmp_path / 'a_lora'}")  # the directory it wrote
    assert not (tmp_path / "a").exists() and sorted(os.listdir(tmp_path / "a_lora"))[-1] == LORA_WEIGHTS
    taken = tmp_path / "b_lora"  # the LoRA side of --out b holds an earlier export
    taken.mkdir()
    (taken / "x").write_text("earlier")
    assert main(["export", "--checkpoint", str(run), "--out", str(tmp_path / "b")]) == 2
    assert capsys.readouterr().err.strip() == (f"adm-megatron export: output directory {taken} exists and is not "
                                               "empty (pass --overwrite to replace it)")  # not overwrite=True
    with pytest.raises(CheckpointError, match=r"not empty \(pass overwrite=True to replace it\)$"):  # the Python API's
        check_output_dir(str(taken))
    assert (taken / "x").read_text() == "earlier" and not (tmp_path / "b").exists()
    assert main(["export", "--checkpoint", str(out["plain"]), "--lora", "both", "--out", str(tmp_path / "c")]) == 2
    assert "--lora both: " in capsys.readouterr().err and not (tmp_path / "c").exists()


def test_export_never_writes_over_the_checkpoint_it_reads(runs, tmp_path, capsys):
    import shutil

    from adm_megatron.cli import main

    _, out = runs
    run = tmp_path / "run"
    shutil.copytree(out["plain"], run)
    before = sorted(p for p in os.listdir(run))
    for target in (run, run / "checkpoints" / "iter_0000002"):  # the run directory holds it; the checkpoint is it
        assert main(["export", "--checkpoint", str(run), "--out", str(target), "--overwrite"]) == 2
        assert capsys.readouterr().err.strip() == (
            f"adm-megatron: config error: --out {target}: holds a training run's checkpoints, which writing there "
            "would remove; choose another output")
    assert sorted(os.listdir(run)) == before and (run / "checkpoints" / "iter_0000002" / "trainer_state.json").exists()

    pipeline, _ = runs  # the run's teacher: its transformer/ replaced by the generator would be read as the teacher
    teacher = sorted(os.listdir(os.path.join(pipeline, "transformer")))
    target = os.path.join(pipeline, "transformer")
    assert main(["export", "--checkpoint", str(run), "--out", target, "--overwrite"]) == 2
    assert capsys.readouterr().err.strip() == (
        f"adm-megatron export: output {target} lies inside the input {pipeline}: writing it would change what it is "
        "written from; choose another output")
    for pipeline_out, out_dir in ((tmp_path / "e" / "pipe", tmp_path / "e"), (tmp_path / "p", tmp_path / "p" / "gen")):
        assert main(["export", "--checkpoint", str(run), "--out", str(out_dir), "--pipeline-out", str(pipeline_out)]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith(f"adm-megatron export: --pipeline-out {pipeline_out} and --out {out_dir}: one ") and \
            err.endswith("the other; give them directories apart")
    new_pipeline = os.path.join(pipeline, "copy")  # a copy of the pipeline inside itself
    assert main(["export", "--checkpoint", str(run), "--out", str(tmp_path / "g"), "--pipeline-out", new_pipeline]) == 2
    assert f"output {new_pipeline} lies inside the input {pipeline}" in capsys.readouterr().err
    assert sorted(os.listdir(target)) == teacher and not os.path.exists(new_pipeline)
    assert not any(os.path.exists(tmp_path / d) for d in ("e", "p", "g"))


def test_export_refuses_bad_input_in_one_line_before_reading_weights(runs, tmp_path, capsys, monkeypatch):
    import adm_megatron.train.checkpoint_export as export
    from adm_megatron.cli import main

    _, out = runs
    monkeypatch.setattr(export, "load_megatron_checkpoint", lambda *a, **k: pytest.fail("weights were read"))
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "x").write_text("earlier")
    cases = [
        (["--checkpoint", str(out["plain"]), "--weights", "ema", "--out", str(tmp_path / "a")],
         f"adm-megatron: config error: {out['plain'] / 'checkpoints' / 'iter_0000002'}: --weights ema: the run kept "
         "no EMA (train.ema_decay=0); use --weights raw"),
        (["--checkpoint", str(tmp_path), "--out", str(tmp_path / "b")],
         f"adm-megatron: config error: --checkpoint={str(tmp_path)!r}: neither a checkpoint (no trainer_state.json) "
         "nor a run directory with checkpoints/latest"),
        (["--checkpoint", str(out["ema"]), "--out", str(taken)],
         f"adm-megatron export: output directory {taken} exists and is not empty (pass --overwrite to replace it)"),
        (["--checkpoint", str(out["ema"]), "--out", str(out["ema"] / "checkpoints" / "iter_0000002" / "hf")],
         f"adm-megatron: config error: --out {out['ema'] / 'checkpoints' / 'iter_0000002' / 'hf'}: inside "
         f"{out['ema'] / 'checkpoints' / 'iter_0000002'}, whose run removes what is there (pruning old checkpoints, "
         "clearing leftovers at a restart); choose an output outside checkpoints/"),
        (["--checkpoint", str(out["ema"] / "checkpoints" / "iter_0000001"), "--out", str(tmp_path / "e")],  # pruned
         f"adm-megatron: config error: --checkpoint={str(out['ema'] / 'checkpoints' / 'iter_0000001')!r}: no such "
         f"checkpoint ({out['ema'] / 'checkpoints'} holds no iter_0000001: train.keep_checkpoints removes old ones; "
         f"the latest is now {out['ema'] / 'checkpoints' / 'iter_0000002'}, or give the run directory {out['ema']} "
         "for its latest)"),
        (["--checkpoint", str(out["ema"]), "--out", str(out["plain"]), "--overwrite"],  # another run, maybe live
         f"adm-megatron: config error: --out {out['plain']}: holds a training run's checkpoints, which writing there "
         "would remove; choose another output"),
        # the run's own export (replaced at its end; a finished run's final one), or inside it
        (["--checkpoint", str(out["ema"] / "checkpoints" / "iter_0000002"), "--out", str(out["ema"] / "generator"),
          "--overwrite"],
         f"adm-megatron: config error: --out {out['ema'] / 'generator'}: the run {out['ema']} writes its own "
         "generator/ there (its export or samples, replaced at its end); choose an output outside the run's"),
        (["--checkpoint", str(out["ema"]), "--out", str(out["ema"] / "generator_lora" / "mine")],
         f"adm-megatron: config error: --out {out['ema'] / 'generator_lora' / 'mine'}: the run {out['ema']} writes "
         "its own generator_lora/ there (its export or samples, replaced at its end); choose an output outside the "
         "run's"),
        (["--checkpoint", str(out["ema"]), "--out", str(tmp_path / "d"), "--pipeline-out",
          str(out["ema"] / "checkpoints" / "pipe")],
         f"adm-megatron: config error: --pipeline-out {out['ema'] / 'checkpoints' / 'pipe'}: inside "
         f"{out['ema'] / 'checkpoints'}, whose run removes what is there (pruning old checkpoints, "
         "clearing leftovers at a restart); choose an output outside checkpoints/"),
    ]
    for args, message in cases:
        capsys.readouterr()
        assert main(["export", *args]) == 2
        assert capsys.readouterr().err.strip() == message
    assert (taken / "x").read_text() == "earlier"
    from adm_megatron.sampling import check_out_dir  # sample's --out the same

    with pytest.raises(ValueError, match=r"^--out .*/checkpoints/samples: inside .*/checkpoints, whose run removes"):
        check_out_dir(str(out["ema"] / "checkpoints" / "samples"), False, False, {})
    with pytest.raises(ValueError, match=r"^--out .*/ema/samples: the run .*/ema writes its own samples/ there"):
        check_out_dir(str(out["ema"] / "samples"), False, False, {})  # where the run renders its own
    assert (out["ema"] / "generator" / "config.json").exists()  # the run's export is untouched

    import shutil  # a checkpoint whose weight shard was cut after it was written

    damaged = tmp_path / "damaged"
    shutil.copytree(out["ema"], damaged)
    ckpt = damaged / "checkpoints" / "iter_0000002"
    shard = ckpt / "generator" / "__0_0.distcp"
    os.truncate(shard, 100)
    capsys.readouterr()
    assert main(["export", "--checkpoint", str(damaged), "--out", str(tmp_path / "c")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"adm-megatron: config error: {ckpt}: damaged checkpoint, nothing was loaded "
                          f"({shard.parent}: shard file {shard.name} is truncated (100 bytes, needs ") and "\n" not in err
    assert err.endswith("); no earlier whole checkpoint is left beside it")


def test_pipeline_out_is_a_whole_pipeline_that_diffusers_samples_as_sample_does(runs, tmp_path, capsys):
    """``export --pipeline-out DIR`` writes the run's pipeline with the generator as its transformer: in a
    fresh process, ``DiffusionPipeline.from_pretrained(DIR)`` with the card's call renders what
    ``adm-megatron sample`` renders from the generator directory, pixel for pixel; the teacher's files
    are not touched; a pipeline that ships another scheduler gets the one the generator samples with;
    the pipeline itself, or a LoRA export without the merged generator, is refused in one line."""
    import hashlib
    import json
    import shutil

    import imageio.v3 as iio
    import numpy as np

    from adm_megatron.cli import main
    from adm_megatron.convert.distillation_record import read_distillation_record
    from adm_megatron.convert.pipeline_export import write_pipeline
    from model_card_run import render_card

    pipeline, out = runs
    digest = {name: hashlib.sha256(open(os.path.join(pipeline, name), "rb").read()).hexdigest()
              for name in ("model_index.json", "scheduler/scheduler_config.json", "transformer/" + WEIGHTS)}
    generator, whole = tmp_path / "generator", tmp_path / "whole"
    assert main(["export", "--checkpoint", str(out["ema"]), "--out", str(generator), "--pipeline-out",
                 str(whole)]) == 0
    assert str(whole) in capsys.readouterr().out
    exported = _weights(generator)
    assert all(torch.equal(exported[k], v) for k, v in _weights(whole / "transformer").items())
    assert sorted(os.listdir(whole)) == sorted([*os.listdir(pipeline), "README.md"])
    assert main(["sample", "--pipeline", pipeline, "--generator", str(generator), "--prompt", "a red cat", "--seed",
                 "3", "--format", "png", "--teacher-steps", "0", "--out", str(tmp_path / "sampled")]) == 0
    sampled = iio.imread(tmp_path / "sampled" / "generator" / "sample-000.png").astype(int)
    assert np.array_equal(render_card(str(whole), "a red cat", 3, tmp_path), sampled)
    assert digest == {name: hashlib.sha256(open(os.path.join(pipeline, name), "rb").read()).hexdigest()
                      for name in digest}

    dpm = tmp_path / "dpm"  # CogVideoX-5b's pipeline ships the stochastic DPM scheduler
    shutil.copytree(pipeline, dpm)
    for name in ("model_index.json", "scheduler/scheduler_config.json"):
        path = dpm / name
        path.write_text(path.read_text().replace("CogVideoXDDIMScheduler", "CogVideoXDPMScheduler"))
    write_pipeline(str(generator), read_distillation_record(str(generator)), str(dpm), str(tmp_path / "from_dpm"))
    assert json.loads((tmp_path / "from_dpm" / "scheduler" / "scheduler_config.json").read_text())["_class_name"] \
        == json.loads((tmp_path / "from_dpm" / "model_index.json").read_text())["scheduler"][1] \
        == "CogVideoXDDIMScheduler"
    assert "CogVideoXDPMScheduler" in (dpm / "scheduler" / "scheduler_config.json").read_text()

    for args, message in (
        (["--checkpoint", str(out["ema"]), "--out", str(tmp_path / "g2"), "--pipeline-out", pipeline, "--overwrite"],
         f"output {pipeline} is the input {pipeline}"),
        (["--checkpoint", str(out["lora"]), "--out", str(tmp_path / "g3"), "--lora", "adapter", "--pipeline-out",
          str(tmp_path / "p3")], "--pipeline-out: the pipeline's transformer is the merged generator"),
    ):
        assert main(["export", *args]) == 2
        assert message in capsys.readouterr().err
        assert not os.path.exists(tmp_path / "g2") and not os.path.exists(tmp_path / "g3")


def _live_run(runs, tmp_path):
    """A copy of the EMA run with a second, newer checkpoint (iter_0000003, a copy) that ``latest``
    names, as a live run with train.keep_checkpoints=1 has just before it prunes iter_0000002."""
    import shutil

    from adm_megatron.train.checkpoint import write_latest_marker

    run = tmp_path / "live"
    shutil.copytree(runs[1]["ema"], run)
    shutil.copytree(run / "checkpoints" / "iter_0000002", run / "checkpoints" / "iter_0000003")
    write_latest_marker(str(run), "iter_0000003")
    return run


def _prune_during_the_read(monkeypatch, run):
    """The live run's pruning (keep_checkpoints=1) strikes between the export's reads of generator/
    and of train_state/ (its EMA)."""
    import adm_megatron.train.checkpoint_export as export
    from adm_megatron.train.checkpoint import _prune

    read_ema = export.load_ema_into

    def prune_then_read(*args):
        _prune(str(run), 1, keep="iter_0000003")
        read_ema(*args)

    monkeypatch.setattr(export, "load_ema_into", prune_then_read)


def test_export_holds_the_checkpoint_it_reads_so_the_live_runs_pruning_skips_it(runs, tmp_path, capsys, monkeypatch):
    from adm_megatron.cli import main
    from adm_megatron.train.checkpoint import _prune

    run = _live_run(runs, tmp_path)
    _prune_during_the_read(monkeypatch, run)
    ckpt = run / "checkpoints" / "iter_0000002"
    assert main(["export", "--checkpoint", str(ckpt), "--out", str(tmp_path / "gen")]) == 0
    assert "generator of iteration 2 (ema weights" in capsys.readouterr().out
    exported, reference = _weights(tmp_path / "gen"), _weights(runs[1]["ema"] / "generator")
    assert exported.keys() == reference.keys() and all(torch.equal(exported[k], reference[k]) for k in reference)
    assert ckpt.is_dir()  # kept while it was read...
    _prune(str(run), 1, keep="iter_0000003")
    assert sorted(os.listdir(run / "checkpoints")) == ["iter_0000003", "latest"]  # ...and removed by the next save


def test_export_of_a_checkpoint_pruned_mid_read_without_flock_stops_in_one_line(runs, tmp_path, capsys, monkeypatch):
    import adm_megatron.train.checkpoint_hold as hold
    from adm_megatron.cli import main

    def no_flock(*_):
        raise OSError(37, "No locks available")

    monkeypatch.setattr(hold.fcntl, "flock", no_flock)  # a Lustre mount without -o flock
    run = _live_run(runs, tmp_path)
    _prune_during_the_read(monkeypatch, run)
    ckpt = run / "checkpoints" / "iter_0000002"
    assert main(["export", "--checkpoint", str(ckpt), "--out", str(tmp_path / "gen")]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (f"adm-megatron: config error: {ckpt}: removed or replaced while it was being read (by the run "
                   "writing it: its pruning, train.keep_checkpoints, or a save of the same iteration after a rewind); "
                   f"nothing was written: its run's latest is now {run / 'checkpoints' / 'iter_0000003'}, read that "
                   "one or pass the run directory for its latest")
    assert not (tmp_path / "gen").exists()


def test_export_of_a_checkpoint_saved_again_mid_read_stops_in_one_line(runs, tmp_path, capsys, monkeypatch):
    """A run rewound to an earlier checkpoint saves iter_0000002 again while it is exported: the
    export's reads after that would come from the new directory under the same name."""
    import adm_megatron.train.checkpoint_export as export
    from adm_megatron.cli import main
    from adm_megatron.convert.checkpoint import _replace_dir

    run = _live_run(runs, tmp_path)
    ckpt = run / "checkpoints" / "iter_0000002"
    read_ema = export.load_ema_into

    def save_again_then_read(*args):
        again = run / "checkpoints" / "iter_0000002.tmp-again"
        shutil.copytree(run / "checkpoints" / "iter_0000003", again)
        _replace_dir(str(again), str(ckpt))  # as publish_temporary_dir does
        read_ema(*args)

    monkeypatch.setattr(export, "load_ema_into", save_again_then_read)
    assert main(["export", "--checkpoint", str(ckpt), "--out", str(tmp_path / "gen")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"adm-megatron: config error: {ckpt}: removed or replaced while it was being read") and \
        "\n" not in err
    assert not (tmp_path / "gen").exists()


def test_pipeline_out_refuses_a_teacher_without_a_whole_pipeline():
    """The toy teacher's model_index.json lists its text encoder, tokenizer and VAE as null: the copy
    --pipeline-out wrote (exit 0) was refused by DiffusionPipeline.from_pretrained."""
    from adm_megatron.convert.checkpoint import CheckpointError
    from adm_megatron.convert.pipeline_export import pipeline_source

    toy = os.path.join(ROOT, "assets", "toy_teacher")
    with pytest.raises(CheckpointError) as err:
        pipeline_source(toy, "")
    assert str(err.value) == (f"--pipeline-out: the run's pipeline {toy} has no text_encoder, tokenizer, vae "
                              "(model_index.json lists them as null), so its copy would not load; give the generator "
                              "to a whole pipeline by hand")
