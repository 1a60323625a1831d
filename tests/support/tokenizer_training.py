"""Helpers of the tokenizer-training tests: a tiny training config and the float64 evaluation of
the tokenizer's training forward, its soft quantiser written from the math."""
from __future__ import annotations

import dataclasses

import torch
from torch.nn import functional as F

from softvq_fast.models import SoftVQConfig, SoftVQVAE
from support.sharp_models import float64_evaluation

ENTROPY_TEMPERATURE = 0.01


def tiny_training_config(**overrides) -> SoftVQConfig:
    """ViT-S width, 2 blocks each, 32 px in 16 px patches, 8 latent tokens, 2 codebooks of 32 x 8;
    alignment to a DINOv2-S at patch 8 (16 patches: each token over 2) through a 32-wide projector."""
    values = dict(image_size=32, base_image_size=32, codebook_size=32, codebook_embed_dim=8, num_codebooks=2, tau=0.07,
                  num_latent_tokens=8, encoder_depth=2, decoder_depth=2, codebook_show_usage=False, repa=True,
                  repa_model="vit_small_patch14_dinov2.lvd142m", repa_patch_size=8, repa_proj_dim=32,
                  repa_align="repeat")
    return dataclasses.replace(SoftVQConfig(**values), **overrides)


def soft_vq_math(z: torch.Tensor, codebook: torch.Tensor, tau: float, l2_norm: bool, *,
                 logits_see_codebook: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(z_q, entropy regulariser) from the authors' definitions: per codebook c (contiguous token
    segments), logits = ẑ · Ê.detach()ᵀ, z_q = softmax(logits / tau) · Ê; the regulariser is the
    mean row entropy of softmax(logits / 0.01) (log_softmax of logits / 0.01 + 1e-5) minus the
    entropy of their mean over all rows and codebooks (log with + 1e-6). `logits_see_codebook`
    leaves Ê undetached in the logits (a bug the gradient checks must catch; same values)."""
    b, s, d = z.shape
    c, k, _ = codebook.shape
    rows = z.reshape(b, c, s // c, d).transpose(0, 1).reshape(c, -1, d)
    if l2_norm:
        rows, codebook = F.normalize(rows, dim=-1), F.normalize(codebook, dim=-1)
    logits = rows @ (codebook if logits_see_codebook else codebook.detach()).transpose(1, 2)
    z_q = (torch.softmax(logits / tau, dim=-1) @ codebook).reshape(c, b, s // c, d).transpose(0, 1).reshape(b, s, d)
    scaled = logits.reshape(-1, k) / ENTROPY_TEMPERATURE
    probs = torch.softmax(scaled, dim=-1)
    row_entropy = -(probs * torch.log_softmax(scaled + 1e-5, dim=-1)).sum(-1).mean()
    mean_probs = probs.mean(0)
    return z_q, row_entropy + (mean_probs * torch.log(mean_probs + 1e-6)).sum()


def training_forward_float64(model64: SoftVQVAE, images: torch.Tensor) -> dict[str, torch.Tensor]:
    """The training forward of a float64 copy (support.sharp_models.float64_copy, drop path off),
    attention and soft quantiser from the math: reconstructions, latents, entropy, projected."""
    with float64_evaluation():
        z = model64.quant_conv(model64.encoder(images.double()))
        q = model64.quantize
        latents, entropy = soft_vq_math(z, q.embedding, q.tau, q.l2_norm)
        out = {"reconstructions": model64.decoder(model64.post_quant_conv(latents)), "latents": latents,
               "entropy": entropy}
        if model64.projection is not None:
            out["projected"] = model64.projection(latents)
    return out
