"""Parallel layouts of the megatron SD3 equal the one-process model under gloo: TP=2, TP=2 + SP
(with recompute), CP=2, DP=2 (2 processes) for the SD3-Medium-style and the SD3.5-style tiny configs
(the SD3.5-Medium style: q/k RMSNorm in both streams, whose per-head norm gradients are summed over
TP, and dual attention, a second image-only attention), and TP=2 x CP=2 + SP (4 processes).
A megatron-core distributed checkpoint saved at TP=2 + SP loads bit-exactly at CP=2 and at TP=2.

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
    return {v: save_diffusers_model(v, str(root)) for v in ("sd3", "sd35m")}


@pytest.mark.parametrize("variant", ["sd3", "sd35m"])
def test_two_process_layouts_match_one_process(hf_dirs, variant):
    results = run_world(check_layouts, 2, "sd3", hf_dirs[variant], TWO_PROCESS_LAYOUTS, SIZE, TOL)
    assert_close(results, TOL)
    assert set(results[0]) == {name for name, *_ in TWO_PROCESS_LAYOUTS}


def _save_and_reload(hf_dir: str, ckpt_dir: str) -> dict:
    """Save at TP=2 + SP, load into a randomly initialised model at TP=1 x CP=2 and at TP=2; per
    loading layout, the tensors that differ from the diffusers weights before and after loading."""
    import torch
    from megatron.core import dist_checkpointing

    from adm_megatron.convert.checkpoint import sharded_state_dict
    from adm_megatron.convert.sd3_mapping import hf_to_megatron
    from adm_megatron.models import SD3Arch, build_sd3_model, build_model_from_hf, read_diffusers_weights
    from adm_megatron.models.weights import gather_full_state_dict
    from adm_megatron.parallel import destroy_parallel, initialize_parallel

    arch = SD3Arch.from_pretrained_dir(hf_dir)
    expected = hf_to_megatron(read_diffusers_weights(hf_dir), arch.num_attention_heads)
    initialize_parallel(tensor_parallel=2, context_parallel=1, seed=7)
    dist_checkpointing.save(sharded_state_dict(build_model_from_hf(hf_dir, sequence_parallel=True)), ckpt_dir)
    destroy_parallel()
    differing = {}
    for tp, cp in ((1, 2), (2, 1)):
        initialize_parallel(tensor_parallel=tp, context_parallel=cp, seed=11)
        model = build_sd3_model(arch)
        before = gather_full_state_dict(model)
        model.load_state_dict(dist_checkpointing.load(sharded_state_dict(model), ckpt_dir), strict=True)
        after = gather_full_state_dict(model)
        differing[f"tp{tp}-cp{cp}"] = [
            sum(not torch.equal(state[k], expected[k]) for k in expected) for state in (before, after)
        ]
        destroy_parallel()
    return differing


@pytest.mark.slow
def test_distributed_checkpoint_saved_at_tp2_loads_at_cp2_and_tp2(hf_dirs, tmp_path):
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    for rank_result in run_world(_save_and_reload, 2, hf_dirs["sd35m"], str(ckpt)):
        for layout, (before, after) in rank_result.items():
            assert before > 30 and after == 0, (layout, before, after)


@pytest.mark.slow
def test_four_process_layout_matches_one_process(hf_dirs):
    results = run_world(check_layouts, 4, "sd3", hf_dirs["sd35m"], FOUR_PROCESS_LAYOUTS, SIZE, TOL)
    assert_close(results, TOL)
