"""The memory planner's terms for SD3 / SD3.5 (``models/sd3_layer.py``, ``models/sd3_attention.py``),
counted from the ops of a joint block and checked by measurement (``tests/test_memory_plan.py``;
the per-block counts also with autograd's saved-tensor hooks on single blocks).

An SD3 block runs two streams, image and text, each through its own ops (adaLN modulation, norms,
QKV, output projection, MLP) with one joint attention; per token the two streams keep the same.
The text stream is whole on every tensor-parallel rank (``models/sd3.py``: sequence parallelism
splits the image tokens only), and a tapped feature is the image stream alone.

Per block and token of either stream (``row``: an ``h``-wide row, ``split``: one divided over TP):
- trainable network: ``2 e_r + 2 e_n + 4 e`` rows: block input and attention residual (the norms'
  inputs); norm1 / norm2 outputs (kept by the modulation's multiply); the two modulated inputs (the
  QKV and fc1 linears' inputs), the gated attention projection and MLP output; and ``12 split e``:
  q, k, v and the attention output, fc1 out 4 (the GELU's input), GELU out 4 (fc2's input);
- frozen network with grad through its input (its weights, hence the timestep embedding and the
  modulation, take none): ``2 e_r`` rows (the norms' inputs; a modulation or gate whose scale takes
  no grad keeps no input, a linear whose weight takes none neither) and ``8 split e`` (q, k, v,
  attention output, fc1 out); in the first block the text enters without grad: one ``e_r`` less,
  and no qk-norm terms;
- statistics (fp32): ``4 + a / TP`` per token (two norms' mean / rstd, the attention's log-sum-exp);
- SD3.5's qk-norm (RMSNorm on each stream's q and k): trainable ``5 split e`` more, frozen ``3``,
  and ``2 a / TP`` more statistics (the norms' rstd);
- SD3.5-Medium's dual-attention blocks (``attn2``, image tokens only): trainable ``2 e`` rows (its
  modulated input, its gated projection) and ``4 split e`` (q, k, v, output) more, frozen ``4 split
  e``, and ``a / TP`` more statistics;
- the last block (``context_pre_only``) keeps of its text stream only its input ``1 e_r``, when
  trainable its norm output ``1 e_n`` and modulated input ``1 e``, one more ``e`` row (measured, not
  traced to an op) and ``3 split e`` (q, k, v), with ``2 + a / TP`` statistics.

Working sets (measured on CPU with torch.profiler's memory profile of one call of the tiny 2-block
transformer, SD3 and SD3.5, 8x8 and 32x32 latents with 333 text tokens, B = 2; the same
coefficients for all): a forward without grad peaks at 10.9 to 13.6 rows per token, fitted as
``1 row + 7 split`` per image token (its residual, its share of the joint q / k / v, their
concatenated copies and the attention output) and ``2 row + 12 split`` per text token (the text
stream's MLP, which runs after the image stream's: its input, modulation and intermediates); a
frozen network's backward peaks 5.9 to 8.8 rows per token above what its forward saved, planned as
``7 split`` (CogVideoX's figure); a trainable one's ``2 split`` (as CogVideoX's; the phase tests
bound it).
The residual stream is fp32 under autocast: ``PatchEmbed`` adds its fp32 sin-cos table.
"""

from __future__ import annotations

from dataclasses import replace

from adm_megatron.memory.terms import ActivationTerms, BlockCounts, TokenCounts

STREAM = {
    "trainable": TokenCounts(residual=2, norm=2, act=4, split=12, stats=4, head_stats=1),
    "frozen": TokenCounts(residual=2, split=8, stats=4, head_stats=1),
}
QK_NORM = {"trainable": 5, "frozen": 3}  # split rows
DUAL_ATTENTION = {"trainable": (2, 4), "frozen": (0, 4)}  # (act rows, split rows) on image tokens
LAST_TEXT = {
    "trainable": TokenCounts(residual=1, norm=1, act=2, split=3, stats=2, head_stats=1),
    "frozen": TokenCounts(residual=1, act=1, split=3, stats=2, head_stats=1),
}


def _plus(counts: TokenCounts, act: float = 0, split: float = 0, head_stats: float = 0) -> TokenCounts:
    return replace(counts, act=counts.act + act, split=counts.split + split,
                   head_stats=counts.head_stats + head_stats)


def _block(index: int, arch) -> BlockCounts:
    image, text = {}, {}
    last = index == arch.num_layers - 1
    for kind in ("trainable", "frozen"):
        qk = (QK_NORM[kind], 2) if arch.qk_norm else (0, 0)
        image[kind] = _plus(STREAM[kind], split=qk[0], head_stats=qk[1])
        if kind == "frozen" and index == 0:  # the text enters without grad: its input and q / k norms keep nothing
            text[kind] = replace(STREAM[kind], residual=STREAM[kind].residual - 1)
        else:
            text[kind] = _plus(LAST_TEXT[kind] if last else STREAM[kind], split=qk[0], head_stats=qk[1])
        if index in arch.dual_attention_layers:
            act, split = DUAL_ATTENTION[kind]
            image[kind] = _plus(image[kind], act=act, split=split + qk[0], head_stats=1 + qk[1])
    return BlockCounts(image=image, text=text)


def sd3_memory_terms(arch) -> ActivationTerms:
    return ActivationTerms(
        blocks=tuple(_block(i, arch) for i in range(arch.num_layers)),
        joint_sequence=False,
        residual_fp32=True,
        no_grad={"image": TokenCounts(act=1, split=7), "text": TokenCounts(act=2, split=12)},
        backward={"trainable": 2, "frozen": 7},
    )
