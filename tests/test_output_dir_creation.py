"""An output directory that cannot be created (under /proc, below a file) is refused in one line
naming it and the OS error, by the run lock every command takes (train, collect-ode, sample): it was
a FileNotFoundError traceback from the run lock, 9 s into a start. (os.access says yes to root
anywhere, so train's start checks cannot see /proc's refusal; the lock's first write does.)"""

from __future__ import annotations

import pytest

from adm_megatron.config import ConfigError, load_config
from adm_megatron.parallel.run_lock import RunLock


def test_the_run_lock_refuses_a_directory_it_cannot_create(tmp_path):
    (tmp_path / "afile").write_text("x")
    out = str(tmp_path / "afile" / "out")
    with pytest.raises(ConfigError) as err:
        RunLock(out, True, "--out", "collect-ode")
    assert str(err.value) == (f"--out={out!r}: cannot be created or written ([Errno 20] Not a directory: "
                              f"{out!r})")


def test_train_refuses_an_output_dir_under_proc_in_one_line():
    config = load_config(None, ["model.teacher=x", "output_dir=/proc/adm-megatron-test/run"])
    with pytest.raises(ConfigError, match=r"^output_dir='/proc/adm-megatron-test/run': cannot be created or "
                                          r"written \("):
        RunLock(config.output_dir, True)
