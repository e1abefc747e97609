"""What the DiT backbones (CogVideoX, SD3) share as megatron-core modules.

- ``DiTOutput``: a forward's sample and, for a discriminator-backbone call, the tapped features.
- ``DiTBackbone``: the megatron module contract (model type, pipeline input, a sharded state dict
  that asks each block for its own tensor-parallel shards), the sequence-parallel tag of output
  layers, full activation recompute of a block and the FP8 context of the block loop.
- The context-parallel token layout: each CP rank keeps one contiguous slice of the image / video
  tokens (``cp_token_slice``), and ``gather_tokens`` brings a rank's [s, b, *] rows back to all
  tokens [b, L, *] on every rank (SP gather over TP, then CP gather). Gradient convention: the CP
  gather's backward reduce-scatters, so with the same loss on every rank of a CP group, averaging
  gradients over the data-and-context-parallel group (megatron DDP's default) gives the one-process
  gradient; the SP gather's backward only splits (TP ranks are not averaged).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from diffusers.utils import BaseOutput
from megatron.core import parallel_state, tensor_parallel
from megatron.core.enums import ModelType
from megatron.core.fp8_utils import get_fp8_context
from megatron.core.tensor_parallel.mappings import gather_from_sequence_parallel_region
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.transformer.utils import (
    ensure_metadata_has_dp_cp_group,
    sharded_state_dict_default,
)

from adm_megatron.models.attention import gather_over_cp


@dataclass
class DiTOutput(BaseOutput):
    """``sample`` (None for a features-only call) and ``features`` (the tapped blocks' outputs)."""

    sample: torch.Tensor | None
    features: list[torch.Tensor] | None = None


def cp_token_slice(num_tokens: int, config: TransformerConfig) -> slice:
    """This CP rank's contiguous slice of ``num_tokens`` (divisible by the CP size)."""
    per_rank = num_tokens // config.context_parallel_size
    start = parallel_state.get_context_parallel_rank() * per_rank if config.context_parallel_size > 1 else 0
    return slice(start, start + per_rank)


def gather_tokens(x: torch.Tensor, config: TransformerConfig, skip_rows: int = 0) -> torch.Tensor:
    """This rank's [s, b, *] rows (after ``skip_rows`` leading rows of the SP-gathered sequence,
    e.g. the text) -> all tokens [b, L, *] on every rank."""
    if config.sequence_parallel:
        x = gather_from_sequence_parallel_region(x, tensor_parallel_output_grad=False)
    x = x[skip_rows:]
    if config.context_parallel_size > 1:
        x = gather_over_cp(x)
    return x.transpose(0, 1)


class DiTBackbone(MegatronModule):
    """Base of the megatron DiTs; children named ``blocks`` (a ``ModuleList``) hold the blocks."""

    model_type = ModelType.encoder_or_decoder  # what megatron's schedules expect of a model

    def set_input_tensor(self, input_tensor) -> None:
        """megatron's schedules hand a pipeline stage its input here; with one stage (PP = 1, all
        this model supports so far) it is always ``[None]``."""
        if any(t is not None for t in input_tensor):
            raise NotImplementedError(f"{type(self).__name__}: pipeline parallelism is not supported yet")

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (), metadata: dict | None = None):
        """megatron-core's default treats a child without its own method as one replicated module,
        which would mark every block (kept in a ``ModuleList``) replicated and save only rank 0's
        tensor-parallel shards; each block is asked for its own sharded state dict instead."""
        metadata = ensure_metadata_has_dp_cp_group(metadata)
        tp_group = parallel_state.get_tensor_model_parallel_group()  # replica ids of replicated tensors
        sharded = {}
        for name, child in self.named_children():
            if name == "blocks":
                for index, block in enumerate(child):
                    sharded.update(block.sharded_state_dict(f"{prefix}blocks.{index}.", sharded_offsets, metadata))
            else:
                sharded.update(
                    sharded_state_dict_default(child, f"{prefix}{name}.", sharded_offsets, metadata, tp_group)
                )
        return sharded

    def _tag_sequence_parallel(self, module: torch.nn.Module) -> None:
        """An output layer applied to each rank's sequence-parallel slice: its gradients are partial
        sums that ``finalize_model_grads`` adds up over TP."""
        if self.config.sequence_parallel:
            for param in module.parameters():
                setattr(param, "sequence_parallel", True)

    def _blocks_context(self):
        """The context the block loop runs in: TE's ``fp8_autocast`` with megatron's recipe when
        ``config.fp8`` is set (``models.fp8``), else a null context."""
        return get_fp8_context(self.config)

    def _into_blocks(self, hidden: torch.Tensor) -> torch.Tensor:
        """The hidden states the block loop starts from. megatron's ``tensor_parallel.checkpoint``
        (full recompute) is reentrant: a block's output needs grad only when one of its inputs does.
        A model whose trained weights all sit in the blocks while what comes before them is frozen --
        LoRA adapters on a frozen base -- would get no gradient at all, so under full recompute with
        grad the blocks' input is then made a leaf that needs grad (the reason for transformers'
        ``enable_input_require_grads``); a model with nothing to train (the frozen teacher) stays
        out of the graph."""
        if (self.config.recompute_granularity == "full" and torch.is_grad_enabled() and not hidden.requires_grad
                and any(p.requires_grad for p in self.parameters())):
            return hidden.detach().requires_grad_(True)
        return hidden

    def _recomputed(self, fn, *args):
        """``fn(*args)``, its activations recomputed in backward under full recompute."""
        if self.config.recompute_granularity == "full" and torch.is_grad_enabled():
            return tensor_parallel.checkpoint(fn, False, *args)
        return fn(*args)
