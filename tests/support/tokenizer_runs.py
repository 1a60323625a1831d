"""Helpers of the tokenizer-trainer tests: coloured-shape images written as PNGs, random-weight
frozen-network files in their public layouts, and a tiny training configuration."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import yaml
from PIL import Image, ImageDraw
from safetensors.torch import save_file

from softvq_fast.training.frozen import DinoViTS16, VGG16Features
from softvq_fast.training.lpips import VGG16_CHANNELS

# The tiny tokenizer: ViT-S width, 2 blocks each, 32 px in 16 px patches, 8 latent tokens, 2
# codebooks of 32 x 8; alignment to a 2-block DINOv2-S at patch 8 (16 patches: each token over 2).
TINY_MODEL = dict(preset="softvq-s-64", image_size=32, base_image_size=32, codebook_size=32, codebook_embed_dim=8,
                  num_codebooks=2, num_latent_tokens=8, encoder_depth=2, decoder_depth=2, enc_pretrained=True,
                  repa_model="vit_small_patch14_dinov2.lvd142m", repa_patch_size=8, repa_proj_dim=32)


def write_shapes(folder: Path, count: int, *, seed: int, size: tuple[int, int] = (40, 36)) -> list[Path]:
    """`count` PNGs of `size` (width, height): a flat background and one rectangle or ellipse,
    each with its own random colour, position and extent (at least a quarter of the image)."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    width, height = size
    paths = []
    for index in range(count):
        image = Image.new("RGB", size, tuple(int(c) for c in rng.integers(0, 256, 3)))
        w, h = (int(v) for v in rng.integers((width // 4, height // 4), (3 * width // 4, 3 * height // 4)))
        left, top = int(rng.integers(0, width - w)), int(rng.integers(0, height - h))
        draw = ImageDraw.Draw(image)
        shape = draw.rectangle if rng.random() < 0.5 else draw.ellipse
        shape((left, top, left + w, top + h), fill=tuple(int(c) for c in rng.integers(0, 256, 3)))
        paths.append(folder / f"shape-{index:04d}.png")
        image.save(paths[-1])
    return paths


def _randomised(module: torch.nn.Module, seed: int) -> dict[str, torch.Tensor]:
    """`module`'s state dict redrawn: matrices of unit gain, vectors of scale 0.1 (norm weights near 1)."""
    generator = torch.Generator().manual_seed(seed)
    out = {}
    for key, value in module.state_dict().items():
        if value.dim() < 2:
            base = 1.0 if "norm" in key and key.endswith("weight") else 0.0
            out[key] = base + 0.1 * torch.randn(value.shape, generator=generator)
        else:
            out[key] = torch.randn(value.shape, generator=generator) * value[0].numel() ** -0.5
    return out


def write_frozen_files(folder: Path, *, dino_depth: int = 1) -> dict[str, Path]:
    """Random DINOv2-S (timm layout, 2 blocks), DINO ViT-S/16 (official layout,
    `dino_depth` blocks and the final norm), VGG16 (torchvision layout with a classifier key) and
    LPIPS heads (the lpips package's layout) files; {"dinov2", "dino", "vgg", "lpips_heads"}."""
    from test_frozen import SMALL, _random_timm_state  # the random DINOv2-S of the frozen-network tests

    folder.mkdir(parents=True, exist_ok=True)
    files = {name: folder / f"{name}.safetensors" for name in ("dinov2", "dino", "vgg")}
    save_file(_random_timm_state(SMALL, torch.Generator().manual_seed(1)), str(files["dinov2"]))
    dino = _randomised(DinoViTS16(dino_depth), seed=2)
    dino.update({"norm.weight": torch.ones(384), "norm.bias": torch.zeros(384)})
    save_file(dino, str(files["dino"]))
    vgg = _randomised(VGG16Features(), seed=3)
    vgg["classifier.0.weight"] = torch.zeros(2, 2)
    save_file(vgg, str(files["vgg"]))
    generator = torch.Generator().manual_seed(4)
    files["lpips_heads"] = folder / "lpips_heads.pth"
    torch.save({f"lin{k}.model.1.weight": torch.rand(1, c, 1, 1, generator=generator)
                for k, c in enumerate(VGG16_CHANNELS)}, files["lpips_heads"])
    return files


def write_config(path: Path, *, model: dict | None = None, losses: dict | None = None,
                 training: dict | None = None) -> Path:
    """A train-tokenizer YAML file: the tiny model (with `model` changes), `losses`, `training`."""
    sections = {"model": {**TINY_MODEL, **(model or {})}, "losses": losses or {}, "training": training or {}}
    path.write_text(yaml.safe_dump(sections))
    return path
