"""Adaptive LayerNorm (adaLN) modulation of the DiT blocks; megatron-core has no counterpart.

CogVideoX: ``AdaLNZero`` is diffusers' ``CogVideoXLayerNormZero``: one ``linear`` on ``silu(temb)``
gives six chunks (shift, scale, gate for video tokens; the same three for text tokens) and a shared
``norm``. ``AdaLNOut`` is diffusers' ``AdaLayerNorm`` used as ``norm_out`` (chunks shift, scale).

SD3 (one modulation per stream): ``StreamAdaLNZero`` is diffusers' ``AdaLayerNormZero`` (chunks
shift, scale, gate of the attention, then of the MLP); ``AdaLNContinuous`` is diffusers'
``AdaLayerNormContinuous`` (chunks scale, shift), SD3's ``norm_out`` and the last block's
``norm1_context``; with ``dual=True`` ``StreamAdaLNZero`` is ``SD35AdaLayerNormZeroX``.

Names match the diffusers checkpoint keys.

The modulation is computed from the timestep embedding, which every tensor-parallel rank holds
whole. Under sequence parallelism each rank applies it to its own slice of tokens only, so the
gradient of the modulation is a partial sum per rank; it is all-reduced over the tensor-parallel
group on the (tiny) modulation tensor itself (megatron's ``copy_to_tensor_model_parallel_region``:
identity forward, all-reduce backward), which keeps the linear and the time embedding exact without
tagging their much larger weights.

A rank's token slice is ``[text; video]`` with the text/video boundary at ``n_text`` (0 or the
whole slice when the boundary falls on another rank), see ``TokenLayout``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core.tensor_parallel.mappings import copy_to_tensor_model_parallel_region
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig

from adm_megatron.models.norms import LayerNorm
from adm_megatron.models.rows import split_rows


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x [s, b, h] * (1 + scale[b, h]) + shift[b, h]."""
    return x * (1 + scale) + shift


def _by_segment(x: torch.Tensor, n_text: int, text: tuple, video: tuple, fn) -> torch.Tensor:
    """Apply ``fn(x_part, *args)`` to the text rows [:n_text] and video rows [n_text:] of x."""
    if n_text == 0:
        return fn(x, *video)
    if n_text == x.shape[0]:
        return fn(x, *text)
    text_rows, video_rows = split_rows(x, n_text)
    return torch.cat([fn(text_rows, *text), fn(video_rows, *video)], dim=0)


class _Modulation(MegatronModule):
    """silu(temb) -> Linear -> ``num_chunks`` tensors of [b, hidden]."""

    def __init__(self, config: TransformerConfig, cond_dim: int, num_chunks: int):
        super().__init__(config=config)
        self.num_chunks = num_chunks
        self.linear = torch.nn.Linear(
            cond_dim, num_chunks * config.hidden_size, dtype=config.params_dtype
        )

    def chunks(self, temb: torch.Tensor) -> tuple[torch.Tensor, ...]:
        mod = self.linear(F.silu(temb))
        if self.config.sequence_parallel:
            mod = copy_to_tensor_model_parallel_region(mod)
        return mod.chunk(self.num_chunks, dim=1)


class AdaLNZero(_Modulation):
    """diffusers ``CogVideoXLayerNormZero`` on a [s, b, h] slice of joint [text; video] tokens."""

    def __init__(self, config: TransformerConfig, cond_dim: int, elementwise_affine: bool = True):
        super().__init__(config, cond_dim, num_chunks=6)
        self.norm = LayerNorm(config, config.hidden_size, elementwise_affine=elementwise_affine)

    def forward(self, x: torch.Tensor, temb: torch.Tensor, n_text: int):
        """Returns the modulated normed tokens and a function adding ``gate * update`` to x."""
        shift, scale, gate, enc_shift, enc_scale, enc_gate = self.chunks(temb)
        normed = _by_segment(self.norm(x), n_text, (enc_shift, enc_scale), (shift, scale), modulate)

        def gated_residual(residual: torch.Tensor, update: torch.Tensor) -> torch.Tensor:
            return residual + _by_segment(update, n_text, (enc_gate,), (gate,), torch.mul)

        return normed, gated_residual


class AdaLNOut(_Modulation):
    """diffusers ``AdaLayerNorm`` (``norm_out``, chunk order shift, scale) on [s, b, h] tokens."""

    scale_first = False

    def __init__(
        self, config: TransformerConfig, cond_dim: int, elementwise_affine: bool = True,
        eps: float | None = None,
    ):
        super().__init__(config, cond_dim, num_chunks=2)
        self.norm = LayerNorm(config, config.hidden_size, eps=eps, elementwise_affine=elementwise_affine)

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        first, second = self.chunks(temb)
        shift, scale = (second, first) if self.scale_first else (first, second)
        return modulate(self.norm(x), shift, scale)


class AdaLNContinuous(AdaLNOut):
    """diffusers ``AdaLayerNormContinuous`` (chunk order scale, shift) on [s, b, h] tokens."""

    scale_first = True


class StreamAdaLNZero(_Modulation):
    """diffusers ``AdaLayerNormZero`` on one stream's [s, b, h] tokens (SD3 / MMDiT blocks), or with
    ``dual=True`` ``SD35AdaLayerNormZeroX`` (three more chunks: shift, scale, gate of the second,
    image-only attention of SD3.5-Medium's dual-attention blocks).

    Returns the attention input (normed, shifted and scaled) and the attention gate, the MLP shift,
    scale and gate, in diffusers' order; with ``dual`` also the second attention's input and gate."""

    def __init__(self, config: TransformerConfig, cond_dim: int, eps: float | None = None, dual: bool = False):
        super().__init__(config, cond_dim, num_chunks=9 if dual else 6)
        self.norm = LayerNorm(config, config.hidden_size, eps=eps, elementwise_affine=False)

    def forward(self, x: torch.Tensor, temb: torch.Tensor):
        shift, scale, gate, shift_mlp, scale_mlp, gate_mlp, *second = self.chunks(temb)
        normed = self.norm(x)
        mlp = (gate, shift_mlp, scale_mlp, gate_mlp)
        if not second:
            return modulate(normed, shift, scale), mlp
        shift2, scale2, gate2 = second
        return modulate(normed, shift, scale), mlp, (modulate(normed, shift2, scale2), gate2)
