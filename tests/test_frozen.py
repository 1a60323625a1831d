"""Frozen networks from local files: DINOv2 in the official and timm layouts against a float64
DINOv2 written from the official definition, the patch-size resampling, and the errors a wrong
file gets (VGG16 is tested with LPIPS, DINO ViT-S/16 with the discriminator)."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file
from torch.nn import functional as F

from softvq_fast.models.config import vit_spec
from softvq_fast.training.frozen import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    FrozenDINOv2,
    FrozenWeightsError,
    load_dino_vits16,
    load_dinov2,
    resample_patch_embedding,
    resample_position_table,
)
from support.numerics import rel_err

FP32 = 1e-5
SMALL, SMALL_REG = "vit_small_patch14_dinov2.lvd142m", "vit_small_patch14_reg4_dinov2.lvd142m"
GRID = 2  # the random files' position grid: 28 px at patch 14
DEPTH = 2  # blocks of the random files (cut DINOv2-S)


def _random_timm_state(model_name: str, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """A DINOv2-S state dict in timm's layout with every tensor random (LayerScale and norms
    near 1, so that every block matters)."""
    state = FrozenDINOv2(vit_spec(model_name), 14 * GRID, 14, DEPTH).model.state_dict()
    out = {}
    for key, value in state.items():
        if key.endswith("gamma") or (("norm" in key) and key.endswith("weight")):
            out[key] = torch.rand(value.shape, generator=generator) + 0.5
        else:
            out[key] = torch.randn(value.shape, generator=generator) * (0.5 if value.dim() < 2 else value.shape[-1] ** -0.5 * 2)
    return out


def _official_from_timm(state: dict[str, torch.Tensor], generator: torch.Generator) -> dict[str, torch.Tensor]:
    """The same network in the official DINOv2 layout (mask token; with registers, a position
    row for the class token and `register_tokens`)."""
    out = dict(state)
    out["mask_token"] = torch.randn(1, state["cls_token"].shape[-1], generator=generator)
    if "reg_token" in out:
        class_position = torch.randn(1, 1, state["cls_token"].shape[-1], generator=generator)
        out["register_tokens"] = out.pop("reg_token")
        out["pos_embed"] = torch.cat([class_position, state["pos_embed"]], dim=1)
        out["cls_token"] = state["cls_token"] - class_position
    return out


def _layer_norm(x, state, name):
    return F.layer_norm(x, x.shape[-1:], state[f"{name}.weight"], state[f"{name}.bias"], eps=1e-6)


def _dinov2_reference(official: dict[str, torch.Tensor], images: torch.Tensor) -> torch.Tensor:
    """float64 DINOv2 from the official definition: pixels ImageNet-normalised, patches + class
    token + positions, registers inserted after the class token, pre-norm blocks with LayerScale
    and exact GELU, final norm; the patch tokens."""
    s = {k: v.double() for k, v in official.items()}
    mean, std = torch.tensor(IMAGENET_MEAN).double().view(1, 3, 1, 1), torch.tensor(IMAGENET_STD).double().view(1, 3, 1, 1)
    x = ((images.double() + 1) / 2 - mean) / std
    x = F.conv2d(x, s["patch_embed.proj.weight"], s["patch_embed.proj.bias"], stride=14).flatten(2).transpose(1, 2)
    b, width = x.shape[0], x.shape[-1]
    x = torch.cat([s["cls_token"].expand(b, -1, -1), x], dim=1) + s["pos_embed"]
    registers = s.get("register_tokens")
    if registers is not None:
        x = torch.cat([x[:, :1], registers.expand(b, -1, -1), x[:, 1:]], dim=1)
    heads = width // 64
    block = 0
    while f"blocks.{block}.norm1.weight" in s:
        p = f"blocks.{block}."
        h = _layer_norm(x, s, p + "norm1") @ s[p + "attn.qkv.weight"].T + s[p + "attn.qkv.bias"]
        q, k, v = h.unflatten(-1, (3, heads, 64)).permute(2, 0, 3, 1, 4)
        attn = torch.softmax(q @ k.transpose(-1, -2) / 8.0, dim=-1) @ v
        attn = attn.transpose(1, 2).flatten(2) @ s[p + "attn.proj.weight"].T + s[p + "attn.proj.bias"]
        x = x + s[p + "ls1.gamma"] * attn
        h = F.gelu(_layer_norm(x, s, p + "norm2") @ s[p + "mlp.fc1.weight"].T + s[p + "mlp.fc1.bias"])
        x = x + s[p + "ls2.gamma"] * (h @ s[p + "mlp.fc2.weight"].T + s[p + "mlp.fc2.bias"])
        block += 1
    prefix = 1 + (0 if registers is None else registers.shape[1])
    return _layer_norm(x, s, "norm")[:, prefix:]


@pytest.mark.parametrize("model_name", [SMALL, SMALL_REG])
def test_dinov2_official_and_timm_layouts_give_the_official_network(model_name, tmp_path, seed):
    generator = torch.Generator().manual_seed(seed)
    timm_state = _random_timm_state(model_name, generator)
    official = _official_from_timm(timm_state, generator)
    save_file(timm_state, str(tmp_path / "timm.safetensors"))
    torch.save(official, tmp_path / "official.pth")
    images = torch.rand(2, 3, 14 * GRID, 14 * GRID, generator=generator) * 2 - 1
    expected = _dinov2_reference(official, images)
    for name in ("official.pth", "timm.safetensors"):
        model = load_dinov2(tmp_path / name, model_name, image_size=14 * GRID, patch_size=14, depth=DEPTH)
        assert not model.training and not any(p.requires_grad for p in model.parameters())
        assert not model.train().training
        with torch.no_grad():
            assert rel_err(model(images), expected) <= FP32, name


def test_patch_kernel_resampling_keeps_the_tokens_of_resized_patches():
    kernel = torch.randn(5, 3, 14, 14)
    patches = torch.randn(7, 3, 14, 14)
    resampled = resample_patch_embedding(kernel, 16)
    assert resampled.shape == (5, 3, 16, 16)
    resized = F.interpolate(patches, size=(16, 16), mode="bicubic", antialias=True)
    tokens = torch.einsum("nchw,ochw->no", patches.double(), kernel.double())
    assert rel_err(torch.einsum("nchw,ochw->no", resized.double(), resampled.double()), tokens) <= FP32
    assert resample_patch_embedding(kernel, 14) is kernel


def test_position_table_resampling_keeps_the_prefix_and_interpolates_the_grid():
    table = torch.randn(1, 1 + 16, 8)
    resized = resample_position_table(table, 3, prefix_tokens=1)
    assert resized.shape == (1, 1 + 9, 8) and torch.equal(resized[:, :1], table[:, :1])
    grid = table[:, 1:].reshape(1, 4, 4, 8).permute(0, 3, 1, 2)
    expected = F.interpolate(grid, size=(3, 3), mode="bicubic", antialias=True).permute(0, 2, 3, 1).reshape(1, 9, 8)
    assert rel_err(resized[:, 1:], expected) <= FP32
    constant = torch.ones(1, 16, 8)  # bicubic weights sum to 1
    assert rel_err(resample_position_table(constant, 5, prefix_tokens=0), torch.ones(1, 25, 8)) <= FP32


def test_dinov2_loader_resamples_to_the_asked_patch_and_image_size(tmp_path, seed):
    generator = torch.Generator().manual_seed(seed)
    state = _random_timm_state(SMALL, generator)
    save_file(state, str(tmp_path / "timm.safetensors"))
    model = load_dinov2(tmp_path / "timm.safetensors", SMALL, image_size=48, patch_size=16, depth=DEPTH)
    assert torch.equal(model.model.patch_embed.proj.weight, resample_patch_embedding(state["patch_embed.proj.weight"], 16))
    assert torch.equal(model.model.pos_embed, resample_position_table(state["pos_embed"], 3, prefix_tokens=1))
    assert model(torch.zeros(1, 3, 48, 48)).shape == (1, 9, 384)
    with pytest.raises(ValueError, match=r"images must be \(B, 3, 48, 48\)"):
        model(torch.zeros(1, 3, 32, 32))


def test_wrong_files_name_the_file_and_the_expected_layout(tmp_path, seed, reference_dir):
    with pytest.raises(FrozenWeightsError, match=r"missing\.pth: not found \(expected a local DINOv2"):
        load_dinov2(tmp_path / "missing.pth", SMALL)
    damaged = tmp_path / "damaged.pth"
    damaged.write_bytes(b"\x80\x02 not a checkpoint")
    with pytest.raises(FrozenWeightsError, match=r"damaged\.pth: cannot be read .* DINOv2 ViT-small layout .*12 blocks"):
        load_dinov2(damaged, SMALL)
    dino = reference_dir / "vectors/training/dino_discriminator/dino_vits16_random.safetensors"
    with pytest.raises(FrozenWeightsError, match=r"dino_vits16_random\.safetensors: not the DINOv2 ViT-small .*missing keys .*blocks\.0\.ls1\.gamma"):
        load_dinov2(dino, SMALL)
    with pytest.raises(FrozenWeightsError, match=r"at least 4 blocks.*missing keys \(12\): blocks\.3\."):
        load_dino_vits16(dino, depth=4)
    base = {k: torch.zeros(v.shape[:-1] + (v.shape[-1] * 2,)) if v.shape[-1] == 384 else v
            for k, v in _random_timm_state(SMALL, torch.Generator().manual_seed(seed)).items()}
    save_file(base, str(tmp_path / "wide.safetensors"))
    with pytest.raises(FrozenWeightsError, match=r"wrong shapes .*cls_token \(1, 1, 768\) \(expected \(1, 1, 384\)\)"):
        load_dinov2(tmp_path / "wide.safetensors", SMALL, depth=DEPTH)
    with pytest.raises(FrozenWeightsError, match=r"missing keys \(140\): blocks\.10\."):
        load_dinov2(tmp_path / "wide.safetensors", SMALL)
