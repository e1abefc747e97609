"""What a model family tells the memory planner about its blocks: the activations one block saves
per token of each stream, and the working sets of a forward without grad and of a backward.

The planner's formulas (``plan.py``) are the same for every family; the counts are the family's,
derived from the ops of its block and checked by measurement. Each family module that lists the
``memory-plan`` tool gives ``memory_terms(arch) -> ActivationTerms`` (``cogvideox_terms.py``,
``sd3_terms.py`` state theirs in their docstrings).

Units: a count is a number of ``h``-wide rows per token of a stream (``h`` the hidden size), in
the width its kind says: ``residual`` rows in the residual stream's width ``e_r``, ``norm`` rows in
the norm outputs' width ``e_n`` (fp32 under autocast), ``act`` rows and ``split`` rows (divided
over tensor parallelism: the columns between the parallel linears) in the activation width ``e``;
``stats`` and ``head_stats`` are fp32 elements per token and per token and local head.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class TokenCounts:
    """What one block keeps per token of one stream."""

    residual: float = 0.0
    norm: float = 0.0
    act: float = 0.0
    split: float = 0.0
    stats: float = 0.0
    head_stats: float = 0.0


@dataclass(frozen=True)
class BlockCounts:
    """One block: per image (video) token and per text token; ``trainable`` when its weights take
    grads, ``frozen`` when only its input does."""

    image: dict  # kind -> TokenCounts
    text: dict  # kind -> TokenCounts


@dataclass(frozen=True)
class ActivationTerms:
    """A family's terms for one architecture (see the module docstring)."""

    blocks: tuple  # one BlockCounts per block, in order
    # text and image tokens are one tensor (CogVideoX's joint sequence): sequence parallelism splits
    # the text tokens too, and a tapped block output (a view) holds them; else (SD3's two streams)
    # the text stream is whole on every rank and a tap is the image stream alone
    joint_sequence: bool
    # the residual stream is fp32 under autocast (an fp32 position table is added to the embeddings)
    residual_fp32: bool
    # working sets: a forward without grad, rows per token of each stream ({'image', 'text'} ->
    # ``act`` and ``split`` rows), a backward on top of what is saved (``split`` rows per token, by kind)
    no_grad: dict
    backward: dict  # kind -> split rows


def uniform_blocks(layers: int, image: dict, text: dict | None = None) -> tuple:
    """``layers`` alike blocks (text tokens counted as image tokens unless ``text`` is given)."""
    block = BlockCounts(image=image, text=image if text is None else text)
    return (block,) * layers
