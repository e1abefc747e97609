"""What a run's end leaves in ``output_dir`` besides its checkpoints: the export (``generator/``, a LoRA
generator's ``generator_lora/``) and the end's samples (the files at the top of ``samples/``; the
periodic samples live in ``samples/iter_NNNNNNN/``).

A finished run started again with a larger ``train.max_iterations`` ends a second time, perhaps with
other output settings (``train.export``, ``train.export_lora``, ``train.num_samples``, the sample
format), which a resume may change. What the earlier end wrote and this one does not write would
otherwise stay beside this end's outputs -- a ``generator/`` of the earlier iteration under a run
that now exports none, a ``sample-001.gif`` beside a new ``sample-000.gif`` -- and read as this end's.
:func:`clear_earlier_end` removes them before this end writes its own.
"""

from __future__ import annotations

import logging
import os
import shutil

from adm_megatron.train.samples import sample_dir

logger = logging.getLogger("adm_megatron")

EXPORT_DIRS = ("generator", "generator_lora")


def clear_earlier_end(output_dir: str) -> list[str]:
    """Rank 0, at the end of a run before its export and samples: remove an earlier end's export
    directories and end samples; returns what was removed (paths relative to ``output_dir``)."""
    removed = []
    for name in EXPORT_DIRS:
        path = os.path.join(output_dir, name)
        if os.path.isdir(path):
            shutil.rmtree(path)
            removed.append(name)
    samples = sample_dir(output_dir, None)
    if os.path.isdir(samples):
        for name in sorted(os.listdir(samples)):
            path = os.path.join(samples, name)
            if os.path.isfile(path):  # the end's files; iter_NNNNNNN/ directories are the periodic samples
                os.remove(path)
                removed.append(os.path.join("samples", name))
    if removed:
        logger.info("removed what the run's earlier end wrote, before this end writes its own: %s", ", ".join(removed))
    return removed
