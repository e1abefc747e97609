"""What a run reports: ``metrics.jsonl`` (one JSON object per logged iteration: every
``train.log_every``-th and the last), wandb (offline unless configured online; also the rendered
samples, as media), TensorBoard where ``logging.tensorboard`` (the same metrics and the image samples;
a start purges what an earlier start logged past its checkpoint, as the metrics file is trimmed) and a
progress bar (every iteration: each phase's loss and the discriminator's paired accuracy and margin),
all on rank 0 only.

A run is one wandb run however many times it is started (preempted, requeued, resumed): its id is
kept in ``output_dir/wandb_run.json`` and each start resumes it (``resume="allow"``; offline, each
start's ``wandb/offline-run-*`` directory carries the same id and ``wandb sync`` adds them to that
run), named ``logging.wandb_name`` or the output directory's name. An iteration logged again after a
crash (past the checkpoint the run resumed from) has the values it had: a resume is exact.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import logging
import math
import os
import uuid

from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from adm_megatron.config import ConfigError
from adm_megatron.convert.checkpoint import one_line
from adm_megatron.json_file import write_json_atomically

logger = logging.getLogger("adm_megatron")

# the discriminator's health (algorithms/discriminator_health.py) beside the losses on the bar
SHOWN = {"discriminator/paired_accuracy": "D_acc", "discriminator/paired_margin": "D_margin"}
WANDB_RUN_FILE = "wandb_run.json"


def wandb_run_id(output_dir: str) -> str:
    """The run's wandb id: the one its first start chose (``output_dir/wandb_run.json``), or a new one."""
    path = os.path.join(output_dir, WANDB_RUN_FILE)
    if os.path.isfile(path):
        with open(path) as f:
            return json.load(f)["id"]
    run_id = uuid.uuid4().hex[:16]  # wandb ids: letters and digits, unique in the project
    write_json_atomically(path, {"id": run_id})
    return run_id


def metrics_line(metrics: dict) -> str:
    """One ``metrics.jsonl`` record as strict JSON: a non-finite value (a NaN loss of a skipped update
    under ``train.nan_policy=skip``) is written ``null`` -- Python would write ``NaN``, which jq,
    JavaScript and other strict readers refuse; pandas reads ``null`` back as NaN, and the
    ``<network>/skipped`` flags say which update it was."""
    return json.dumps({k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in metrics.items()},
                      allow_nan=False)


def check_loggers(wandb_mode: str, tensorboard: bool) -> None:
    """Refuse, before the networks are built, what the logger would fail on at the first iteration:
    ``logging.tensorboard`` without the tensorboard package, and ``logging.wandb_mode=online`` without
    wandb credentials, found as ``wandb.init`` finds them (``WANDB_API_KEY``, ``~/.netrc``) without
    contacting the server (at a terminal wandb asks for a key here instead)."""
    if tensorboard and importlib.util.find_spec("tensorboard") is None:
        raise ConfigError("logging.tensorboard=true needs the tensorboard package: pip install "
                          "'adm-megatron[tensorboard]' (or pip install tensorboard)")
    if wandb_mode != "online":
        return
    import wandb

    try:
        wandb.login(verify=False)
    except wandb.errors.UsageError as err:
        raise ConfigError(f"logging.wandb_mode=online but wandb has no credentials ({err}): run `wandb login` or set "
                          "WANDB_API_KEY, or use logging.wandb_mode=offline and `wandb sync` output_dir/wandb later"
                          ) from None


class RunLogger:
    def __init__(self, output_dir: str, config: dict, total: int, start: int, enabled: bool,
                 log_every: int = 1, wandb_mode: str = "offline", wandb_project: str = "adm-megatron",
                 progress: bool = True, wandb_name: str = "", tensorboard: bool = False):
        self.enabled = enabled
        self.log_every = log_every
        self.wandb = None
        self.tensorboard = None
        self.bar = None
        self._redirect = contextlib.ExitStack()
        if not enabled:
            return
        os.makedirs(output_dir, exist_ok=True)
        self.path = os.path.join(output_dir, "metrics.jsonl")
        self.file = open(self.path, "a")
        if wandb_mode != "disabled":
            import wandb

            self.wandb = wandb.init(
                project=wandb_project, dir=output_dir, config=config, mode=wandb_mode,
                id=wandb_run_id(output_dir), resume="allow",
                name=wandb_name or os.path.basename(os.path.normpath(output_dir)), reinit="finish_previous",
            )
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            # purge_step: events at or past this start's first iteration, from a start that got further
            # than its last checkpoint, are dropped (the metrics file is trimmed the same way)
            self.tensorboard = SummaryWriter(os.path.join(output_dir, "tensorboard"), purge_step=start)
        if progress:
            method = config.get("distill", {}).get("method", "adm")  # the bar names the run's method
            self.bar = tqdm(total=total, initial=start, desc=method, unit="it", dynamic_ncols=True)
            # log lines go above the bar, not glued to the end of its line (tqdm's own redirect)
            self._redirect.enter_context(logging_redirect_tqdm())

    def log(self, metrics: dict, last: bool = False) -> None:
        """One iteration's metrics (with an ``iteration`` key); ``last`` forces a record."""
        if not self.enabled:
            return
        if metrics["iteration"] % self.log_every == 0 or last:
            self.file.write(metrics_line(metrics) + "\n")
            self.file.flush()
            self._wandb("log", lambda run: run.log({k: v for k, v in metrics.items() if k != "iteration"},
                                                   step=metrics["iteration"]))
            if self.tensorboard is not None:
                for key, value in metrics.items():
                    if key != "iteration" and isinstance(value, (int, float)):  # a bool (skipped) as 0 / 1
                        self.tensorboard.add_scalar(key, float(value), metrics["iteration"])
                self.tensorboard.flush()
        if self.bar is not None:
            self.bar.update(1)
            shown = {k.split("/")[0][:4]: round(v, 4) for k, v in metrics.items() if k.endswith("/loss")}
            for key, label in SHOWN.items():
                if key in metrics:
                    shown[label] = round(metrics[key], 3)
            self.bar.set_postfix(shown)

    def media(self, iteration: int, paths: list[str]) -> None:
        """Rendered samples (gif videos, png images) to wandb at ``iteration``, the png images to
        TensorBoard (``samples/<file>``; its videos need moviepy, so gifs go to wandb only); the files
        stay where they are."""
        if not (self.enabled and paths):
            return
        grids = [p for p in paths if os.path.basename(p) == "grid.png"]  # images: their grid, of another size
        if self.wandb is not None:
            import wandb

            items = [wandb.Video(p, format="gif") if p.endswith(".gif") else wandb.Image(p)
                     for p in paths if p not in grids]
            self._wandb("log", lambda run: run.log(
                {"samples": items, **({"samples_grid": wandb.Image(grids[0])} if grids else {})}, step=iteration))
        if self.tensorboard is not None:
            import numpy as np
            from PIL import Image

            for path in paths:
                if path.endswith(".png"):
                    image = np.asarray(Image.open(path).convert("RGB"))
                    self.tensorboard.add_image(f"samples/{os.path.basename(path)}", image, iteration, dataformats="HWC")
            self.tensorboard.flush()

    def _wandb(self, what: str, call) -> None:
        """``call(run)`` on the wandb run, if any. wandb is a report, not the run's record (that is
        metrics.jsonl): when it fails -- its service process gone, as a job-wide SIGTERM (``scancel``, a
        preemption) reaches it first -- the run goes on without it, saying so in one line, instead of
        ending in a traceback (exit 1 after a preemption's checkpoint was saved)."""
        if self.wandb is None:
            return
        try:
            call(self.wandb)
        except Exception as err:  # noqa: BLE001 - whatever wandb raises, the run's own records are complete
            logger.warning("wandb %s failed (%s); the run goes on without wandb (metrics.jsonl has every record)",
                           what, one_line(err))
            self.wandb = None
            self._end_wandb_service()

    @staticmethod
    def _end_wandb_service() -> None:
        """Close wandb's connection to its (gone) service now: left to wandb's own exit hook, it printed
        "Exception ignored in atexit callback" and a traceback after the run's last line. The teardown
        drops that hook first, then fails to reach the service, as expected."""
        import wandb

        with contextlib.suppress(Exception):
            wandb.teardown()

    def close(self) -> None:
        if not self.enabled:
            return
        self.file.close()
        if self.bar is not None:
            self._redirect.close()
            self.bar.close()
        self._wandb("finish", lambda run: run.finish())
        if self.tensorboard is not None:
            self.tensorboard.close()
