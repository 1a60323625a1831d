"""The tokenizer's 2-D RoPE against a float64 complex-number formulation of the authors' math."""
from __future__ import annotations

import torch
from support.numerics import rel_err

from softvq_fast.models import rope


def _complex_reference(x: torch.Tensor, angles: torch.Tensor, start: int) -> torch.Tensor:
    """x (B, S, H, D): image tokens' channel pairs as complex numbers times exp(i * angle)."""
    out = x.double().clone()
    count = angles.shape[0]
    pairs = torch.view_as_complex(out[:, start : start + count].reshape(*x.shape[:1], count, x.shape[2], -1, 2).contiguous())
    rotated = pairs * torch.polar(torch.ones_like(angles.double()), angles.double())
    out[:, start : start + count] = torch.view_as_real(rotated).flatten(-2)
    return out


def test_axial_angles_formula():
    head_dim, theta = 16, 10.0
    angles = rope.axial_angles(head_dim, grid_h=3, grid_w=5, theta=theta)
    assert angles.shape == (15, 1, 8)
    token = 7  # row 1, column 2
    f = [theta ** (-4 * j / head_dim) for j in range(head_dim // 4)]
    expected = [2 * fj for fj in f] + [1 * fj for fj in f]
    assert torch.allclose(angles[token, 0], torch.tensor(expected), atol=1e-6)


def test_mixed_angles_formula():
    torch.manual_seed(0)
    heads, head_dim, depth = 3, 8, 2
    freqs = rope.init_mixed_frequencies(head_dim, heads, depth, theta=10.0)
    assert freqs.shape == (2, depth, heads * head_dim // 2)
    angles = rope.mixed_angles(freqs, grid_h=4, grid_w=4, heads=heads)
    assert angles.shape == (depth, 16, heads, head_dim // 2)
    x_pos, y_pos = 3 % 4, 3 // 4
    fx, fy = freqs[0, 1].view(heads, -1), freqs[1, 1].view(heads, -1)
    assert torch.allclose(angles[1, 3], x_pos * fx + y_pos * fy, atol=1e-6)
    # each head's two frequency halves are 90 degrees apart with the base magnitudes
    magnitude = torch.hypot(fx, fy)
    base = torch.tensor([10.0 ** (-4 * j / head_dim) for j in range(head_dim // 4)])
    assert torch.allclose(magnitude, base.repeat(2).expand(heads, -1), atol=1e-6)
    quarter = head_dim // 4
    dot = fx[:, :quarter] * fx[:, quarter:] + fy[:, :quarter] * fy[:, quarter:]
    assert torch.allclose(dot, torch.zeros_like(dot), atol=1e-6)


def test_rotation_matches_complex_reference_and_leaves_other_tokens():
    torch.manual_seed(1)
    prefix, patches, latents, heads, head_dim = 5, 9, 3, 2, 12  # 5 prefix tokens: cls + 4 registers
    x = torch.randn(2, prefix + patches + latents, heads, head_dim)
    for angles in (rope.axial_angles(head_dim, 3, 3, theta=100.0),
                   rope.mixed_angles(rope.init_mixed_frequencies(head_dim, heads, 1, 10.0), 3, 3, heads)[0]):
        out = rope.rotate_image_tokens(x, angles, start=prefix)
        ref = _complex_reference(x, angles, prefix)
        assert rel_err(out, ref) <= 1e-6
        assert torch.equal(out[:, :prefix], x[:, :prefix])
        assert torch.equal(out[:, prefix + patches :], x[:, prefix + patches :])
        assert not torch.allclose(out[:, prefix + 1 : prefix + patches], x[:, prefix + 1 : prefix + patches])


def test_rotation_keeps_bf16_dtype():
    x = torch.randn(1, 6, 2, 8, dtype=torch.bfloat16)
    out = rope.rotate_image_tokens(x, rope.axial_angles(8, 2, 2, 10.0), start=1)
    assert out.dtype == torch.bfloat16
