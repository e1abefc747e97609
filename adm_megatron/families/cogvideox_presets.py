"""Real-size diffusers configs of the CogVideoX transformers (as published with the checkpoints).

Used to build full-size models on the ``meta`` device (shapes, parameter counts, memory plans) and
to check the example configs, since no weights can be downloaded in tests; and the scheduler the
family samples with.
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
COGVIDEOX_2B_SCHEDULER = dict(  # CogVideoX-2b's scheduler/scheduler_config.json (CogVideoXDDIMScheduler)
    num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
    prediction_type="v_prediction", rescale_betas_zero_snr=True, snr_shift_scale=3.0,
    timestep_spacing="trailing", set_alpha_to_one=True, clip_sample=False, steps_offset=0,
)
# the deterministic 'trailing' DDIM (PF-ODE) the generator is distilled on, also where the pipeline ships
# the stochastic CogVideoXDPMScheduler (CogVideoX-5b)
SAMPLER_SCHEDULER = "CogVideoXDDIMScheduler"
