"""CogVideoX architecture settings: read from a diffusers config, validated, and turned into a
megatron-core ``TransformerConfig`` for a given parallel layout.

The diffusers ``config.json`` of ``CogVideoXTransformer3DModel`` is the single source of truth for
the architecture; this module only checks that the parts we implement cover it and says clearly
what does not (CogVideoX 1.5's temporal patching, the I2V ``ofs`` embedding, learned positional
embeddings).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar

from adm_megatron.models.dit_config import DiffusersArch

DIFFUSERS_CLASS_NAME = "CogVideoXTransformer3DModel"


@dataclass(frozen=True)
class CogVideoXArch(DiffusersArch):
    """The architecture fields of a diffusers CogVideoX transformer config (names kept)."""

    diffusers_class_name = DIFFUSERS_CLASS_NAME
    family: ClassVar[str] = "cogvideox"  # its name in adm_megatron.families (checkpoints record it)
    offsets: ClassVar[frozenset[str]] = frozenset({"freq_shift"})
    num_attention_heads: int = 30
    attention_head_dim: int = 64
    in_channels: int = 16
    out_channels: int = 16
    flip_sin_to_cos: bool = True
    freq_shift: int = 0
    time_embed_dim: int = 512
    text_embed_dim: int = 4096
    num_layers: int = 30
    dropout: float = 0.0
    attention_bias: bool = True
    sample_width: int = 90
    sample_height: int = 60
    sample_frames: int = 49
    patch_size: int = 2
    temporal_compression_ratio: int = 4
    max_text_seq_length: int = 226
    activation_fn: str = "gelu-approximate"
    timestep_activation_fn: str = "silu"
    norm_elementwise_affine: bool = True
    norm_eps: float = 1e-5
    spatial_interpolation_scale: float = 1.875
    temporal_interpolation_scale: float = 1.0
    use_rotary_positional_embeddings: bool = False
    use_learned_positional_embeddings: bool = False
    patch_bias: bool = True

    @classmethod
    def from_diffusers_config(cls, config: dict[str, Any], source: str = "config") -> "CogVideoXArch":
        """Build from a diffusers config dict; one-line ValueError for what is not supported."""
        kwargs = cls._known_fields(config, source)
        must_be = {
            "patch_size_t": None,
            "ofs_embed_dim": None,
            "use_learned_positional_embeddings": False,
            "activation_fn": "gelu-approximate",
            "timestep_activation_fn": "silu",
        }
        for key, expected in must_be.items():
            if config.get(key, expected) != expected:
                raise ValueError(
                    f"{source}: {key}={config[key]!r} is not supported (CogVideoX 1.0 2b/5b T2V "
                    f"architecture expected: {key}={expected!r})"
                )
        return cls(**kwargs)

    def block_config(self) -> dict[str, Any]:
        """The sizes ``dit_config.make_transformer_config`` builds the blocks' config from."""
        return dict(
            num_layers=self.num_layers, num_attention_heads=self.num_attention_heads,
            head_dim=self.attention_head_dim, ffn_hidden_size=self.ffn_hidden_size, bias=self.attention_bias,
            norm_eps=self.norm_eps, qk_layernorm=True, dropout=self.dropout,
        )

    def to_diffusers_config(self) -> dict[str, Any]:
        cfg = dataclasses.asdict(self)
        cfg.update(patch_size_t=None, ofs_embed_dim=None)
        return cfg

