"""Model core: the SoftVQ-VAE tokenizer and the SiT/DiT generators."""
