"""Which backbone blocks feed discriminator heads (one rule for every backbone)."""

from __future__ import annotations


def tapped_block_indices(num_layers: int, every: int = 3, offset: int | None = None) -> list[int]:
    """0-based indices of the backbone blocks whose outputs feed a discriminator head.

    Convention: every ``every``-th block counting from 1, i.e. ``offset, offset + every, ...``
    below ``num_layers`` with the default ``offset = every - 1`` (blocks ``k-1, 2k-1, ...``), so
    the last block is tapped whenever ``every`` divides ``num_layers``.  ``every=1`` taps every
    block.  Pass ``offset`` (``0 <= offset < num_layers``) to shift the taps, e.g. ``offset=0``
    for blocks ``0, k, 2k, ...``.  The result is never empty: ``every > num_layers`` without an
    ``offset`` (e.g. a 2-layer tiny model with ``every=3``) raises ``ValueError``.

    >>> tapped_block_indices(30, 3)[:3], len(tapped_block_indices(30, 3))
    ([2, 5, 8], 10)
    """
    if num_layers < 1:
        raise ValueError(f"tapped_block_indices: num_layers must be >= 1, got {num_layers}")
    if every < 1:
        raise ValueError(f"tapped_block_indices: every must be >= 1, got {every}")
    if offset is None:
        if every > num_layers:
            raise ValueError(
                f"tapped_block_indices: every={every} taps no block of a {num_layers}-layer "
                f"backbone; use every <= {num_layers} (or pass offset)"
            )
        offset = every - 1
    if not 0 <= offset < num_layers:
        raise ValueError(
            f"tapped_block_indices: offset must be in [0, {num_layers}) for num_layers={num_layers}, "
            f"got {offset}"
        )
    return list(range(offset, num_layers, every))


def feature_depth(num_layers: int, every: int = 3) -> int:
    """How many blocks a features-only call runs: up to and including the last tapped one."""
    return tapped_block_indices(num_layers, every)[-1] + 1
