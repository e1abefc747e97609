"""How long training stops for a checkpoint: a synchronous save against a background one
(``train.async_save``), on the benchmark's trainer after its timed iterations.

Measured, alternating, after one untimed save of each kind (the first save starts megatron's
result queue and plans the files): the synchronous save's seconds (gathering, writing, the
publication); the background save's pause (gathering, planning, the host staging and the fork:
what training waits for) and its write (from the pause's end until it is published). Also the
checkpoint's bytes on disk. Each save is a whole training checkpoint in the benchmark's run
directory, as the trainer writes them, removed once measured.
"""

from __future__ import annotations

import shutil
import statistics
import time

from adm_megatron.bench.timing import synchronize


def measure_checkpoint_pause(trainer, repeats: int) -> dict:
    """Collective: ``repeats`` timed saves of each kind (after one untimed each). Seconds per repeat
    and their medians; ``bytes``: one checkpoint's size."""
    from adm_megatron.train.background_save import BackgroundSaves
    from adm_megatron.train.checkpoint import bytes_on_disk, save_training_checkpoint, start_training_checkpoint

    saves = BackgroundSaves(trainer.config.parallel.timeout_s)
    synchronous, pause, write = [], [], []
    label = 10**6  # checkpoint numbers far from the run's own iterations
    size = 0
    for repeat in range(repeats + 1):
        synchronize(trainer.device)
        start = time.perf_counter()
        path = save_training_checkpoint(trainer, label + 2 * repeat)
        took = time.perf_counter() - start
        synchronize(trainer.device)
        start = time.perf_counter()
        saves.start(start_training_checkpoint(trainer, label + 2 * repeat + 1))
        paused = time.perf_counter()
        background = saves.wait()
        size = bytes_on_disk(path)
        for done in (path, background):
            shutil.rmtree(done)
        if repeat:  # the first of each is untimed
            synchronous.append(took)
            pause.append(paused - start)
            write.append(time.perf_counter() - paused)
    return {
        "synchronous_s": synchronous, "background_pause_s": pause, "background_write_s": write,
        "median_synchronous_s": statistics.median(synchronous), "median_background_pause_s": statistics.median(pause),
        "median_background_write_s": statistics.median(write), "bytes": size,
    }
