"""How an iteration's global batch is cut: over data-parallel ranks and over micro-batches.

``data.global_batch_size`` (G) is split as megatron-core's ``--global-batch-size`` is: each
data-parallel rank runs ``G / (data.batch_size x DP)`` micro-batches of ``data.batch_size`` rows per
update and accumulates their gradients (``adm_megatron.train.phases``). Rows of the global batch are
numbered once per iteration and handed out in slots of ``data.batch_size``: slot ``m x DP + r`` is
rank ``r``'s micro-batch ``m``. Every random draw and prompt is made for the whole global batch and
each (rank, micro-batch) keeps its slot's rows, so what an iteration computes depends only on G,
not on how it is split: DP = 2 with one micro-batch each sees exactly the rows that one process sees
in two micro-batches, or in one micro-batch of twice the size. With one micro-batch the slots are
the per-rank rows of a run without accumulation.
"""

from __future__ import annotations

from dataclasses import dataclass

from adm_megatron.config import ConfigError


@dataclass(frozen=True)
class BatchLayout:
    micro_batch: int  # rows of one micro-batch on one rank (data.batch_size)
    dp_rank: int = 0
    dp_size: int = 1
    microbatches: int = 1  # micro-batches per update on each rank (gradient accumulation)

    def __post_init__(self):
        if self.micro_batch < 1 or self.microbatches < 1:
            raise ValueError(f"BatchLayout: micro_batch and microbatches must be >= 1, got {self}")
        if not 0 <= self.dp_rank < self.dp_size:
            raise ValueError(f"BatchLayout: dp_rank must be in [0, {self.dp_size}), got {self.dp_rank}")

    @property
    def global_batch(self) -> int:
        return self.micro_batch * self.dp_size * self.microbatches

    def slot(self, micro: int) -> int:
        """Which ``micro_batch``-row block of the global batch this rank's micro-batch ``micro`` is."""
        if not 0 <= micro < self.microbatches:
            raise ValueError(f"BatchLayout: micro-batch {micro} outside [0, {self.microbatches})")
        return micro * self.dp_size + self.dp_rank

    def rows(self, micro: int = 0) -> slice:
        """This rank's rows of the global batch in micro-batch ``micro``."""
        start = self.slot(micro) * self.micro_batch
        return slice(start, start + self.micro_batch)


def microbatches_for(global_batch_size: int, micro_batch: int, dp_size: int, source: str = "config") -> int:
    """Micro-batches per update for ``data.global_batch_size`` (0: one, no accumulation); a
    one-line ConfigError when it is not a multiple of ``data.batch_size x DP``."""
    per_pass = micro_batch * dp_size
    if global_batch_size == 0:
        return 1
    if global_batch_size % per_pass:
        raise ConfigError(
            f"{source}: data.global_batch_size={global_batch_size}: expected a multiple of data.batch_size x "
            f"data-parallel size = {micro_batch} x {dp_size} = {per_pass} (the rest is gradient accumulation)"
        )
    return global_batch_size // per_pass


def global_batch(global_batch_size: int, micro_batch: int, dp_size: int) -> int:
    """The run's global batch: ``data.global_batch_size``, or ``data.batch_size x DP`` when it is 0."""
    return global_batch_size or micro_batch * dp_size


def contiguous_share(count: int, rank: int, ranks: int) -> range:
    """Rank ``rank`` of ``ranks``' part of ``count`` items split into contiguous shares of
    ``ceil(count / ranks)`` (the last ones shorter or empty), so the shares in rank order are the
    items in order (samples rendered over data-parallel ranks)."""
    k = -(-count // ranks)
    return range(min(rank * k, count), min((rank + 1) * k, count))
