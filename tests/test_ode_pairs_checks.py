"""Training refuses teacher ODE pairs (``data.real_path``) that are not its own, in one line before
anything is built: pairs of a teacher of another architecture or with other weights (a cheap
fingerprint of its weight files, the same for a copy), at another CFG range, of other prompts (another
source, row count, or embeddings, the same path re-encoded included), and an older manifest's pairs
whose prompt ids do not index the run's prompts; a collection resumed after its prompt embeddings
were re-encoded is refused naming the values that differ. Collection and the rest of the format:
tests/test_ode_pairs.py."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch

from adm_megatron.config import ConfigError, load_config
from adm_megatron.data.ode_pairs import MANIFEST, OdePairs
from adm_megatron.data.text_embeddings import write_embedding_shards
from adm_megatron.data.tiny_pipeline import MAX_TEXT_LENGTH, TRANSFORMER, build_tiny_pipeline
from adm_megatron.train.teacher import resolve_teacher
from adm_megatron.train.validate import validate_run

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SIZE = ["data.frames=2", "data.height=4", "data.width=4", "distill.head_every=1", "distill.guidance_scale=[2.0, 4.0]"]


def _prompts(path, n: int, seed: int = 0) -> str:
    """``n`` prompt embeddings the tiny teacher takes (16 x 32), drawn from ``seed``."""
    g = torch.Generator().manual_seed(seed)
    return write_embedding_shards(str(path), [f"prompt {seed} {i}" for i in range(n)],
                                  torch.randn(n, MAX_TEXT_LENGTH, TRANSFORMER["text_embed_dim"], generator=g),
                                  torch.zeros(MAX_TEXT_LENGTH, TRANSFORMER["text_embed_dim"]), shard_size=2,
                                  overwrite=True)


def _collect_ode(teacher, out, *overrides) -> int:
    """``adm-megatron collect-ode`` of 5 pairs (1 step) into ``out``; its exit code."""
    from adm_megatron.cli import main
    from adm_megatron.parallel import destroy_parallel

    try:
        return main(["collect-ode", "--out", str(out), "--num-pairs", "5", "--shard-size", "2", "--steps", "1",
                     "--no-progress", f"model.teacher={teacher}", *SIZE, *overrides])
    finally:
        destroy_parallel()


def _collect(teacher, out, *overrides) -> str:
    assert _collect_ode(teacher, out, *overrides) == 0
    return str(out)


@pytest.fixture(scope="module")
def prompts(tmp_path_factory):
    return _prompts(tmp_path_factory.mktemp("prompts") / "emb", 5)


@pytest.fixture(scope="module")
def pairs(cogvideox_pipeline, prompts, tmp_path_factory):
    """5 pairs of ``cogvideox_pipeline`` on the 5 ``prompts``, at CFG [2, 4]."""
    return _collect(cogvideox_pipeline, tmp_path_factory.mktemp("pairs") / "pairs", "data.source=shards",
                    f"data.path={prompts}")


def _validate(teacher, pairs, *overrides) -> None:
    """``validate_run`` of a DMD2 run of ``teacher`` on ``pairs`` (``overrides`` last)."""
    config = load_config(None, [f"model.teacher={teacher}", "distill.method=dmd2", f"data.real_path={pairs}", *SIZE,
                                *overrides])
    validate_run(config, resolve_teacher(config.model.teacher, config.model.pipeline), 1)


def _refusal(teacher, pairs, *overrides) -> str:
    with pytest.raises(ConfigError) as err:
        _validate(teacher, pairs, *overrides)
    message = str(err.value)
    assert "\n" not in message and message.startswith(f"data.real_path={pairs!r}: "), message
    return message


@pytest.fixture(scope="module")
def teachers(cogvideox_pipeline, tmp_path_factory):
    """A copy of the pairs' teacher, one of the same architecture with other weights, one of another."""
    root = tmp_path_factory.mktemp("teachers")
    shutil.copytree(cogvideox_pipeline, root / "copy")
    return {"copy": str(root / "copy"), "other weights": build_tiny_pipeline(str(root / "seed1"), seed=1),
            "rope": build_tiny_pipeline(str(root / "rope"), seed=0, rope=True)}


def test_the_file_fingerprint_samples_each_files_name_size_and_three_blocks(tmp_path):
    """Not a full hash (``adm_megatron/file_fingerprint.py`` says why): the same for a copy elsewhere,
    another for a changed size, name or sampled byte; blind to a byte between the samples."""
    from adm_megatron.file_fingerprint import SAMPLE_BYTES, file_fingerprint

    data = bytearray(torch.randint(0, 256, (4 * SAMPLE_BYTES,), generator=torch.Generator().manual_seed(0),
                                   dtype=torch.uint8).numpy().tobytes())

    def fingerprint(directory, content, name="w.safetensors") -> str:
        directory.mkdir(exist_ok=True)
        (directory / name).write_bytes(content)
        return file_fingerprint(str(directory), [str(directory / name)])

    original = fingerprint(tmp_path / "a", data)
    assert fingerprint(tmp_path / "copy", data) == original
    assert fingerprint(tmp_path / "b", data, "x.safetensors") != original
    assert fingerprint(tmp_path / "c", data[:-1]) != original
    for offset in (0, 2 * SAMPLE_BYTES, 4 * SAMPLE_BYTES - 1):  # first, middle and last samples
        changed = bytearray(data)
        changed[offset] ^= 1
        assert fingerprint(tmp_path / f"d{offset}", changed) != original, offset
    changed = bytearray(data)
    changed[SAMPLE_BYTES + 10] ^= 1  # between the first and the middle sample
    assert fingerprint(tmp_path / "e", changed) == original


def test_the_runs_own_pairs_pass_and_a_copied_teacher_is_the_same_teacher(cogvideox_pipeline, teachers, pairs,
                                                                         prompts):
    for teacher in (cogvideox_pipeline, teachers["copy"]):
        _validate(teacher, pairs, "data.source=shards", f"data.path={prompts}")


def test_pairs_of_another_teacher_are_refused_in_one_line(teachers, pairs, prompts):
    manifest = OdePairs(pairs).manifest["teacher"]
    shards = ["data.source=shards", f"data.path={prompts}"]
    message = _refusal(teachers["rope"], pairs, *shards)
    assert ("manifest teacher.arch has {'attention_head_dim': 8, 'use_rotary_positional_embeddings': False}, "
            "model.teacher's {'attention_head_dim': 16, 'use_rotary_positional_embeddings': True}: pairs of a "
            "teacher of another architecture; set model.teacher to theirs") in message, message
    other = resolve_teacher(teachers["other weights"]).weights_fingerprint()
    assert other != manifest["fingerprint"]
    message = _refusal(teachers["other weights"], pairs, *shards)
    assert (f"manifest teacher.fingerprint={manifest['fingerprint']}, model.teacher={teachers['other weights']!r} "
            f"has {other}: pairs of another teacher (other weights); set model.teacher to theirs "
            f"({manifest['path']}), or recollect the pairs with this config (adm-megatron collect-ode)") in message


def test_a_megatron_teacher_converted_from_the_pairs_teacher_takes_them(cogvideox_pipeline, pairs, prompts, tmp_path,
                                                                        world_of_one):
    """A converted checkpoint holds the teacher's weights in other files: the weights of teachers of
    different kinds are not compared (the architecture is); a checkpoint's own fingerprint is that
    of its ``*.distcp`` shards, the same for a copy of it."""
    from adm_megatron.convert import hf_to_megatron_checkpoint

    checkpoint = hf_to_megatron_checkpoint(cogvideox_pipeline, str(tmp_path / "ckpt"))
    _validate(checkpoint, pairs, "data.source=shards", f"data.path={prompts}", f"model.pipeline={cogvideox_pipeline}")
    shutil.copytree(checkpoint, tmp_path / "copy")
    fingerprints = {resolve_teacher(p, cogvideox_pipeline).weights_fingerprint() for p in (checkpoint, tmp_path / "copy")}
    assert len(fingerprints) == 1 and fingerprints != {OdePairs(pairs).manifest["teacher"]["fingerprint"]}


def test_pairs_at_another_cfg_range_are_refused_in_one_line(cogvideox_pipeline, pairs, prompts):
    message = _refusal(cogvideox_pipeline, pairs, "data.source=shards", f"data.path={prompts}",
                       "distill.guidance_scale=[5.0, 7.0]")
    assert ("manifest sampler.guidance_scale=[2.0, 4.0], the run's distill.guidance_scale=[5.0, 7.0]: "
            "pairs sampled at another CFG range than the run's") in message, message
    assert "set distill.guidance_scale=[2.0, 4.0], or recollect" in message


def test_a_method_that_reads_no_pairs_does_not_check_them(cogvideox_pipeline, tmp_path):
    """data.real_path under ADM is only warned of at the start (one base config serves several
    methods): it was then refused for the pairs it does not read."""
    _validate(cogvideox_pipeline, str(tmp_path / "absent"), "distill.method=adm")
    with pytest.raises(ConfigError, match="does not exist"):
        _validate(cogvideox_pipeline, str(tmp_path / "absent"))


def test_pairs_that_are_not_there_are_refused_as_such(cogvideox_pipeline, tmp_path):
    """A data.real_path that does not exist was refused as "no manifest.json (not an ODE-pair
    directory, or an unfinished collection ...)"."""
    absent = str(tmp_path / "absent")
    assert _refusal(cogvideox_pipeline, absent) == (
        f"data.real_path={absent!r}: does not exist (expected an ODE-pair directory from adm-megatron collect-ode)")
    os.makedirs(absent)
    assert "no manifest.json (not an ODE-pair directory, or an unfinished collection" in \
        _refusal(cogvideox_pipeline, absent)


def test_pairs_of_other_prompts_are_refused_in_one_line(cogvideox_pipeline, pairs, prompts, tmp_path):
    recorded = OdePairs(pairs).manifest["prompts"]
    assert recorded["rows"] == 5
    back = f"set data.source=shards and data.path={prompts!r}, or recollect"
    message = _refusal(cogvideox_pipeline, pairs, "data.source=synthetic", "data.num_prompts=5")
    assert f"manifest prompts.source='shards', the run's data.source='synthetic': pairs of other prompts; {back}" \
        in message, message
    more = _prompts(tmp_path / "more", 7)
    message = _refusal(cogvideox_pipeline, pairs, "data.source=shards", f"data.path={more}")
    assert (f"manifest prompts.rows=5, the run's prompts (data.path={more!r}) have 7 rows: pairs of another prompt "
            f"set; {back}") in message, message
    other = _prompts(tmp_path / "other", 5, seed=1)  # as many rows, other prompts
    message = _refusal(cogvideox_pipeline, pairs, "data.source=shards", f"data.path={other}")
    assert (f"manifest prompts.fingerprint={recorded['fingerprint']}, the run's prompts (data.path={other!r}) have "
            "") in message and f"pairs of other prompt embeddings (re-encoded since?); {back}" in message, message


def test_pairs_of_other_synthetic_prompts_are_refused_in_one_line(cogvideox_pipeline, tmp_path):
    pairs = _collect(cogvideox_pipeline, tmp_path / "pairs", "data.num_prompts=3")
    back = "set data.source=synthetic, data.num_prompts=3 and seed=1234, or recollect"
    _validate(cogvideox_pipeline, pairs, "data.num_prompts=3")
    message = _refusal(cogvideox_pipeline, pairs, "data.num_prompts=4")
    assert ("manifest prompts.rows=3, the run's prompts (synthetic, data.num_prompts=4, seed=1234) have 4 rows: "
            f"pairs of another prompt set; {back}") in message, message
    message = _refusal(cogvideox_pipeline, pairs, "data.num_prompts=3", "seed=7")
    assert "manifest prompts.fingerprint=" in message and f"pairs of other prompt embeddings (re-encoded since?); {back}" \
        in message, message


def _old_manifest(pairs, out) -> str:
    """A copy of ``pairs`` whose manifest is as collections wrote it before the fingerprints."""
    shutil.copytree(pairs, out)
    manifest = json.loads((out / MANIFEST).read_text())
    for group, field in (("teacher", "fingerprint"), ("prompts", "rows"), ("prompts", "fingerprint")):
        del manifest[group][field]
    (out / MANIFEST).write_text(json.dumps(manifest))
    return str(out)


def test_an_old_manifest_skips_the_new_comparisons_but_not_its_prompt_ids(cogvideox_pipeline, teachers, pairs,
                                                                          tmp_path):
    """Pairs whose prompt ids exceed the run's prompts crashed with an IndexError in training; an older
    manifest (no row count) has its pairs' prompt ids read; the fields it lacks are not compared."""
    old = _old_manifest(pairs, tmp_path / "old")
    assert len(OdePairs(old)) == 5
    same_rows = _prompts(tmp_path / "same_rows", 5, seed=1)
    _validate(teachers["other weights"], old, "data.source=shards", f"data.path={same_rows}")
    fewer = _prompts(tmp_path / "fewer", 3)
    message = _refusal(cogvideox_pipeline, old, "data.source=shards", f"data.path={fewer}")
    assert (f"its pairs' prompt ids go up to 4, the run's prompts (data.path={fewer!r}) have 3 rows: pairs of another "
            "prompt set; set data.source=shards and data.path=") in message, message
    message = _refusal(cogvideox_pipeline, pairs, "data.source=shards", f"data.path={fewer}")  # a new manifest
    assert f"manifest prompts.rows=5, the run's prompts (data.path={fewer!r}) have 3 rows" in message, message


def test_prompt_embeddings_re_encoded_at_their_path_are_refused_by_a_resumed_collection_and_by_training(
        cogvideox_pipeline, tmp_path, capsys):
    path = _prompts(tmp_path / "emb", 4)
    run = ["data.source=shards", f"data.path={path}"]
    pairs = _collect(cogvideox_pipeline, tmp_path / "pairs", *run)
    before = OdePairs(pairs).manifest["prompts"]["fingerprint"]
    _prompts(path, 4, seed=1)  # the same path, other prompts
    capsys.readouterr()
    assert _collect_ode(cogvideox_pipeline, pairs, *run) == 2
    after = json.loads((tmp_path / "pairs" / "collection.json").read_text())["prompts"]["fingerprint"]
    assert after == before  # the refused collection wrote nothing
    message = capsys.readouterr().err
    assert message.startswith(f"adm-megatron: config error: --out {pairs!r}: holds a collection with other settings "
                              f"(prompts.fingerprint: {before!r} there, '"), message
    assert message.endswith("' now); use a new directory\n") and message.count("\n") == 1, message
    message = _refusal(cogvideox_pipeline, pairs, *run)
    assert f"manifest prompts.fingerprint={before}, the run's prompts (data.path={path!r}) have " in message


def test_a_collection_of_a_teacher_with_a_tuple_in_its_architecture_resumes(sd3_pipeline, tmp_path):
    """SD3's architecture holds a tuple (dual_attention_layers), which collection.json holds as a list:
    the settings compared on resume are as JSON holds them, so the rerun is not refused."""
    from adm_megatron.ode_collection import SETTINGS, _check_out_dir, _settings

    config = load_config(os.path.join(ROOT, "examples", "sd35", "tiny_cpu.yaml"),
                         [f"model.teacher={sd3_pipeline}", "data.source=synthetic"])
    source = resolve_teacher(sd3_pipeline)
    assert isinstance(source.arch.dual_attention_layers, tuple)
    settings = _settings(config, source, source.text_source(config.data, config.seed), 4, 2, 1, 4)
    (tmp_path / SETTINGS).write_text(json.dumps(settings))
    assert _check_out_dir(str(tmp_path), settings) is False



def test_more_collection_steps_than_the_teachers_schedule_has_are_refused_before_loading(cogvideox_pipeline,
                                                                                         tmp_path, capsys):
    """It was the schedule's ValueError, with a traceback, after the teacher was built."""
    from adm_megatron.cli import main

    out = tmp_path / "pairs"
    assert main(["collect-ode", "--out", str(out), "--num-pairs", "2", "--steps", "1001", "--no-progress",
                 f"model.teacher={cogvideox_pipeline}", "data.source=synthetic", *SIZE]) == 2
    assert capsys.readouterr().err.strip() == ("adm-megatron: config error: steps=1001: the teacher's schedule has "
                                               "1000 timesteps; expected at most that many")
    assert not out.exists()


@pytest.mark.parametrize("changed", ["prompts", "pairs"])
def test_a_run_resumed_on_data_changed_under_it_is_refused_in_one_line(changed, cogvideox_pipeline, tmp_path):
    """The same data.path re-encoded (one prompt more) or data.real_path recollected (from other
    noise) between two starts of one run: the resumed run went on silently over other data, every
    later epoch's order and rows changed (train/input_identity.py)."""
    from tiny_runs import tiny_fp64_run

    from adm_megatron.parallel import destroy_parallel
    from adm_megatron.train.trainer import Trainer

    path = _prompts(tmp_path / "emb", 4)
    data = ["data.source=shards", f"data.path={path}"]
    pairs = _collect(cogvideox_pipeline, tmp_path / "pairs", *data) if changed == "pairs" else ""
    method = ["distill.method=dmd2", f"data.real_path={pairs}"] if pairs else ["distill.method=adm"]
    out = tmp_path / "run"

    def trainer(iterations: int) -> Trainer:
        return Trainer(load_config(None, [f"model.teacher={cogvideox_pipeline}", f"output_dir={out}",
                                          *tiny_fp64_run(iterations), *SIZE, *data, *method]))

    try:
        assert trainer(1).fit().trained == 1
        trainer(2)  # the same data: it goes on
        if changed == "prompts":
            _prompts(path, 5)
        else:
            shutil.rmtree(pairs)
            _collect(cogvideox_pipeline, pairs, *data, "seed=7")  # what training compares of pairs is the same
        with pytest.raises(ConfigError) as err:
            trainer(2)
    finally:
        destroy_parallel()
    message = str(err.value)
    assert "\n" not in message and message.startswith(str(out / "checkpoints" / "iter_0000001" / "trainer_state.json"))
    assert message.endswith("; a run cannot change its data: restore them, or start a new run (a new output_dir)")
    if changed == "prompts":
        assert "the run was trained on 4 prompts (fingerprint " in message, message
        assert f"data.path={path!r} now holds 5 (fingerprint " in message, message
    else:
        assert f"other ODE pairs than data.real_path={pairs!r} holds now" in message, message


def test_prompt_embeddings_of_another_length_are_refused_naming_the_length_to_encode(cogvideox_pipeline, tmp_path):
    """The tool's default CogVideoX length (226) against a teacher of another: the refusal named both
    shapes but not what to run."""
    path = write_embedding_shards(str(tmp_path / "emb"), ["a"], torch.zeros(1, 8, TRANSFORMER["text_embed_dim"]),
                                  torch.zeros(8, TRANSFORMER["text_embed_dim"]))
    config = load_config(None, [f"model.teacher={cogvideox_pipeline}", *SIZE, "data.source=shards", f"data.path={path}"])
    with pytest.raises(ConfigError) as err:
        validate_run(config, resolve_teacher(cogvideox_pipeline), 1)
    assert str(err.value) == (f"data.path={path!r}: embeddings are 8 x 32, the teacher takes {MAX_TEXT_LENGTH} x 32 "
                              f"(encode them again with --max-length {MAX_TEXT_LENGTH}: "
                              "tools/precompute_text_embeddings.py)")


def test_prompt_embeddings_of_a_family_with_a_pooled_embedding_are_refused_as_such(cogvideox_pipeline, tmp_path):
    """SD3-encoded prompts (with pooled embeddings) given to a CogVideoX teacher were refused for
    their length, naming a --max-length that could never fix it."""
    width = TRANSFORMER["text_embed_dim"]
    path = write_embedding_shards(str(tmp_path / "emb"), ["a"], torch.zeros(1, 8, width), torch.zeros(8, width),
                                  pooled=torch.zeros(1, 64), negative_pooled=torch.zeros(64))
    config = load_config(None, [f"model.teacher={cogvideox_pipeline}", *SIZE, "data.source=shards", f"data.path={path}"])
    with pytest.raises(ConfigError) as err:
        validate_run(config, resolve_teacher(cogvideox_pipeline), 1)
    assert str(err.value) == (f"data.path={path!r}: pooled embeddings of width 64, the teacher takes none (encode the "
                              "prompts with the teacher's own pipeline: tools/precompute_text_embeddings.py)")
