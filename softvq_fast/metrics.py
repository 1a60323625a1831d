"""Image reconstruction metrics on (B, 3, H, W) tensors with values in [0, 1]."""
from __future__ import annotations

import torch
import torch.nn.functional as F

SSIM_WINDOW = 11
SSIM_SIGMA = 1.5
SSIM_K1, SSIM_K2 = 0.01, 0.03


def _check_images(a: torch.Tensor, b: torch.Tensor, function: str) -> None:
    """ValueError naming `a` or `b` unless both are floating (B, C, H, W) tensors of one shape."""
    for name, x in (("a", a), ("b", b)):
        if not isinstance(x, torch.Tensor) or x.dim() != 4 or not x.is_floating_point():
            described = f"{x.dtype} tensor of shape {tuple(x.shape)}" if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"{function}: {name} must be a floating (B, C, H, W) tensor in [0, 1], got a {described}")
    if a.shape != b.shape:
        raise ValueError(f"{function} needs a and b of the same shape, got {tuple(a.shape)} and {tuple(b.shape)}")


def psnr(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Peak signal-to-noise ratio in dB per image (B,), data range 1."""
    _check_images(a, b, "psnr")
    mse = (a.double() - b.double()).square().flatten(1).mean(1)
    return 10 * torch.log10(1.0 / mse.clamp_min(1e-20))


def _gaussian_window(device: torch.device) -> torch.Tensor:
    offsets = torch.arange(SSIM_WINDOW, dtype=torch.float64, device=device) - SSIM_WINDOW // 2
    g = torch.exp(-offsets.square() / (2 * SSIM_SIGMA**2))
    g = g / g.sum()
    return torch.outer(g, g)


def ssim(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Structural similarity per image (B,), data range 1: Gaussian window 11 x 11, sigma 1.5,
    K1 = 0.01, K2 = 0.03, population (co)variances, averaged over the positions where the window
    fits inside the image and over channels (skimage's `structural_similarity` with
    gaussian_weights=True, use_sample_covariance=False, channel_axis=0). Images need H, W >= 11."""
    _check_images(a, b, "ssim")
    if min(a.shape[-2:]) < SSIM_WINDOW:
        raise ValueError(f"ssim needs images of at least {SSIM_WINDOW}x{SSIM_WINDOW}, got {tuple(a.shape[-2:])}")
    channels = a.shape[1]
    window = _gaussian_window(a.device).expand(channels, 1, -1, -1)
    x, y = a.double(), b.double()

    def blur(t: torch.Tensor) -> torch.Tensor:
        return F.conv2d(t, window, groups=channels)

    mu_x, mu_y = blur(x), blur(y)
    var_x = blur(x * x) - mu_x.square()
    var_y = blur(y * y) - mu_y.square()
    cov = blur(x * y) - mu_x * mu_y
    c1, c2 = SSIM_K1**2, SSIM_K2**2
    s = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x.square() + mu_y.square() + c1) * (var_x + var_y + c2))
    return s.flatten(1).mean(1)
