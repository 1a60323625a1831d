"""SoftVQVAE against an independent float64 forward written from the authors' formulation
(conv2d patch embedding, timm `_pos_embed`, (B, H, N, D) attention with q * scale @ k^T, complex
RoPE products, einsum unpatchify), on weights drawn so that attention is far from uniform and the
LayerScale branches matter (random checkpoints with gamma = 1e-5 barely exercise attention). The
attention mutants of support.sharp_models must fail the same check."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from support.numerics import rel_err
from support.sharp_models import FP32_TOL, MUTANTS, inject_mutant, report, sharpen

from softvq_fast.models import SoftVQConfig, SoftVQVAE
from softvq_fast.models.config import vit_spec

EPS = 1e-6


def _layer_norm(x, p, name):
    return F.layer_norm(x, x.shape[-1:], p[f"{name}.weight"], p[f"{name}.bias"], EPS)


def _block(x, p, heads, cis, prefix, latents):
    b, n, c = x.shape
    h = _layer_norm(x, p, "norm1")
    qkv = (h @ p["attn.qkv.weight"].T + p["attn.qkv.bias"]).reshape(b, n, 3, heads, c // heads).permute(2, 0, 3, 1, 4)
    q, k, v = (t.clone() for t in qkv.unbind(0))
    if cis is not None:
        for t in (q, k):
            image = torch.view_as_complex(t[:, :, prefix : n - latents].reshape(b, heads, -1, c // heads // 2, 2).contiguous())
            t[:, :, prefix : n - latents] = torch.view_as_real(image * cis).flatten(3)
    attn = ((q * (c // heads) ** -0.5) @ k.transpose(-2, -1)).softmax(-1)
    x = x + p["ls1.gamma"] * ((attn @ v).transpose(1, 2).reshape(b, n, c) @ p["attn.proj.weight"].T + p["attn.proj.bias"])
    hidden = F.gelu(_layer_norm(x, p, "norm2") @ p["mlp.fc1.weight"].T + p["mlp.fc1.bias"])
    return x + p["ls2.gamma"] * (hidden @ p["mlp.fc2.weight"].T + p["mlp.fc2.bias"])


def _sub(state, prefix):
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def _pos_embed(x, m, add):
    """timm: class (+ register) tokens first; the table covers them unless registers are used."""
    prefix = [m[k].expand(x.shape[0], -1, -1) for k in ("cls_token", "reg_token") if k in m]
    if "reg_token" in m:
        return torch.cat(prefix + [x + m["pos_embed"] if add else x], 1)
    x = torch.cat(prefix + [x], 1)
    return x + m["pos_embed"] if add else x


def _cis(vit, config, heads, head_dim, depth, grid):
    if not config.use_rope:
        return [None] * depth
    t = torch.arange(grid * grid, dtype=torch.float64)
    t_x, t_y = t % grid, torch.div(t, grid, rounding_mode="floor")
    if config.rope_mixed:
        freqs = vit["freqs"]
        fx = (t_x[:, None] @ freqs[0][:, None, :]).view(depth, -1, heads, head_dim // 2).permute(0, 2, 1, 3)
        fy = (t_y[:, None] @ freqs[1][:, None, :]).view(depth, -1, heads, head_dim // 2).permute(0, 2, 1, 3)
        angles = fx + fy
        return [torch.polar(torch.ones_like(a), a) for a in angles]
    f = 1.0 / (config.rope_theta ** (torch.arange(0, head_dim, 4)[: head_dim // 4].double() / head_dim))
    angles = torch.cat([torch.outer(t_x, f), torch.outer(t_y, f)], -1)
    return [torch.polar(torch.ones_like(angles), angles)] * depth


def _vit(x, vit, config, heads, latents, add_positions, depth):
    m = _sub(vit, "model.")
    prefix = int("cls_token" in m) + (m["reg_token"].shape[1] if "reg_token" in m else 0)
    x = torch.cat([_pos_embed(x[:, :-latents], m, add_positions), x[:, -latents:]], 1)
    grid = config.image_size // config.enc_patch_size
    head_dim = x.shape[-1] // heads
    for i, cis in enumerate(_cis(vit, config, heads, head_dim, depth, grid)):
        x = _block(x, _sub(m, f"blocks.{i}."), heads, cis, prefix, latents)
    return _layer_norm(x, m, "norm"), prefix


def reference_forward(state, config, heads, images):
    """(latents, reconstruction) in float64."""
    T, p, grid = config.num_latent_tokens, config.enc_patch_size, config.image_size // config.enc_patch_size
    enc, dec = _sub(state, "encoder."), _sub(state, "decoder.")
    depth = len({k.split(".")[2] for k in enc if k.startswith("model.blocks.")})
    patches = F.conv2d(images, enc["model.patch_embed.proj.weight"], enc["model.patch_embed.proj.bias"], stride=p)
    x = torch.cat([patches.flatten(2).transpose(1, 2), (enc["latent_tokens"] + enc["latent_pos_embed"]).expand(len(images), -1, -1)], 1)
    h, _ = _vit(x, enc, config, heads, T, True, depth)
    z = h[:, -T:] @ state["quant_conv.weight"].T + state["quant_conv.bias"]
    codebooks = F.normalize(state["quantize.embedding"], dim=-1)
    segments = F.normalize(z.view(len(z), config.num_codebooks, -1, z.shape[-1]), dim=-1)
    probs = (torch.einsum("bcsd,ckd->bcsk", segments, codebooks) / config.tau).softmax(-1)
    latents = torch.einsum("bcsk,ckd->bcsd", probs, codebooks).reshape(z.shape)
    zd = latents @ state["post_quant_conv.weight"].T + state["post_quant_conv.bias"]
    x = torch.cat([dec["mask_token"].expand(len(z), grid * grid, -1), zd + dec["latent_pos_embed"]], 1)
    h, prefix = _vit(x, dec, config, heads, T, config.use_ape and not config.use_rope, depth)
    out = h[:, prefix : prefix + grid * grid] @ dec["to_pixel.model.weight"].T + dec["to_pixel.model.bias"]
    out = torch.einsum("nhwpqc->nchpwq", out.reshape(len(z), grid, grid, p, p, 3))
    return latents, out.reshape(len(z), 3, grid * p, grid * p)


VARIANTS = {
    "absolute": {},
    "registers": {"encoder_model": "vit_small_patch14_reg4_dinov2.lvd142m",
                  "decoder_model": "vit_small_patch14_reg4_dinov2.lvd142m", "dec_cls_token": False},
    "rope-mixed": {"use_rope": True, "rope_mixed": True},
    "rope-axial": {"use_rope": True, "rope_theta": 100.0},
}


def _sharp_model(variant: str) -> SoftVQVAE:
    """64 px, 6 latent tokens, 2 blocks each; attention sharper than the bf16 checks' (gain 3)."""
    config = SoftVQConfig(image_size=64, base_image_size=64, codebook_size=32, codebook_embed_dim=8, num_codebooks=2,
                          tau=0.5, num_latent_tokens=6, encoder_depth=2, decoder_depth=2, codebook_show_usage=False,
                          **VARIANTS[variant])
    torch.manual_seed(0)
    return sharpen(SoftVQVAE(config), seed=1, qk_gain=3.0)


def reference_errors(model: SoftVQVAE, images: torch.Tensor) -> dict[str, float]:
    """Relative errors of encode(images) and decode(latents) against reference_forward."""
    state = {k: v.double() for k, v in model.state_dict().items()}
    ref_latents, ref_images = reference_forward(state, model.config, vit_spec(model.config.encoder_model).heads, images.double())
    with torch.no_grad():
        return {"encode": rel_err(model.encode(images), ref_latents),
                "decode": rel_err(model.decode(ref_latents.float()), ref_images)}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_matches_float64_reference(variant):
    model = _sharp_model(variant)
    errors = reference_errors(model, torch.rand(2, 3, 64, 64) * 2 - 1)
    report(f"tokenizer float32 {variant}", errors)
    assert max(errors.values()) <= FP32_TOL, errors


@pytest.mark.parametrize("mutant", list(MUTANTS))
def test_check_fails_on_attention_mutants(mutant, monkeypatch):
    model = _sharp_model("absolute")
    inject_mutant(monkeypatch, mutant)
    errors = reference_errors(model, torch.rand(2, 3, 64, 64) * 2 - 1)
    report(f"tokenizer float32 mutant {mutant}", errors)
    assert min(errors.values()) > FP32_TOL, errors
