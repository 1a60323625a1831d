"""Samplers: flow matching for SiT (Euler/Heun ODE, Euler-Maruyama SDE), DDPM/DDIM for DiT,
and the conditional model wrapper (guidance interval, CUDA graphs) they call."""
from softvq_fast.sampling.conditional import ConditionalModel
from softvq_fast.sampling.diffusion import DIFFUSION_SAMPLERS, GaussianDiffusion, respaced_timesteps, sample_diffusion
from softvq_fast.sampling.flow import FLOW_SAMPLERS, PATHS, path_coefficients, sample_flow, score_from_velocity

__all__ = [
    "ConditionalModel",
    "DIFFUSION_SAMPLERS",
    "FLOW_SAMPLERS",
    "GaussianDiffusion",
    "PATHS",
    "path_coefficients",
    "respaced_timesteps",
    "sample_diffusion",
    "sample_flow",
    "score_from_velocity",
]
