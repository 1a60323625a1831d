"""Training: the generators' objectives (flow matching for SiT, DDPM for DiT) and, in their own
modules, the tokenizer's losses."""
from softvq_fast.training.diffusion import variational_bound_bits
from softvq_fast.training.objectives import (
    FLOW_WEIGHTINGS,
    diffusion_loss,
    flow_matching_loss,
    flow_matching_times,
    label_drop_mask,
)

__all__ = [
    "FLOW_WEIGHTINGS",
    "diffusion_loss",
    "flow_matching_loss",
    "flow_matching_times",
    "label_drop_mask",
    "variational_bound_bits",
]
