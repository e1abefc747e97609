"""CogVideoX diffusion transformer (2b: sin-cos positions, 5b: 3D RoPE) on megatron-core.

Same call as diffusers' ``CogVideoXTransformer3DModel.forward`` (latents [B, F, C, H, W], text
embeddings [B, L, D], timesteps [B], optional ``image_rotary_emb``) and the same output; the blocks
run on megatron-core tensor-parallel layers with sequence and context parallelism:

- The embeddings (diffusers' own ``CogVideoXPatchEmbed``, ``Timesteps``, ``TimestepEmbedding``) are
  computed whole on every rank: they are cheap and give exact diffusers positions at any size.
- Context parallel (CP): each CP rank keeps all text tokens and one contiguous slice of the video
  tokens (``Lv / cp``); attention gathers the video keys / values (see ``attention``).
- Sequence parallel (SP): each tensor-parallel rank keeps ``1 / tp`` of its CP rank's
  [text; video slice] rows between the parallel linears.
- The output (and any tapped features) are gathered back whole on every rank (``backbone``'s
  ``gather_tokens``, with its gradient convention).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from diffusers.models.embeddings import CogVideoXPatchEmbed, TimestepEmbedding, Timesteps
from diffusers.models.modeling_outputs import Transformer2DModelOutput
from megatron.core import parallel_state
from megatron.core.tensor_parallel.mappings import scatter_to_sequence_parallel_region
from megatron.core.transformer.spec_utils import ModuleSpec, build_module
from megatron.core.transformer.transformer_config import TransformerConfig

from adm_megatron.models.adaln import AdaLNOut
from adm_megatron.models.attention import with_identity_rows
from adm_megatron.models.backbone import DiTBackbone, DiTOutput, cp_token_slice, gather_tokens
from adm_megatron.models.cogvideox_config import CogVideoXArch
from adm_megatron.models.cogvideox_layer import TokenLayout
from adm_megatron.models.norms import LayerNorm
from adm_megatron.models.taps import feature_depth, tapped_block_indices


@dataclass
class CogVideoXOutput(DiTOutput):
    """``sample`` [B, F, C, H, W] (None for a features-only call); ``features``: tapped block
    outputs, each [B, hidden, F, h, w]."""


class CogVideoXTransformer(DiTBackbone):
    def __init__(self, arch: CogVideoXArch, config: TransformerConfig, layer_spec: ModuleSpec):
        super().__init__(config=config)
        self.arch = arch
        hidden = arch.hidden_size
        dtype = config.params_dtype
        self.patch_embed = CogVideoXPatchEmbed(
            patch_size=arch.patch_size,
            in_channels=arch.in_channels,
            embed_dim=hidden,
            text_embed_dim=arch.text_embed_dim,
            bias=arch.patch_bias,
            sample_width=arch.sample_width,
            sample_height=arch.sample_height,
            sample_frames=arch.sample_frames,
            temporal_compression_ratio=arch.temporal_compression_ratio,
            max_text_seq_length=arch.max_text_seq_length,
            spatial_interpolation_scale=arch.spatial_interpolation_scale,
            temporal_interpolation_scale=arch.temporal_interpolation_scale,
            use_positional_embeddings=not arch.use_rotary_positional_embeddings,
            use_learned_positional_embeddings=False,
        ).to(dtype)
        self.time_proj = Timesteps(hidden, arch.flip_sin_to_cos, arch.freq_shift)
        self.time_embedding = TimestepEmbedding(hidden, arch.time_embed_dim, "silu").to(dtype)
        self.blocks = torch.nn.ModuleList(
            build_module(
                layer_spec,
                config=config,
                layer_number=i + 1,
                time_embed_dim=arch.time_embed_dim,
                norm_elementwise_affine=arch.norm_elementwise_affine,
            )
            for i in range(arch.num_layers)
        )
        self.norm_final = LayerNorm(config, hidden, elementwise_affine=arch.norm_elementwise_affine)
        self.norm_out = AdaLNOut(config, arch.time_embed_dim, arch.norm_elementwise_affine)
        self.proj_out = torch.nn.Linear(
            hidden, arch.patch_size * arch.patch_size * arch.out_channels, dtype=dtype
        )
        self._tag_sequence_parallel(self.proj_out)

    # -- input checks ------------------------------------------------------------------------
    def _check_inputs(self, hidden_states, encoder_hidden_states, image_rotary_emb):
        a = self.arch
        if hidden_states.dim() != 5 or hidden_states.shape[2] != a.in_channels:
            raise ValueError(
                f"hidden_states shape {tuple(hidden_states.shape)}: expected [B, F, {a.in_channels}, H, W]"
            )
        h, w = hidden_states.shape[-2:]
        if h % a.patch_size or w % a.patch_size:
            raise ValueError(f"latent height/width {h}x{w}: must be divisible by patch_size {a.patch_size}")
        if encoder_hidden_states.dim() != 3 or encoder_hidden_states.shape[-1] != a.text_embed_dim:
            raise ValueError(
                f"encoder_hidden_states shape {tuple(encoder_hidden_states.shape)}: expected "
                f"[B, L, {a.text_embed_dim}]"
            )
        num_video = hidden_states.shape[1] * (h // a.patch_size) * (w // a.patch_size)
        if image_rotary_emb is not None and image_rotary_emb[0].shape[0] != num_video:
            raise ValueError(
                f"image_rotary_emb has {image_rotary_emb[0].shape[0]} positions: expected {num_video} "
                f"(frames x patches)"
            )
        cp = self.config.context_parallel_size
        if num_video % cp:
            raise ValueError(f"{num_video} video tokens: not divisible by context_parallel={cp}")
        tp = self.config.tensor_model_parallel_size
        per_cp = encoder_hidden_states.shape[1] + num_video // cp
        if self.config.sequence_parallel and per_cp % tp:
            raise ValueError(
                f"{per_cp} tokens per context-parallel rank (text + video / cp): not divisible by "
                f"tensor_parallel={tp} as sequence parallelism requires"
            )
        return num_video

    # -- parallel layout -----------------------------------------------------------------------
    def _layout(self, num_text: int, num_video: int) -> tuple[TokenLayout, slice]:
        video_slice = cp_token_slice(num_video, self.config)
        text_local = num_text
        if self.config.sequence_parallel:
            rows = (num_text + video_slice.stop - video_slice.start) // self.config.tensor_model_parallel_size
            first_row = parallel_state.get_tensor_model_parallel_rank() * rows
            text_local = min(max(num_text - first_row, 0), rows)
        return TokenLayout(text_local=text_local, text_attention=num_text), video_slice

    def _run_block(self, block, x, temb, layout, cos, sin):
        return self._recomputed(lambda h, e, c, s: block(h, e, layout, c, s), x, temb, cos, sin)

    def forward(
        self,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        timestep: torch.Tensor | int | float,
        timestep_cond: torch.Tensor | None = None,
        ofs: torch.Tensor | None = None,
        image_rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
        attention_kwargs: dict | None = None,
        return_dict: bool = True,
        return_features: bool = False,
        feature_every: int = 3,
    ):
        """As diffusers' forward. ``return_features`` makes it a discriminator backbone: it returns
        every ``feature_every``-th block's video-token output as [B, hidden, F, H/p, W/p] and no
        sample, running the blocks up to the last tapped one and nothing after (no later block, no
        ``norm_final`` / ``norm_out`` / ``proj_out``). ``ofs`` and ``attention_kwargs`` exist for
        call compatibility only (no ofs embedding in CogVideoX 1.0; no LoRA scale here)."""
        if ofs is not None:
            raise ValueError("ofs: this CogVideoX 1.0 architecture has no ofs embedding")
        num_video = self._check_inputs(hidden_states, encoder_hidden_states, image_rotary_emb)
        batch, frames, _, height, width = hidden_states.shape
        p = self.arch.patch_size
        num_text = encoder_hidden_states.shape[1]

        t_emb = self.time_proj(timestep).to(dtype=hidden_states.dtype)
        temb = self.time_embedding(t_emb, timestep_cond)
        tokens = self.patch_embed(encoder_hidden_states, hidden_states).transpose(0, 1)

        layout, video_slice = self._layout(num_text, num_video)
        x = torch.cat([tokens[:num_text], tokens[num_text:][video_slice]], dim=0)
        cos = sin = None
        if image_rotary_emb is not None:
            cos, sin = with_identity_rows([r.to(x.device)[video_slice] for r in image_rotary_emb], num_text)
        if self.config.sequence_parallel:
            x = scatter_to_sequence_parallel_region(x)
        x = self._into_blocks(x)

        taps = set(tapped_block_indices(len(self.blocks), feature_every)) if return_features else set()
        depth = feature_depth(len(self.blocks), feature_every) if return_features else len(self.blocks)
        features = []
        with self._blocks_context():
            for index, block in enumerate(self.blocks[:depth]):
                x = self._run_block(block, x, temb, layout, cos, sin)
                if index in taps:
                    video = gather_tokens(x, self.config, num_text)
                    features.append(
                        video.reshape(batch, frames, height // p, width // p, -1).permute(0, 4, 1, 2, 3)
                    )
        if return_features:
            return CogVideoXOutput(sample=None, features=features) if return_dict else (None, features)

        x = self.proj_out(self.norm_out(self.norm_final(x), temb))
        x = gather_tokens(x, self.config, num_text)
        out = x.reshape(batch, frames, height // p, width // p, -1, p, p)
        out = out.permute(0, 1, 4, 2, 5, 3, 6).flatten(5, 6).flatten(3, 4)
        return Transformer2DModelOutput(sample=out) if return_dict else (out,)
