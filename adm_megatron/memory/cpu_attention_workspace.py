"""The CPU's transient memory of an attention backward, measured.

torch's CPU flash-attention kernel (what ``F.scaled_dot_product_attention`` runs on a CPU, the
trainer's ``model.attention_backend=default``) gives each intra-op thread a score block and its
gradient in fp32 for its backward, ``2 x qSplit x kvSplit`` elements with splits the kernel picks
by the sequence length (256 x 512 from 768 query tokens): 2 MiB with two threads, whatever the
batch -- more than a tiny run's batch-1 activations, and nothing a formula per token gives. So the
planner's CPU count (``Settings.device='cpu'``) runs one attention backward at the run's shapes
under torch's memory profiler, as ``cpu_conv_workspace`` does for the heads' convolutions. GPU
plans never call this: a fused GPU kernel's workspace (FlashAttention's fp32 query-gradient
accumulator) is per token, left to the backward working set and the margin.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from adm_megatron.memory.measure import peak_during


@functools.lru_cache(maxsize=None)
def attention_backward_workspace(batch: int, heads: int, q_tokens: int, kv_tokens: int, head_dim: int,
                                 threads: int) -> int:
    """Peak bytes one attention backward allocates, the query, key and value gradients it returns
    included, with ``threads`` intra-op threads; in the trainer's layout (``core_attention``: sbhd
    views of the fused QKV projection, permuted to bhsd, the output's gradient a permuted view)."""
    def views(tokens):
        return torch.randn(tokens, batch, heads, head_dim, requires_grad=True).permute(1, 2, 0, 3)

    q, k, v = views(q_tokens), views(kv_tokens), views(kv_tokens)
    out = F.scaled_dot_product_attention(q, k, v)
    grad = torch.ones(q_tokens, batch, heads, head_dim).permute(1, 2, 0, 3)
    return peak_during(lambda: torch.autograd.grad(out, [q, k, v], grad), threads)
