"""Model core: the SoftVQ-VAE tokenizer and the SiT/DiT generators."""
from softvq_fast.models.dit import DiT  # noqa: F401
from softvq_fast.models.sit import SiT  # noqa: F401
