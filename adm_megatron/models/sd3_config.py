"""SD3 / SD3.5 MMDiT architecture settings: read from a diffusers ``SD3Transformer2DModel`` config,
validated, and turned into a megatron-core ``TransformerConfig`` for a given parallel layout.

The diffusers ``config.json`` is the single source of truth; this module checks that the parts we
implement cover it and names what does not: q / k norms other than none (SD3-Medium) and
``rms_norm`` (SD3.5), a caption projection narrower or wider than the blocks, and dual-attention
layers (SD3.5-Medium's ``dual_attention_layers``) that are not block indices.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar

from adm_megatron.models.dit_config import DiffusersArch

DIFFUSERS_CLASS_NAME = "SD3Transformer2DModel"
QK_NORMS = (None, "rms_norm")
NORM_EPS = 1e-6  # every LayerNorm / RMSNorm of diffusers' SD3 blocks


@dataclass(frozen=True)
class SD3Arch(DiffusersArch):
    """The fields of a diffusers ``SD3Transformer2DModel`` config (names and defaults kept)."""

    diffusers_class_name = DIFFUSERS_CLASS_NAME
    family: ClassVar[str] = "sd3"  # its name in adm_megatron.families, once an SD3 family registers

    sample_size: int = 128
    patch_size: int = 2
    in_channels: int = 16
    num_layers: int = 18
    attention_head_dim: int = 64
    num_attention_heads: int = 18
    joint_attention_dim: int = 4096
    caption_projection_dim: int = 1152
    pooled_projection_dim: int = 2048
    out_channels: int = 16
    pos_embed_max_size: int = 96
    dual_attention_layers: tuple[int, ...] = ()
    qk_norm: str | None = None

    @property
    def text_embed_dim(self) -> int:
        """Width of the text embeddings the model is called with (``encoder_hidden_states``)."""
        return self.joint_attention_dim

    @classmethod
    def from_diffusers_config(cls, config: dict[str, Any], source: str = "config") -> "SD3Arch":
        """Build from a diffusers config dict; one-line ValueError for what is not supported."""
        kwargs = cls._known_fields(config, source)
        kwargs["dual_attention_layers"] = tuple(kwargs.get("dual_attention_layers") or ())
        arch = cls(**kwargs)
        if not all(0 <= i < arch.num_layers for i in arch.dual_attention_layers):
            raise ValueError(
                f"{source}: dual_attention_layers={list(arch.dual_attention_layers)}: expected block indices "
                f"in [0, {arch.num_layers})"
            )
        if arch.qk_norm not in QK_NORMS:
            raise ValueError(f"{source}: qk_norm={arch.qk_norm!r} is not supported (expected one of {QK_NORMS})")
        if arch.caption_projection_dim != arch.hidden_size:
            raise ValueError(
                f"{source}: caption_projection_dim={arch.caption_projection_dim} must equal "
                f"num_attention_heads x attention_head_dim = {arch.hidden_size}"
            )
        return arch

    def block_config(self) -> dict[str, Any]:
        """The sizes ``dit_config.make_transformer_config`` builds the blocks' config from."""
        return dict(
            num_layers=self.num_layers, num_attention_heads=self.num_attention_heads,
            head_dim=self.attention_head_dim, ffn_hidden_size=self.ffn_hidden_size, bias=True,
            norm_eps=NORM_EPS, qk_layernorm=self.qk_norm is not None, dropout=0.0,
        )

    def to_diffusers_config(self) -> dict[str, Any]:
        cfg = dataclasses.asdict(self)
        cfg["dual_attention_layers"] = list(self.dual_attention_layers)
        return cfg

