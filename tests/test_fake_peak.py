"""``FakePeak`` (adm_megatron/memory/fake_peak.py), the count the planner uses for ADP's pixel branch:

- on fake tensors it gives the peak the real-tensor run gives, through forward and backward;
- at the published architectures (CogVideoX's and SD3's VAE decoders, SAM ViT-B and DINOv2-B, each
  plain and with ``distill.pixel_recompute``) it is within 15% of the committed measurements made
  with torch.profiler on real tensors (docs/bench/pixel_branch_memory.json, written by
  tools/pixel_branch_memory.py), in seconds instead of minutes;
- a weight's view (a linear's transposed weight) or an in-place result allocates nothing.
"""

from __future__ import annotations

import json
import os
import sys

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from adm_megatron.memory.fake_peak import FakePeak
from adm_megatron.memory.measure import peak_during

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tools"))
import pixel_branch_memory as published  # noqa: E402  (the architectures the measurements used)

RECORD = json.load(open(os.path.join(ROOT, "docs", "bench", "pixel_branch_memory.json")))
MEASURED = {(r["component"], r["recompute"]): r for r in RECORD["rows"]}


def _conv_net():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Conv2d(3, 16, 3, padding=1), torch.nn.SiLU(), torch.nn.GroupNorm(4, 16),
                               torch.nn.Conv2d(16, 8, 3, padding=1)).requires_grad_(False)


def _forward_backward(net, x):
    net(x).square().sum().backward()


def test_fake_tensors_give_the_real_tensors_peak_and_the_profilers():
    net = _conv_net()
    x = torch.randn(2, 3, 32, 32, requires_grad=True)
    with FakePeak() as real:
        _forward_backward(net, x)
    x.grad = None
    profiled = peak_during(lambda: _forward_backward(net, x))
    with FakeTensorMode():
        fake_net = _conv_net()
        fake_x = torch.randn(2, 3, 32, 32, requires_grad=True)
        with FakePeak() as fake:
            _forward_backward(fake_net, fake_x)
    assert fake.peak == real.peak > 0
    # the profiler also sees the CPU convolutions' backward workspaces, which are no tensors' storage
    assert abs(real.peak / profiled - 1) <= 0.15, (real.peak, profiled)


def test_views_and_in_place_results_of_uncounted_tensors_allocate_nothing():
    weight = torch.randn(64, 64)
    x = torch.randn(8, 64)
    with FakePeak() as peak:
        weight.t()
        x.mul_(2)
    assert peak.peak == 0
    with FakePeak() as peak:
        y = x @ weight.t()
    assert peak.peak == y.numel() * 4


@pytest.mark.parametrize("component, recompute", sorted(MEASURED), ids=lambda v: str(v).replace(" ", "-"))
def test_published_architectures_are_within_15_percent_of_the_profiled_measurements(component, recompute):
    """The tool's own runs (tools/pixel_branch_memory.py), counted on fake tensors as it counts them."""
    assert RECORD["mode"] == "fp32"  # as counted here
    measured = MEASURED[(component, recompute)]
    name = component.split()[0]
    if "VAE" in component:
        run_on = lambda fake: published.vae_run(name, tuple(measured["probe_latents"]), recompute,  # noqa: E731
                                                "cpu", "none", fake, {})
    else:
        run_on = lambda fake: published.encoder_run(name, recompute, measured["image_size"], "cpu",  # noqa: E731
                                                    "none", fake, {})
    counted = published.peak_of(run_on, counted=True)
    assert abs(counted / measured["peak_bytes"] - 1) <= 0.15, (component, recompute, counted, measured["peak_bytes"])
