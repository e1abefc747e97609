"""Checkpoints written by a process of their own (``train.async_save``): a checkpoint started after an
iteration and written while the next iterations update every weight and optimizer state in place
(offloaded ones included) holds exactly what a synchronous save of that iteration holds; it
appears, and ``latest`` moves, only when its writer has finished; a write that fails is reported in
one line with nothing left behind and ``latest`` unchanged, and so is a synchronous save's, within
``parallel.timeout_s`` even when a writer process died. (tests/test_resume.py kills such a run
with SIGKILL in the middle of a background save and resumes it exactly.)"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import time

import pytest
import torch

from test_offload import COMMON, OFFLOAD


def _trainer(pipeline_dir: str, output_dir: str, overrides: list[str] = ()):
    from adm_megatron.config import load_config
    from adm_megatron.train.trainer import Trainer

    return Trainer(load_config(None, [f"model.teacher={pipeline_dir}", f"output_dir={output_dir}", "train.ema_decay=0.9",
                                      *COMMON, *OFFLOAD, *overrides]))


def _tensors(ckpt: str, tmp: str) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint's megatron parts, read back with torch DCP, by part and key."""
    from adm_megatron.train.checkpoint_files import read_part_tensors

    os.makedirs(tmp)
    return {f"{part}.{key}": tensor for part in ("generator", "fake_score", "train_state")
            for key, tensor in read_part_tensors(os.path.join(ckpt, part), os.path.join(tmp, f"{part}.pt")).items()}


def _synchronous_copy(trainer, iteration: int, output_dir: str) -> str:
    """The same trainer's checkpoint written the usual way, into another run directory."""
    from adm_megatron.train.checkpoint import save_training_checkpoint

    config = trainer.config
    trainer.config = dataclasses.replace(config, output_dir=output_dir)
    try:
        return save_training_checkpoint(trainer, iteration)
    finally:
        trainer.config = config


def _live_forks() -> list:
    """This process's children that are forks of it (a background save's writer), zombies aside."""
    import psutil

    me = psutil.Process()
    forks = []
    for child in me.children():
        with contextlib.suppress(psutil.Error):
            if child.status() != psutil.STATUS_ZOMBIE and child.cmdline() == me.cmdline():
                forks.append(child)
    return forks


@pytest.fixture(scope="module")
def pipeline_dir(tmp_path_factory):
    from adm_megatron.data.tiny_pipeline import build_tiny_pipeline

    return build_tiny_pipeline(str(tmp_path_factory.mktemp("teacher") / "pipe"), seed=0)


def _save_in_the_background_while_training(pipeline_dir: str, tmp: str, overrides: list[str]) -> dict:
    """Collective: iteration 0, a background checkpoint of it, iterations 1 and 2 while it is
    written, then synchronous copies of iterations 1 and 3 to compare with (rank 0 reads them)."""
    import torch.distributed as dist

    from adm_megatron.train.background_save import BackgroundSaves
    from adm_megatron.train.checkpoint import checkpoint_dir, latest_checkpoint, start_training_checkpoint

    out = os.path.join(tmp, "run")
    trainer = _trainer(pipeline_dir, out, overrides)
    trainer.train_iteration(0)
    want_dir = _synchronous_copy(trainer, 1, os.path.join(tmp, "sync"))
    saves = BackgroundSaves(600)
    saves.start(start_training_checkpoint(trainer, 1))
    target = checkpoint_dir(out, 1)
    seen = {"pending": saves.pending, "published early": os.path.exists(target) or latest_checkpoint(out) is not None}
    for iteration in (1, 2):  # every weight and optimizer state changes in place meanwhile
        trainer.train_iteration(iteration)
    seen.update(waited=saves.wait(), latest=latest_checkpoint(out), pending_after=saves.pending,
                listing=sorted(os.listdir(os.path.dirname(target))))
    later_dir = _synchronous_copy(trainer, 3, os.path.join(tmp, "later"))
    if dist.get_rank() == 0:
        seen.update(want=_tensors(want_dir, os.path.join(tmp, "want")), got=_tensors(target, os.path.join(tmp, "got")),
                    later=_tensors(later_dir, os.path.join(tmp, "later-read")))
    return seen


def _check(seen: dict, out: str) -> None:
    target = os.path.join(out, "checkpoints", "iter_0000001")
    assert seen["pending"] == target and not seen["published early"]  # nothing published while it is written
    assert seen["waited"] == target and seen["latest"] == target and seen["pending_after"] is None
    assert seen["listing"] == ["iter_0000001", "latest"]  # no temporary directory left
    want, got, later = seen["want"], seen["got"], seen["later"]
    assert got.keys() == want.keys() and any(".exp_avg_sq" in k for k in got)
    for key, tensor in want.items():
        assert torch.equal(got[key], tensor), key
    changed = [k for k in want if not torch.equal(later[k], want[k])]  # the in-place updates were real
    assert any(k.startswith("generator.") for k in changed) and any(".exp_avg_sq" in k for k in changed)


def test_a_background_checkpoint_holds_its_iteration_while_training_goes_on(pipeline_dir, tmp_path, world_of_one):
    _check(_save_in_the_background_while_training(pipeline_dir, str(tmp_path), []), str(tmp_path / "run"))


def test_offloaded_states_in_memory_shared_with_the_writer_are_snapshot_before_the_fork(
        pipeline_dir, tmp_path, world_of_one, monkeypatch):
    """On a GPU the offload host buffers are pinned, and pinned pages are no copy-on-write after a fork:
    the writer saw the next iterations' moments (the first GPU run's background checkpoint differed
    from the synchronous one). Shared memory behaves the same on the CPU: the buffers are moved there
    and called pinned, and the writer starts its write only after two more iterations have updated
    them in place. The checkpoint must still hold iteration 1 exactly."""
    from adm_megatron.train import background_save
    from adm_megatron.train.checkpoint import start_training_checkpoint

    trainer = _trainer(pipeline_dir, str(tmp_path / "run"))
    trainer.train_iteration(0)
    buffers = list(trainer.offload.mover.host.values())
    assert buffers and any(trainer.offload.mover.is_on_host(t) for net in trainer.trainable.values()
                           for t in net.optimizer.state_tensors())
    want = _tensors(_synchronous_copy(trainer, 1, str(tmp_path / "sync")), str(tmp_path / "want"))
    for buffer in buffers:
        buffer.share_memory_()  # in place: the offloaded tensors keep pointing at them
    monkeypatch.setattr(torch.Tensor, "is_pinned", lambda self: self.is_shared())
    write, go = background_save._write_in_order, tmp_path / "go"

    def write_later(calls):  # in the forked writer: only once the parent has trained on
        deadline = time.monotonic() + 120
        while not go.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        write(calls)

    monkeypatch.setattr(background_save, "_write_in_order", write_later)
    saves = background_save.BackgroundSaves(600)
    saves.start(start_training_checkpoint(trainer, 1))
    for iteration in (1, 2):
        trainer.train_iteration(iteration)
    go.touch()
    got = _tensors(saves.wait(), str(tmp_path / "got"))
    assert got.keys() == want.keys()
    assert [k for k in want if not torch.equal(got[k], want[k])] == []


def test_a_background_checkpoint_of_two_ranks_matches_their_synchronous_one(pipeline_dir, tmp_path):
    """Tensor parallel 2: both ranks' writers, megatron's finalizers and the publication are collective."""
    from multiproc import run_world

    seen = run_world(_save_in_the_background_while_training, 2, pipeline_dir, str(tmp_path),
                     ["parallel.tensor_parallel=2"], timeout_s=300)
    _check(seen[0], str(tmp_path / "run"))
    assert seen[1] == {k: v for k, v in seen[0].items() if k not in ("want", "got", "later")}


def test_a_failed_background_write_is_one_line_and_leaves_latest_alone(pipeline_dir, tmp_path, world_of_one,
                                                                       monkeypatch):
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    from adm_megatron.convert.checkpoint import CheckpointError
    from adm_megatron.train.background_save import BackgroundSaves
    from adm_megatron.train.checkpoint import latest_checkpoint, save_training_checkpoint, start_training_checkpoint

    out = str(tmp_path / "run")
    trainer = _trainer(pipeline_dir, out)
    trainer.train_iteration(0)
    first = save_training_checkpoint(trainer, 1)

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    # the writers are forks of this process, so they write items with this patched function
    monkeypatch.setattr(filesystem_async, "_write_item", disk_full)
    saves = BackgroundSaves(600)
    trainer.train_iteration(1)
    saves.start(start_training_checkpoint(trainer, 2))
    with pytest.raises(CheckpointError) as err:
        saves.wait()
    message = str(err.value)
    assert "\n" not in message and "iter_0000002: writing it failed (rank 0: " in message
    if hasattr(filesystem_async.FileSystemWriterAsync, "write_preloaded_data_multithread"):
        # megatron-core >= 0.17's threaded writer reports only the class of its main worker's error
        # (its check_local_output asserts on the returned exception): the text is lost inside megatron
        assert "OSError" in message
    else:
        assert "No space left on device" in message
    assert latest_checkpoint(out) == first and saves.pending is None
    assert sorted(os.listdir(os.path.dirname(first))) == ["iter_0000001", "latest"]  # the temporary one removed
    with pytest.raises(CheckpointError) as err:  # a synchronous save fails the same way
        save_training_checkpoint(trainer, 2)
    assert str(err.value) == message
    assert sorted(os.listdir(os.path.dirname(first))) == ["iter_0000001", "latest"]
    monkeypatch.undo()  # the disk has room again: the next save in this process is whole
    assert save_training_checkpoint(trainer, 2) == os.path.join(os.path.dirname(first), "iter_0000002")


def test_a_dead_writer_stops_the_wait_after_the_limit_in_one_line(pipeline_dir, tmp_path, world_of_one, monkeypatch):
    """megatron's writer waits for its worker processes without a limit: one killed (the OOM killer,
    say) left the run waiting for good at its next save, background or synchronous."""
    import psutil
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    from adm_megatron.convert.checkpoint import CheckpointError
    from adm_megatron.train.background_save import BackgroundSaves
    from adm_megatron.train.checkpoint import latest_checkpoint, save_training_checkpoint, start_training_checkpoint

    out = str(tmp_path / "run")
    trainer = _trainer(pipeline_dir, out, ["parallel.timeout_s=3"])
    trainer.train_iteration(0)
    first = save_training_checkpoint(trainer, 1)

    def killed(*args, **kwargs):
        os._exit(137)

    # the workers are forks of forks of this process: they die with this patch before reporting
    monkeypatch.setattr(filesystem_async.FileSystemWriterAsync, "write_preloaded_data", staticmethod(killed))
    saves = BackgroundSaves(limit_s=3)
    saves.start(start_training_checkpoint(trainer, 2))
    time.sleep(1)
    if hasattr(filesystem_async.FileSystemWriterAsync, "write_preloaded_data_multithread"):
        # megatron-core >= 0.17 writes with threads of the writer: the kill takes the writer itself,
        # which megatron finds at once; the save fails in one line all the same, latest untouched
        with pytest.raises(CheckpointError) as err:
            saves.wait()
        message = str(err.value)
        assert "\n" not in message and "iter_0000002: writing it failed (rank 0: " in message
        assert latest_checkpoint(out) == first and saves.pending is None and _live_forks() == []
        assert sorted(os.listdir(os.path.dirname(first))) == ["iter_0000001", "latest"]
        return
    stuck = _live_forks()
    assert len(stuck) == 1  # the writer, waiting for its dead workers
    with pytest.raises(CheckpointError) as err:
        saves.wait()
    message = str(err.value)
    assert "\n" not in message and "iter_0000002: its writer has not finished 3 s after" in message
    assert latest_checkpoint(out) == first and saves.pending is None
    assert sorted(os.listdir(os.path.dirname(first))) == ["iter_0000001", "latest"]  # the temporary one removed
    _, alive = psutil.wait_procs(stuck, timeout=10)
    assert alive == []  # the stuck writer was ended
    began = time.monotonic()
    with pytest.raises(CheckpointError) as err:  # a synchronous save: the same limit (parallel.timeout_s)
        save_training_checkpoint(trainer, 2)
    assert str(err.value) == message and time.monotonic() - began < 30
    assert latest_checkpoint(out) == first and _live_forks() == []
    assert sorted(os.listdir(os.path.dirname(first))) == ["iter_0000001", "latest"]


def _small_files_fail_on_rank0(pipeline_dir: str, tmp: str) -> dict:
    import torch.distributed as dist

    import adm_megatron.train.checkpoint as checkpoint
    from adm_megatron.convert.checkpoint import CheckpointError

    out = os.path.join(tmp, "run")
    trainer = _trainer(pipeline_dir, out)
    trainer.train_iteration(0)
    first = checkpoint.save_training_checkpoint(trainer, 1)
    if dist.get_rank() == 0:
        def disk_full(*args, **kwargs):
            raise OSError(28, "No space left on device")

        checkpoint.write_checkpoint_meta = disk_full  # rank 0's small files: the others never write them
    began = time.monotonic()
    try:
        checkpoint.save_training_checkpoint(trainer, 2)
        message = None
    except CheckpointError as err:
        message = str(err)
    return {"message": message, "seconds": time.monotonic() - began, "latest": checkpoint.latest_checkpoint(out),
            "first": first, "listing": sorted(os.listdir(os.path.dirname(first)))}


def test_rank0s_failed_small_files_end_the_save_on_every_rank_in_one_line(pipeline_dir, tmp_path):
    """Rank 0 alone writes the small files; its OSError left the other ranks waiting for it in the
    save's next collective until parallel.timeout_s."""
    from multiproc import run_world

    ranks = run_world(_small_files_fail_on_rank0, 2, pipeline_dir, str(tmp_path), timeout_s=300)
    target = os.path.join(str(tmp_path), "run", "checkpoints", "iter_0000002")
    for seen in ranks:
        assert seen["message"] == (f"{target}: writing its small files failed ([Errno 28] No space left on device); "
                                   "the previous checkpoint stays the latest")
        assert seen["seconds"] < 60 and seen["latest"] == seen["first"]
        assert seen["listing"] == ["iter_0000001", "latest"]  # the temporary directory removed
