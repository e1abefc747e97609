"""Diffusion core: noise schedules and PF-ODE steps, CFG, and the few-step generator rollout."""

from .guidance import cfg_model_output, sample_guidance_scales
from .rollout import predict_x0, rollout
from .schedules import FlowMatchSchedule, NoiseSchedule, VPVPredSchedule, schedule_from_diffusers_config

__all__ = [
    "FlowMatchSchedule",
    "NoiseSchedule",
    "VPVPredSchedule",
    "cfg_model_output",
    "predict_x0",
    "rollout",
    "sample_guidance_scales",
    "schedule_from_diffusers_config",
]
