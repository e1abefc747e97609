"""SD3-Medium / SD3.5-Large MMDiT (diffusers' ``SD3Transformer2DModel``) on megatron-core.

Same call as diffusers' forward (latents [B, C, H, W], text embeddings ``encoder_hidden_states``
[B, L, joint_attention_dim], ``pooled_projections`` [B, pooled_projection_dim], ``timestep`` [B])
and the same output; the joint blocks (``sd3_layer``) run on megatron-core tensor-parallel layers
with sequence and context parallelism:

- The embeddings (diffusers' own ``PatchEmbed`` with its cropped sin-cos position embedding,
  ``CombinedTimestepTextProjEmbeddings`` of timestep and pooled text, and the ``context_embedder``
  linear) are computed whole on every rank: they are cheap and give exact diffusers positions at
  any size up to ``pos_embed_max_size`` patches.
- Context parallel (CP): each CP rank keeps all text tokens and one contiguous slice of the image
  tokens (``Li / cp``); attention gathers the image keys / values, as CogVideoX's does.
- Sequence parallel (SP): each tensor-parallel rank keeps ``1 / tp`` of its CP rank's image tokens
  between the parallel linears. The text stream is not split: it runs plain tensor parallel, whole
  on every rank. SD3's prompts are 77 CLIP + 256 T5 = 333 tokens, which no TP size divides, and
  text is under a tenth of the sequence at 1024 px (4096 image tokens), so splitting the joint
  sequence as CogVideoX does would need padding for little gain.
- The output (and any tapped features) are gathered back whole on every rank (``backbone``'s
  ``gather_tokens``, with its gradient convention).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from diffusers.models.embeddings import CombinedTimestepTextProjEmbeddings, PatchEmbed
from diffusers.models.modeling_outputs import Transformer2DModelOutput
from megatron.core.tensor_parallel.mappings import scatter_to_sequence_parallel_region
from megatron.core.transformer.spec_utils import ModuleSpec, build_module
from megatron.core.transformer.transformer_config import TransformerConfig

from adm_megatron.models.adaln import AdaLNContinuous
from adm_megatron.models.backbone import DiTBackbone, DiTOutput, cp_token_slice, gather_tokens
from adm_megatron.models.sd3_config import SD3Arch
from adm_megatron.models.taps import feature_depth, tapped_block_indices


@dataclass
class SD3Output(DiTOutput):
    """``sample`` [B, C, H, W] (None for a features-only call); ``features``: tapped blocks' image
    tokens, each [B, hidden, H/p, W/p]."""


class SD3Transformer(DiTBackbone):
    def __init__(self, arch: SD3Arch, config: TransformerConfig, layer_spec: ModuleSpec):
        super().__init__(config=config)
        self.arch = arch
        hidden = arch.hidden_size
        dtype = config.params_dtype
        self.pos_embed = PatchEmbed(
            height=arch.sample_size,
            width=arch.sample_size,
            patch_size=arch.patch_size,
            in_channels=arch.in_channels,
            embed_dim=hidden,
            pos_embed_max_size=arch.pos_embed_max_size,
        ).to(dtype)
        self.time_text_embed = CombinedTimestepTextProjEmbeddings(
            embedding_dim=hidden, pooled_projection_dim=arch.pooled_projection_dim
        ).to(dtype)
        self.context_embedder = torch.nn.Linear(arch.joint_attention_dim, arch.caption_projection_dim, dtype=dtype)
        self.blocks = torch.nn.ModuleList(
            build_module(
                layer_spec, config=config, layer_number=i + 1, context_pre_only=i == arch.num_layers - 1,
                use_dual_attention=i in arch.dual_attention_layers,
            )
            for i in range(arch.num_layers)
        )
        self.norm_out = AdaLNContinuous(config, hidden, elementwise_affine=False)
        self.proj_out = torch.nn.Linear(hidden, arch.patch_size * arch.patch_size * arch.out_channels, dtype=dtype)
        self._tag_sequence_parallel(self.proj_out)

    # -- input checks ------------------------------------------------------------------------
    def _check_inputs(self, hidden_states, encoder_hidden_states, pooled_projections, timestep) -> int:
        a = self.arch
        if hidden_states.dim() != 4 or hidden_states.shape[1] != a.in_channels:
            raise ValueError(
                f"hidden_states shape {tuple(hidden_states.shape)}: expected [B, {a.in_channels}, H, W]"
            )
        batch, _, h, w = hidden_states.shape
        if h % a.patch_size or w % a.patch_size:
            raise ValueError(f"latent height/width {h}x{w}: must be divisible by patch_size {a.patch_size}")
        if max(h, w) // a.patch_size > a.pos_embed_max_size:
            raise ValueError(
                f"latent height/width {h}x{w}: at most pos_embed_max_size={a.pos_embed_max_size} patches "
                f"of {a.patch_size} a side"
            )
        if (
            encoder_hidden_states is None or encoder_hidden_states.dim() != 3
            or encoder_hidden_states.shape[0] != batch or encoder_hidden_states.shape[-1] != a.joint_attention_dim
        ):
            shape = None if encoder_hidden_states is None else tuple(encoder_hidden_states.shape)
            raise ValueError(f"encoder_hidden_states shape {shape}: expected [{batch}, L, {a.joint_attention_dim}]")
        if pooled_projections is None or tuple(pooled_projections.shape) != (batch, a.pooled_projection_dim):
            shape = None if pooled_projections is None else tuple(pooled_projections.shape)
            raise ValueError(f"pooled_projections shape {shape}: expected [{batch}, {a.pooled_projection_dim}]")
        if timestep is None:
            raise ValueError("timestep: required (a number or [B] tensor)")
        num_image = (h // a.patch_size) * (w // a.patch_size)
        cp, tp = self.config.context_parallel_size, self.config.tensor_model_parallel_size
        if num_image % cp:
            raise ValueError(f"{num_image} image tokens: not divisible by context_parallel={cp}")
        if self.config.sequence_parallel and (num_image // cp) % tp:
            raise ValueError(
                f"{num_image // cp} image tokens per context-parallel rank: not divisible by "
                f"tensor_parallel={tp} as sequence parallelism requires"
            )
        return num_image

    def _run_block(self, block, image, text, temb):
        if block.context_pre_only:  # no text output: recompute's autograd function returns tensors only
            return self._recomputed(lambda x, c, t: block(x, c, t)[0], image, text, temb), None
        return self._recomputed(block, image, text, temb)

    def forward(
        self,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        pooled_projections: torch.Tensor | None = None,
        timestep: torch.Tensor | int | float | None = None,
        block_controlnet_hidden_states: list | None = None,
        joint_attention_kwargs: dict | None = None,
        return_dict: bool = True,
        skip_layers: list[int] | None = None,
        return_features: bool = False,
        feature_every: int = 1,
    ):
        """As diffusers' forward. ``return_features`` makes it a discriminator backbone: it returns
        every ``feature_every``-th block's image-token output as [B, hidden, H/p, W/p] and no sample,
        running the blocks up to the last tapped one and nothing after (no later block, no
        ``norm_out`` / ``proj_out``). ControlNet residuals, skipped layers and attention kwargs
        (diffusers' LoRA scale, IP-adapter) are not supported: passing them is a ValueError."""
        for name, value in (
            ("block_controlnet_hidden_states", block_controlnet_hidden_states),
            ("joint_attention_kwargs", joint_attention_kwargs or None),
            ("skip_layers", skip_layers),
        ):
            if value is not None:
                raise ValueError(f"{name}: not supported by the megatron SD3 transformer (pass None)")
        num_image = self._check_inputs(hidden_states, encoder_hidden_states, pooled_projections, timestep)
        batch, _, height, width = hidden_states.shape
        p = self.arch.patch_size

        image = self.pos_embed(hidden_states).transpose(0, 1)[cp_token_slice(num_image, self.config)].contiguous()
        temb = self.time_text_embed(timestep, pooled_projections)
        text = self.context_embedder(encoder_hidden_states).transpose(0, 1)
        if self.config.sequence_parallel:
            image = scatter_to_sequence_parallel_region(image)
        image = self._into_blocks(image)

        taps = set(tapped_block_indices(len(self.blocks), feature_every)) if return_features else set()
        depth = feature_depth(len(self.blocks), feature_every) if return_features else len(self.blocks)
        features = []
        with self._blocks_context():
            for index, block in enumerate(self.blocks[:depth]):
                image, text = self._run_block(block, image, text, temb)
                if index in taps:
                    tokens = gather_tokens(image, self.config)
                    features.append(tokens.reshape(batch, height // p, width // p, -1).permute(0, 3, 1, 2))
        if return_features:
            return SD3Output(sample=None, features=features) if return_dict else (None, features)

        x = gather_tokens(self.proj_out(self.norm_out(image, temb)), self.config)
        out = x.reshape(batch, height // p, width // p, p, p, -1)
        out = out.permute(0, 5, 1, 3, 2, 4).reshape(batch, -1, height, width)
        return Transformer2DModelOutput(sample=out) if return_dict else (out,)
