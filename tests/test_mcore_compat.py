"""adm_megatron/mcore_compat.py: the choices it makes between megatron-core releases, checked on
whichever release is installed (the end-to-end paths are in test_background_save, test_resume and
test_convert_checkpoint)."""

from __future__ import annotations

import json
import logging

import pytest

from adm_megatron import mcore_compat


def _checkpoint(tmp_path, config: dict | None) -> str:
    if config is not None:
        (tmp_path / "metadata.json").write_text(json.dumps(config))
    return str(tmp_path)


def test_the_common_state_layout_is_read_from_metadata_json(tmp_path):
    older = {"sharded_backend": "torch_dist", "sharded_backend_version": 1, "common_backend": "torch",
             "common_backend_version": 1}  # megatron-core up to 0.18
    newer = {"sharded_backend": "torch_dist", "sharded_backend_version": 1}  # 0.19 on
    for name in "abc":
        (tmp_path / name).mkdir()
    # no metadata.json: counted as the older layout (the damage checks name the missing file)
    assert mcore_compat.common_state_in_file(_checkpoint(tmp_path / "a", None))
    assert mcore_compat.common_state_in_file(_checkpoint(tmp_path / "b", older))
    assert not mcore_compat.common_state_in_file(_checkpoint(tmp_path / "c", newer))


@pytest.mark.parametrize("reads_newer", [True, False])
def test_a_newer_layout_is_refused_in_one_line_only_where_it_cannot_be_read(tmp_path, monkeypatch, reads_newer):
    monkeypatch.setattr(mcore_compat, "reads_common_state_in_shards", lambda: reads_newer)
    older = _checkpoint(tmp_path, {"sharded_backend": "torch_dist", "common_backend": "torch"})
    assert mcore_compat.unreadable_layout(older) is None
    (tmp_path / "n").mkdir()
    newer = _checkpoint(tmp_path / "n", {"sharded_backend": "torch_dist"})
    problem = mcore_compat.unreadable_layout(newer)
    if reads_newer:
        assert problem is None
    else:
        assert problem.startswith(f"{newer}: written by megatron-core 0.19 or later") and "\n" not in problem


def test_the_installed_release_is_described_consistently():
    """What the installed megatron-core is asked to do agrees with what it has."""
    import dataclasses
    import inspect

    from megatron.core.dist_checkpointing import serialization
    from megatron.core.dist_checkpointing.core import CheckpointingConfig

    has_strategy = "async_strategy" in inspect.signature(serialization.save).parameters
    assert mcore_compat.async_save_kwargs() == ({"async_strategy": "mcore"} if has_strategy else {})
    fields = {f.name for f in dataclasses.fields(CheckpointingConfig)}
    assert mcore_compat.reads_common_state_in_shards() == ("common_backend" not in fields)
    assert mcore_compat.write_results_queue() is mcore_compat.write_results_queue()  # one queue, made once


@pytest.mark.parametrize("logger, notice", [
    ("torch.utils.cpp_extension", "No CUDA runtime is found, using CUDA_HOME='/usr/local/cuda'"),
    # what importing diffusers prints where torchao is installed (model.fp8's torchao recipes need neither)
    ("torchao", "Skipping import of cpp extensions due to incompatible torch version 2.13.0+cpu for torchao"),
    ("torchao.kernel.intmm", "Warning: Detected no triton, on systems without Triton certain kernels will not work"),
])
def test_the_import_notices_are_dropped_and_nothing_else(logger, notice, caplog):
    mcore_compat.quiet_import_notices()
    mcore_compat.quiet_import_notices()  # idempotent: one filter
    log = logging.getLogger(logger)
    assert sum(isinstance(f, mcore_compat._DropNotices) for f in log.filters) == 1
    with caplog.at_level(logging.WARNING, logger=logger):
        log.warning(notice)
        log.warning("something else")
    assert [r.getMessage() for r in caplog.records] == ["something else"]
