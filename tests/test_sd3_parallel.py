"""Parallel layouts of the megatron SD3 equal the one-process model under gloo: TP=2, TP=2 + SP
(with recompute), CP=2, DP=2 (2 processes) for the SD3-Medium-style and the SD3.5-style (q/k RMSNorm,
whose per-head norm gradients are summed over TP) tiny configs, and TP=2 x CP=2 + SP (4 processes).

Each rank builds diffusers' model from the same directory as the one-process reference, and the
parallel model wrapped in megatron-core's DistributedDataParallel (``parallel_parity``). The text
has 7 tokens (an odd count: the text stream is never split over ranks); 8 x 12 latents give 24 image
tokens, 12 per CP rank, 6 per SP rank. Tolerance: 1e-5 relative per tensor (outputs, input
gradients, every weight gradient).
"""

from __future__ import annotations

import pytest

from multiproc import run_world
from parallel_parity import assert_close, check_layouts
from tiny_sd3 import save_diffusers_model

TOL = 1e-5
SIZE = (8, 12)
TWO_PROCESS_LAYOUTS = [  # (name, tp, cp, sequence_parallel, recompute)
    ("tp2", 2, 1, False, False),
    ("tp2-sp", 2, 1, True, True),
    ("cp2", 1, 2, False, False),
    ("dp2", 1, 1, False, False),
]
FOUR_PROCESS_LAYOUTS = [("tp2-cp2-sp", 2, 2, True, False)]


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    return {v: save_diffusers_model(v, str(root)) for v in ("sd3", "sd35")}


@pytest.mark.parametrize("variant", ["sd3", "sd35"])
def test_two_process_layouts_match_one_process(hf_dirs, variant):
    results = run_world(check_layouts, 2, "sd3", hf_dirs[variant], TWO_PROCESS_LAYOUTS, SIZE, TOL)
    assert_close(results, TOL)
    assert set(results[0]) == {name for name, *_ in TWO_PROCESS_LAYOUTS}


@pytest.mark.slow
def test_four_process_layout_matches_one_process(hf_dirs):
    results = run_world(check_layouts, 4, "sd3", hf_dirs["sd35"], FOUR_PROCESS_LAYOUTS, SIZE, TOL)
    assert_close(results, TOL)
