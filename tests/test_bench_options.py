"""``adm-megatron bench``'s plain flags refused in one line before anything is built: a peak that is
not a finite positive number (``inf`` ran the whole benchmark and reported an MFU of 0.0%) and a seed
train would refuse (a negative one was taken)."""

from __future__ import annotations

import pytest

from adm_megatron.bench.run import BenchOptions, check_options


@pytest.mark.parametrize("changes, message", [
    ({"peak_tflops": float("inf")}, "--peak-tflops=inf: expected > 0 and finite"),
    ({"peak_tflops": float("nan")}, "--peak-tflops=nan: expected > 0 and finite"),
    ({"seed": -1}, r"--seed=-1: expected an integer in [0, 2**63 - 1]"),
    ({"seed": 2**63}, f"--seed={2**63}: expected an integer in [0, 2**63 - 1]"),
])
def test_a_flag_out_of_range_is_refused(changes, message):
    with pytest.raises(ValueError) as err:
        check_options(BenchOptions(model="cogvideox-2b", **changes))
    assert str(err.value) == message


def test_the_edges_are_taken():
    check_options(BenchOptions(model="cogvideox-2b", peak_tflops=989.0, seed=0))
    check_options(BenchOptions(model="cogvideox-2b", seed=2**63 - 1))
