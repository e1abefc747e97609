"""Analytic model FLOPs of the families' transformers (a multiply-add counts 2; recompute excluded).

Each family's spec names its formula (``ModelFamily.call_flops``); a formula takes the latent
tensor's shape, the text length, how many blocks run and whether the output layer does.

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

Backward: the linear layers' input gradients cost one more forward's linear work and their
weight gradients another (only for trainable weights); attention's backward costs twice its
forward (dQ, dK from dS; dV, dS from dO). So a trainable network costs 3x its forward, a frozen
one that passes gradients to its input ``2·linear + 3·attention``, and one under ``no_grad`` 1x.
The discriminator heads' convolutions, norms and elementwise work are not counted.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class CallFlops:
    """Forward FLOPs of one call, split by how their backward scales."""

    linear: float
    attention: float

    def total(self, grad_to_input: bool, trainable: bool) -> float:
        """Forward plus the backward this call takes (see the module docstring)."""
        if not (grad_to_input or trainable):
            return self.linear + self.attention
        return self.linear * (3 if trainable else 2) + self.attention * 3


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
