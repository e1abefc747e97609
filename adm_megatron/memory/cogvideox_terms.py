"""The memory planner's terms for CogVideoX (``models/cogvideox_layer.py``), counted from its ops
and checked by measurement (``tests/test_memory_plan.py``). Text and video tokens form one joint
sequence that every op treats alike (and sequence parallelism splits whole), so a text token
counts as a video token.

Per block and token (``row``: an ``h``-wide row of the sequence-parallel slice, ``split``: one
divided over TP):
- trainable network (its params take grads): ``2 e_r + 2 e_n + 4 e`` rows: block input and
  attention residual; norm1 / norm2 outputs; the two modulated inputs, the attention projection and
  the MLP output; and ``14 split e``: fused QKV 3, q, k, attention output, fc1 + bias 4, GELU 4;
- frozen network with grad through its input (fake score and teacher in the generator phase):
  ``2 e_r`` rows and ``10 split e`` (a linear whose weight takes no grad saves no input);
- statistics (fp32): ``4 + 5 a / TP`` per token (norm mean / rstd, attention log-sum-exp).

Working sets (coefficients measured on CPU with ``measure.py`` on the tiny models): a forward
without grad ``5 row + 9 split`` (residual, normed, MLP intermediates); a backward ``2 split``
(trainable) or ``7 split`` (frozen). The residual stream is fp32 under autocast when an fp32
sin-cos position table is added to the embeddings (2b), bf16 with RoPE (5b).
"""

from __future__ import annotations

from adm_megatron.memory.terms import ActivationTerms, TokenCounts, uniform_blocks

TRAINABLE = TokenCounts(residual=2, norm=2, act=4, split=14, stats=4, head_stats=5)
FROZEN = TokenCounts(residual=2, split=10, stats=4, head_stats=5)


def cogvideox_memory_terms(arch) -> ActivationTerms:
    return ActivationTerms(
        blocks=uniform_blocks(arch.num_layers, {"trainable": TRAINABLE, "frozen": FROZEN}),
        joint_sequence=True,
        residual_fp32=not arch.use_rotary_positional_embeddings,
        no_grad=dict.fromkeys(("image", "text"), TokenCounts(act=5, split=9)),
        backward={"trainable": 2, "frozen": 7},
    )
