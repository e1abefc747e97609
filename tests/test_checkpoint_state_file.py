"""A checkpoint's ``trainer_state.json`` that is JSON yet not what a resume or an export reads (a list,
an iteration that is no count, no run config or layout), and a ``checkpoints/latest`` marker naming a
checkpoint that is not there, are refused in one line naming the file (the marker) and the way on,
before anything is loaded. These ended in tracebacks (export: only after the weights were read), or
in a line saying the checkpoint had been removed while it was read and that it was the latest."""

from __future__ import annotations

import json
import os

import pytest

from adm_megatron.config import ConfigError, load_config
from adm_megatron.train import checkpoint_files
from adm_megatron.train.checkpoint import read_training_state
from adm_megatron.train.checkpoint_export import export_checkpoint
from adm_megatron.train.resume import plan_resume

STATE = {"iteration": 3, "layout": {"data_parallel": 1, "tensor_parallel": 1, "context_parallel": 1},
         "config": {"data": {"batch_size": 2}}}


def _run(tmp_path, state, name="iter_0000003") -> tuple[str, str]:
    """(run directory, its checkpoint) holding only ``trainer_state.json`` (``state``, a value or the text)."""
    run = tmp_path / "run"
    ckpt = run / "checkpoints" / name
    ckpt.mkdir(parents=True)
    (ckpt / "trainer_state.json").write_text(state if isinstance(state, str) else json.dumps(state))
    (run / "checkpoints" / "latest").write_text(name + "\n")
    return str(run), str(ckpt)


def _one_line(call, *args) -> str:
    with pytest.raises(ConfigError) as err:
        call(*args)
    assert "\n" not in str(err.value)
    return str(err.value)


def _readers(run: str, tmp_path) -> list[str]:
    """The refusals of a resume from the run (train.resume=RUN) and of an export of it."""
    config = load_config(None, [f"model.teacher={tmp_path}", f"output_dir={tmp_path / 'new'}",
                                f"train.resume={run}"])
    return [_one_line(plan_resume, config, 1), _one_line(export_checkpoint, run, str(tmp_path / "out"))]


@pytest.mark.parametrize("state, problem", [
    ([], "expected a JSON object, got list"),
    ({**STATE, "iteration": "three"}, 'iteration="three": expected an integer >= 0'),
    ({**STATE, "iteration": -1}, "iteration=-1: expected an integer >= 0"),
    ({k: v for k, v in STATE.items() if k != "iteration"}, "iteration is missing (expected an integer >= 0)"),
    ({**STATE, "config": []}, "config=[]: expected an object (the run config)"),
    ({**STATE, "config": {}}, "config.data is missing (expected an object)"),
    ({**STATE, "config": {"data": {"batch_size": "2"}}}, 'config.data.batch_size="2": expected a positive integer'),
    ({**STATE, "layout": None}, "layout=null: expected an object (the parallel layout it was saved at)"),
    ({**STATE, "layout": {}}, "layout.data_parallel is missing (expected a positive integer)"),
])
def test_a_state_file_without_what_its_readers_take_is_named(tmp_path, state, problem):
    run, ckpt = _run(tmp_path, state)
    named = f"{ckpt}/trainer_state.json: {problem}"
    assert _one_line(read_training_state, ckpt) == named
    for refusal in _readers(run, tmp_path):
        assert refusal == (f"{ckpt}: damaged checkpoint, nothing was loaded ({named}); no earlier whole checkpoint "
                           "is left beside it")
    assert not os.path.exists(tmp_path / "out") and not os.path.exists(tmp_path / "new")


def test_a_latest_marker_naming_no_checkpoint_is_said_so(tmp_path, monkeypatch):
    run, ckpt = _run(tmp_path, STATE)
    marker = os.path.join(run, "checkpoints", "latest")
    with open(marker, "w") as f:
        f.write("iter_0000099\n")
    said = f"{marker} names 'iter_0000099', a checkpoint that is not there (removed, or the marker edited); "
    resume, export = _readers(run, tmp_path)
    assert resume == f"train.resume={run!r}: {said}no whole checkpoint is there"
    assert export == f"--checkpoint={run!r}: {said}no whole checkpoint is there"
    monkeypatch.setattr(checkpoint_files, "damage", lambda path: None)  # iter_0000003 whole
    resume, export = _readers(run, tmp_path)
    assert resume == (f"train.resume={run!r}: {said}the newest whole checkpoint there is {ckpt}: give "
                      f"train.resume={ckpt}")
    assert export.endswith(f"the newest whole checkpoint there is {ckpt}: give --checkpoint={ckpt}")
