"""Helpers shared by the tokenizer tool tests: a tiny saved tokenizer and scikit-image's sample photos."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from softvq_fast.models import SoftVQConfig, SoftVQVAE

SAMPLES = {"cats/chelsea.png": "chelsea", "misc/astronaut.png": "astronaut", "misc/coffee.jpg": "coffee",
           "misc/camera.png": "camera", "misc/rocket.png": "rocket"}


def save_tiny_tokenizer(directory: Path, seed: int = 0) -> SoftVQVAE:
    """A random tokenizer (ViT-S width, 1 block each, 32 px, 4 tokens, 2 codebooks of 16 x 8), saved.
    Its layer scales are 1, not DINOv2's initial 1e-5, so that the latents depend on the image
    (otherwise every image's latents agree to about 1e-5 and a test cannot tell two images apart)."""
    torch.manual_seed(seed)
    config = SoftVQConfig(image_size=32, base_image_size=32, codebook_size=16, codebook_embed_dim=8, num_codebooks=2,
                          tau=0.07, num_latent_tokens=4, encoder_depth=1, decoder_depth=1, codebook_show_usage=False)
    model = SoftVQVAE(config)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith(".gamma"):
                parameter.fill_(1.0)
    model.save_pretrained(directory)
    return model


def write_sample_images(folder: Path) -> list[Path]:
    """scikit-image's bundled photos (nothing downloads) in two class subfolders."""
    from skimage import data

    paths = []
    for relative, name in SAMPLES.items():
        path = folder / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.asarray(getattr(data, name)())).save(path)
        paths.append(path)
    return paths


def write_png16(path: Path, pixels: np.ndarray) -> None:
    """A 16-bit PNG (grayscale for (H, W), RGB for (H, W, 3) uint16 pixels), encoded by hand:
    Pillow reads 16-bit RGB PNGs but cannot write them."""
    import struct
    import zlib

    height, width = pixels.shape[:2]
    color_type = 2 if pixels.ndim == 3 else 0
    rows = pixels.astype(">u2").reshape(height, -1)
    raw = b"".join(b"\x00" + row.tobytes() for row in rows)  # filter type 0 on every row

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    header = struct.pack(">IIBBBBB", width, height, 16, color_type, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))
