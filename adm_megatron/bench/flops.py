"""Analytic model FLOPs of the CogVideoX transformer (a multiply-add counts 2; recompute excluded).

Per sample, with ``S = Lt + Lv`` tokens (``Lt`` text, ``Lv = F * H/p * W/p`` video), hidden ``d``,
FFN ``4d`` and a per-block time embedding of width ``e``, each block does

- linear work ``2 S (3d·d + d·d + 2·4d·d) + 2·2·e·6d = 24 S d² + 24 e d`` (fused QKV, output
  projection, the two MLP matrices, the two adaLN modulations);
- attention work ``4 S² d`` (Q·Kᵀ and P·V over the joint [text; video] sequence).

Outside the blocks: the time embedding ``2 (d e + e e)``, the patch embedding ``2 Lv (C p²) d`` and
text projection ``2 Lt D d``, and for a full forward the output projection ``2 Lv d (p² C_out)`` and
``norm_out``'s modulation ``2 e 2d`` (diffusers projects the video rows only; our model also
projects the text rows under sequence parallelism, ``2 Lt d p² C_out`` more, not counted). A features-only call (a discriminator backbone) runs the
blocks up to the last tapped one and no output layer.

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


def dit_call_flops(arch, batch: int, frames: int, height: int, width: int, text_len: int,
                   blocks: int | None = None, output_layer: bool = True) -> CallFlops:
    """Forward FLOPs of one call on ``batch`` samples of [frames, C, height, width] latents with
    ``text_len`` text tokens, running ``blocks`` blocks (default all) and the output layer."""
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
