"""Analytic model FLOPs of the families' transformers (a multiply-add counts 2; recompute excluded).

Each family's spec names its formulas (``ModelFamily.call_flops``, and ``lora_flops`` for LoRA
adapters); a formula takes the latent tensor's shape, the text length, how many blocks run and
whether the output layer does (the adapters' formula: which adapters there are instead).

**CogVideoX** (``cogvideox_call_flops``). Per sample, with ``S = Lt + Lv`` tokens (``Lt`` text,
``Lv = F * H/p * W/p`` video), hidden ``d``, FFN ``4d`` and a per-block time embedding of width
``e``, each block does

- linear work ``2 S (3d·d + d·d + 2·4d·d) + 2·2·e·6d = 24 S d² + 24 e d`` (fused QKV, output
  projection, the two MLP matrices, the two adaLN modulations);
- attention work ``4 S² d`` (Q·Kᵀ and P·V over the joint [text; video] sequence).

Outside the blocks: the time embedding ``2 (d e + e e)``, the patch embedding ``2 Lv (C p²) d`` and
text projection ``2 Lt D d``, and for a full forward the output projection ``2 Lv d (p² C_out)`` and
``norm_out``'s modulation ``2 e 2d`` (diffusers projects the video rows only; our model also
projects the text rows under sequence parallelism, ``2 Lt d p² C_out`` more, not counted).

**SD3 / SD3.5 MMDiT** (``sd3_call_flops``). Per sample, ``Li = H/p * W/p`` image and ``Lt`` text
tokens, hidden ``d`` (the time-and-pooled embedding is ``d`` wide too), each block does

- per stream of ``L`` tokens ``24 L d²`` (QKV, output projection, MLP) and its adaLN-zero
  modulation ``2·d·6d``; the last block's text stream (``context_pre_only``) only its QKV,
  ``6 Lt d²``, and a 2-chunk modulation ``2·d·2d``;
- attention ``4 (Li + Lt)² d`` over the joint sequence;
- SD3.5-Medium's dual-attention blocks also an image-only attention: ``8 Li d²`` (QKV, output
  projection), ``4 Li² d``, and 3 more modulation chunks ``2·d·3d``.

Outside the blocks: the patch embedding ``2 Li (C p²) d``, the context embedder ``2 Lt D d``, the
timestep embedder ``2 (256 d + d d)`` and the pooled-text embedder ``2 (Dp d + d d)``; for a full
forward ``norm_out``'s modulation ``2·d·2d`` and the output projection ``2 Li d (p² C_out)``.

A features-only call (a discriminator backbone) runs the blocks up to the last tapped one and no
output layer.

**LoRA adapters** (``ModelFamily.lora_flops``: ``cogvideox_lora_flops``, ``sd3_lora_flops``). An
adapter of rank ``r`` on a linear of whole input width ``in`` and output width ``out`` computes
``B (A x)``: over the ``rows`` tokens that pass through the linear, ``2 rows r (in + out)`` forward
(the scaling and the sum with the base output are elementwise, not counted). Whole-model FLOPs, the
same at any TP / SP / CP layout. The rows are the family's: CogVideoX's block linears see the joint
sequence, ``S = Lt + Lv``; SD3's image-stream linears (``attn.to_q/to_k/to_v``, ``attn.to_out.0``,
``attn2.*``, ``ff.*``) the image tokens ``Li``, its context-stream linears (``attn.add_q_proj /
add_k_proj / add_v_proj``, ``attn.to_add_out``, ``ff_context.*``; megatron's ``linear_added_qkv``,
``linear_added_proj``, ``mlp_context.*``) the text tokens ``Lt``. A features-only call counts the adapters of the blocks it runs only. Adapters are linear work
(``CallFlops.adapters``) whose backward follows their own trainability.

Backward: the linear layers' input gradients cost one more forward's linear work and their
weight gradients another (only for trainable weights); attention's backward costs twice its
forward (dQ, dK from dS; dV, dS from dO). So a trainable network costs 3x its forward, a frozen
one that passes gradients to its input ``2·linear + 3·attention``, and one under ``no_grad`` 1x.
A LoRA network (base frozen, adapters trainable) passes gradients through every block to reach
the adapters of the earlier ones, with no weight gradient of a base linear:
``2·linear + 3·attention + 3·adapters``.
The discriminator heads' convolutions, norms and elementwise work are not counted.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable


@dataclass(frozen=True)
class CallFlops:
    """Forward FLOPs of one call, split by how their backward scales: the base linears, attention,
    and the LoRA adapters (linear work too, but trainable apart from the base weights)."""

    linear: float
    attention: float
    adapters: float = 0.0

    def total(self, grad_to_input: bool, trainable: bool, adapters_trainable: bool = False) -> float:
        """Forward plus the backward this call takes (see the module docstring): ``trainable`` says
        whether the base weights train, ``adapters_trainable`` whether LoRA adapters do (either
        makes gradients flow through the whole network, as a gradient to the input does)."""
        if not (grad_to_input or trainable or adapters_trainable):
            return self.linear + self.attention + self.adapters
        return (self.linear * (3 if trainable else 2) + self.attention * 3
                + self.adapters * (3 if adapters_trainable else 2))


@dataclass(frozen=True)
class AdaptedLinear:
    """One LoRA-adapted linear as the adapter formulas read it: its module path in the megatron
    model (``blocks.<i>.<layer>``), its whole input / output widths and the adapter's rank."""

    path: str
    in_features: int
    out_features: int
    rank: int


def _block_layer(path: str) -> tuple[int, str]:
    """``blocks.3.mlp.linear_fc1`` -> (3, ``mlp.linear_fc1``); ValueError for a linear outside the blocks."""
    match = re.fullmatch(r"blocks\.(\d+)\.(.+)", path)
    if match is None:
        raise ValueError(f"LoRA adapter on {path}: no FLOP formula for an adapter outside the transformer blocks")
    return int(match.group(1)), match.group(2)


def adapter_flops(layers, rows_of: Callable[[str], tuple[int, int]], blocks: int) -> float:
    """Forward FLOPs of the adapters of ``layers`` (:class:`AdaptedLinear`) in blocks below ``blocks``
    for one sample: ``2 rows r (in + out)`` each, ``rows_of(path)`` giving (block index, rows)."""
    total = 0
    for layer in layers:
        block, rows = rows_of(layer.path)
        if block < blocks:
            total += 2 * rows * layer.rank * (layer.in_features + layer.out_features)
    return float(total)


def cogvideox_call_flops(arch, latent_shape: tuple, text_len: int, blocks: int | None = None,
                         output_layer: bool = True) -> CallFlops:
    """Forward FLOPs of one CogVideoX call on latents of ``latent_shape`` [B, F, C, H, W] with
    ``text_len`` text tokens, running ``blocks`` blocks (default all) and the output layer."""
    batch, frames, _, height, width = latent_shape
    p, d, e = arch.patch_size, arch.hidden_size, arch.time_embed_dim
    blocks = arch.num_layers if blocks is None else blocks
    video = frames * (height // p) * (width // p)
    seq = text_len + video
    linear = blocks * (24 * seq * d * d + 24 * e * d)
    linear += 2 * (d * e + e * e) + 2 * video * arch.in_channels * p * p * d + 2 * text_len * arch.text_embed_dim * d
    if output_layer:
        linear += 2 * video * d * p * p * arch.out_channels + 4 * e * d
    attention = blocks * 4 * seq * seq * d
    return CallFlops(linear=float(batch * linear), attention=float(batch * attention))


SD3_TIMESTEP_CHANNELS = 256  # diffusers' Timesteps(num_channels=256) in SD3's time-and-text embedding


def sd3_call_flops(arch, latent_shape: tuple, text_len: int, blocks: int | None = None,
                   output_layer: bool = True) -> CallFlops:
    """Forward FLOPs of one SD3 / SD3.5 call on latents of ``latent_shape`` [B, C, H, W] with
    ``text_len`` text tokens, running ``blocks`` blocks (default all) and the output layer."""
    batch, _, height, width = latent_shape
    p, d = arch.patch_size, arch.hidden_size
    blocks = arch.num_layers if blocks is None else blocks
    image = (height // p) * (width // p)
    seq = image + text_len
    linear = attention = 0
    for index in range(blocks):
        last = index == arch.num_layers - 1  # context_pre_only: the text stream only feeds the attention
        linear += 24 * image * d * d + 2 * d * 6 * d
        linear += 6 * text_len * d * d + 2 * d * 2 * d if last else 24 * text_len * d * d + 2 * d * 6 * d
        attention += 4 * seq * seq * d
        if index in arch.dual_attention_layers:
            linear += 8 * image * d * d + 2 * d * 3 * d
            attention += 4 * image * image * d
    linear += 2 * image * arch.in_channels * p * p * d + 2 * text_len * arch.joint_attention_dim * d
    linear += 2 * (SD3_TIMESTEP_CHANNELS * d + d * d) + 2 * (arch.pooled_projection_dim * d + d * d)
    if output_layer:
        linear += 2 * d * 2 * d + 2 * image * d * p * p * arch.out_channels
    return CallFlops(linear=float(batch * linear), attention=float(batch * attention))


def cogvideox_lora_flops(arch, latent_shape: tuple, text_len: int, layers, blocks: int | None = None) -> float:
    """Forward FLOPs of the LoRA adapters ``layers`` (:class:`AdaptedLinear`) in one CogVideoX call
    (arguments as :func:`cogvideox_call_flops`): every block linear sees the joint sequence."""
    batch, frames, _, height, width = latent_shape
    seq = text_len + frames * (height // arch.patch_size) * (width // arch.patch_size)

    def rows_of(path: str) -> tuple[int, int]:
        return _block_layer(path)[0], seq

    return batch * adapter_flops(layers, rows_of, arch.num_layers if blocks is None else blocks)


# the megatron names of an SD3 block's linears, by the tokens they see
SD3_IMAGE_LINEARS = frozenset({"attention.linear_qkv", "attention.linear_proj", "attention2.linear_qkv",
                               "attention2.linear_proj", "mlp.linear_fc1", "mlp.linear_fc2"})
SD3_TEXT_LINEARS = frozenset({"attention.linear_added_qkv", "attention.linear_added_proj",
                              "mlp_context.linear_fc1", "mlp_context.linear_fc2"})


def sd3_lora_flops(arch, latent_shape: tuple, text_len: int, layers, blocks: int | None = None) -> float:
    """Forward FLOPs of the LoRA adapters ``layers`` (:class:`AdaptedLinear`) in one SD3 / SD3.5 call
    (arguments as :func:`sd3_call_flops`): the image stream's linears see the image tokens, the
    context stream's the text tokens."""
    batch, _, height, width = latent_shape
    image = (height // arch.patch_size) * (width // arch.patch_size)

    def rows_of(path: str) -> tuple[int, int]:
        block, layer = _block_layer(path)
        if layer in SD3_IMAGE_LINEARS:
            return block, image
        if layer in SD3_TEXT_LINEARS:
            return block, text_len
        raise ValueError(f"LoRA adapter on {path}: not a linear of an SD3 block's image or context stream")

    return batch * adapter_flops(layers, rows_of, arch.num_layers if blocks is None else blocks)
