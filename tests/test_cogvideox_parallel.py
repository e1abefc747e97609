"""Parallel layouts of the megatron CogVideoX equal the one-process model under gloo: TP=2,
TP=2 + SP, CP=2, DP=2 (2 processes) and TP=2 x CP=2 with and without SP, TP=2 x DP=2 (4 processes).

Each rank builds diffusers' model from the same directory as the one-process reference, and the
parallel model wrapped in megatron-core's DistributedDataParallel (``parallel_parity``). Tolerance:
1e-5 relative per tensor (outputs, input gradients, every weight gradient).
"""

from __future__ import annotations

import pytest

from multiproc import run_world
from parallel_parity import assert_close, check_layouts
from tiny_cogvideox import save_diffusers_model

TOL = 1e-5
TWO_PROCESS_LAYOUTS = [  # (name, tp, cp, sequence_parallel, recompute)
    ("tp2", 2, 1, False, False),
    ("tp2-sp", 2, 1, True, True),
    ("cp2", 1, 2, False, False),
    ("dp2", 1, 1, False, False),
]
FOUR_PROCESS_LAYOUTS = [
    ("tp2-cp2", 2, 2, False, False),
    ("tp2-cp2-sp", 2, 2, True, False),
    ("tp2-dp2-sp", 2, 1, True, False),
]


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    return {v: save_diffusers_model(v, str(root)) for v in ("2b", "5b")}


@pytest.mark.parametrize("variant", ["2b", "5b"])
def test_two_process_layouts_match_one_process(hf_dirs, variant):
    # 3 frames x 4 x 6 latents -> 18 video tokens (+16 text): divisible as CP=2 / SP need
    results = run_world(check_layouts, 2, "cogvideox", hf_dirs[variant], TWO_PROCESS_LAYOUTS, (3, 4, 12), TOL)
    assert_close(results, TOL)


def test_four_process_layouts_match_one_process(hf_dirs):
    results = run_world(check_layouts, 4, "cogvideox", hf_dirs["5b"], FOUR_PROCESS_LAYOUTS, (2, 8, 8), TOL)
    assert_close(results, TOL)
