"""Real-size diffusers configs of the CogVideoX and SD3 / SD3.5 transformers (as published with the
checkpoints: each repository's ``transformer/config.json``).

Used to build full-size models on the ``meta`` device (shapes, parameter counts, memory plans) and
to check the example configs, since no weights can be downloaded in tests.
"""

COGVIDEOX_2B = dict(
    _class_name="CogVideoXTransformer3DModel",
    num_attention_heads=30, attention_head_dim=64, in_channels=16, out_channels=16,
    flip_sin_to_cos=True, freq_shift=0, time_embed_dim=512, text_embed_dim=4096, num_layers=30,
    dropout=0.0, attention_bias=True, sample_width=90, sample_height=60, sample_frames=49,
    patch_size=2, temporal_compression_ratio=4, max_text_seq_length=226,
    activation_fn="gelu-approximate", timestep_activation_fn="silu", norm_elementwise_affine=True,
    norm_eps=1e-5, spatial_interpolation_scale=1.875, temporal_interpolation_scale=1.0,
    use_rotary_positional_embeddings=False, use_learned_positional_embeddings=False,
)
COGVIDEOX_5B = dict(
    COGVIDEOX_2B, num_attention_heads=48, num_layers=42, use_rotary_positional_embeddings=True
)
PRESETS = {"cogvideox-2b": COGVIDEOX_2B, "cogvideox-5b": COGVIDEOX_5B}

# stabilityai/stable-diffusion-3-medium-diffusers
SD3_MEDIUM = dict(
    _class_name="SD3Transformer2DModel",
    sample_size=128, patch_size=2, in_channels=16, num_layers=24, attention_head_dim=64,
    num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536,
    pooled_projection_dim=2048, out_channels=16, pos_embed_max_size=192,
)
# stabilityai/stable-diffusion-3.5-large
SD35_LARGE = dict(
    SD3_MEDIUM, num_layers=38, num_attention_heads=38, caption_projection_dim=2432, qk_norm="rms_norm"
)
# stabilityai/stable-diffusion-3.5-medium (MMDiT-X: dual attention in the first 13 blocks)
SD35_MEDIUM = dict(
    SD3_MEDIUM, pos_embed_max_size=384, qk_norm="rms_norm", dual_attention_layers=list(range(13))
)
SD3_PRESETS = {"sd3-medium": SD3_MEDIUM, "sd3.5-large": SD35_LARGE, "sd3.5-medium": SD35_MEDIUM}
