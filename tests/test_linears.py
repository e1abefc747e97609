"""models.linears: megatron's parallel linears run as one ``F.linear`` where a call communicates
nothing (one TP rank: the whole forward, megatron's identity regions and separate bias add
included), with megatron's results: outputs and gradients equal megatron's own layers
with the same weights (fp64, 1e-12), and the autograd graph is torch's addmm / mm, not megatron's
Python function. Calls that communicate (TP = 2, with and without SP) are covered by the parallel
parity tests (tests/test_cogvideox_parallel.py), which run through megatron's path."""

from __future__ import annotations

import pytest
import torch
from megatron.core.tensor_parallel import layers as megatron_layers

from adm_megatron.models import linears
from adm_megatron.models.cogvideox_config import CogVideoXArch
from adm_megatron.models.dit_config import make_transformer_config

TINY = dict(_class_name="CogVideoXTransformer3DModel", num_attention_heads=2, attention_head_dim=8, in_channels=4,
            out_channels=4, time_embed_dim=8, text_embed_dim=16, num_layers=1, sample_width=8,
            sample_height=8, sample_frames=9, patch_size=2, temporal_compression_ratio=4, max_text_seq_length=4)


def _pair(kind: str, config):
    ours_cls, megatron_cls = {"column": (linears.ColumnParallelLinear, megatron_layers.ColumnParallelLinear),
                              "row": (linears.RowParallelLinear, megatron_layers.RowParallelLinear)}[kind]
    extra = dict(gather_output=False) if kind == "column" else dict(input_is_parallel=True)
    built = []
    for cls in (ours_cls, megatron_cls):
        torch.manual_seed(0)
        built.append(cls(16, 24, config=config, init_method=torch.nn.init.normal_, bias=True,
                         skip_bias_add=False, is_expert=False, **extra))
    built[1].load_state_dict(built[0].state_dict())
    return built


@pytest.mark.parametrize("kind", ["column", "row"])
def test_single_rank_linear_is_torch_linear_with_megatrons_results(world_of_one, kind):
    config = make_transformer_config(CogVideoXArch.from_diffusers_config(TINY), params_dtype=torch.float64)
    ours, reference = _pair(kind, config)
    x = torch.randn(5, 2, 16, dtype=torch.float64)
    results = []
    for layer in (ours, reference):
        xi = x.clone().requires_grad_(True)
        out, bias = layer(xi)
        assert bias is None
        out.pow(2).sum().backward()
        results.append((out, xi.grad, layer.weight.grad, layer.bias.grad))
    for got, want in zip(*results):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    out, _ = ours(x.requires_grad_(True))
    names = _graph_nodes(out)
    assert not any("LinearWithGradAccumulation" in n for n in names), names
    # one rank: no identity region functions around the product, and the bias inside the GEMM
    assert not any("ModelParallelRegion" in n for n in names), names
    assert "AddmmBackward0" in names, names


@pytest.mark.parametrize("kind", ["column", "row"])
def test_single_rank_skip_bias_add_returns_the_bias_apart(world_of_one, kind):
    config = make_transformer_config(CogVideoXArch.from_diffusers_config(TINY), params_dtype=torch.float64)
    ours, reference = _pair(kind, config)
    ours.skip_bias_add = reference.skip_bias_add = True
    x = torch.randn(5, 2, 16, dtype=torch.float64)
    (out, bias), (want, want_bias) = ours(x), reference(x)
    assert bias is ours.bias and want_bias is reference.bias
    torch.testing.assert_close(out, want, rtol=1e-12, atol=1e-12)


def _graph_nodes(out: torch.Tensor) -> set[str]:
    seen, todo = set(), [out.grad_fn]
    while todo:
        node = todo.pop()
        if node is None or node.name() in seen:
            continue
        seen.add(node.name())
        todo.extend(f[0] for f in node.next_functions)
    return seen


def test_a_communicating_call_goes_to_megatron(world_of_one, monkeypatch):
    """With sequence parallelism flagged (as at TP > 1) the call is megatron's, whatever it does."""
    config = make_transformer_config(CogVideoXArch.from_diffusers_config(TINY), params_dtype=torch.float64)
    ours, _ = _pair("column", config)
    calls = []
    monkeypatch.setattr(megatron_layers.ColumnParallelLinear, "_forward_impl",
                        lambda self, input, weight, *a, **k: calls.append(k) or input @ weight.t())
    ours._forward_impl(torch.randn(3, 2, 16, dtype=torch.float64), ours.weight, bias=None,
                       gradient_accumulation_fusion=False, allreduce_dgrad=False, sequence_parallel=True)
    ours._forward_impl(torch.randn(3, 2, 16, dtype=torch.float64), ours.weight, bias=None,
                       gradient_accumulation_fusion=False, allreduce_dgrad=True, sequence_parallel=False)
    assert [c["sequence_parallel"] for c in calls] == [True, False]
    assert [c["allreduce_dgrad"] for c in calls] == [False, True]
