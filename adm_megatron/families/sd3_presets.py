"""Real-size diffusers configs of the SD3 / SD3.5 transformers (as published with the checkpoints:
each repository's ``transformer/config.json``), for full-size builds on the ``meta`` device (shapes,
parameter counts, memory plans), since no weights can be downloaded in tests."""

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
PRESETS = {"sd3-medium": SD3_MEDIUM, "sd3.5-large": SD35_LARGE, "sd3.5-medium": SD35_MEDIUM}
# the scheduler of both pipelines (scheduler/scheduler_config.json)
SD3_SCHEDULER = dict(num_train_timesteps=1000, shift=3.0)
