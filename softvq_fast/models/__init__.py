"""Model core: the SoftVQ-VAE tokenizer and the SiT/DiT generators."""
from softvq_fast.models.config import PRESETS, SoftVQConfig
from softvq_fast.models.dit import DiT
from softvq_fast.models.sit import SiT
from softvq_fast.models.softvq_vae import SoftVQVAE

__all__ = ["PRESETS", "DiT", "SiT", "SoftVQConfig", "SoftVQVAE"]
