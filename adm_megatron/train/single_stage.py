"""Adapter giving a plain torch network (the discriminator heads) what megatron-core's
forward-backward schedules and DDP expect of a model: a ``config``, a ``model_type`` and
``set_input_tensor`` (always ``[None]`` with one pipeline stage)."""

from __future__ import annotations

import torch
from megatron.core.enums import ModelType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig


class SingleStage(MegatronModule):
    model_type = ModelType.encoder_or_decoder

    def __init__(self, module: torch.nn.Module, config: TransformerConfig):
        super().__init__(config=config)
        self.module = module

    def set_input_tensor(self, input_tensor) -> None:
        if any(t is not None for t in input_tensor):
            raise NotImplementedError(f"{type(self.module).__name__}: pipeline parallelism is not supported")

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)
