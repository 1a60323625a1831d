"""Tokenizer loss terms, DiffAugment and the loss configuration against float64 evaluations
written from the definitions (the authors' formulas) in this file."""
from __future__ import annotations

import math

import pytest
import torch

from softvq_fast.training.diffaug import diff_augment
from softvq_fast.training.loss_config import TokenizerLossConfig
from softvq_fast.training.tokenizer_losses import (
    AlignmentProjector,
    LeCAMEMA,
    adaptive_weight,
    alignment_loss,
    consistency_loss,
    discriminator_hinge_loss,
    generator_hinge_loss,
    lecam_regulariser,
    reconstruction_loss,
)
from support.numerics import rel_err

FP32 = 1e-5


def _logits(*shape: int) -> torch.Tensor:
    # Spread around the hinge points -1 and 1 so that every relu has both branches.
    return torch.randn(*shape) * 1.5


def test_reconstruction_loss_is_mean_squared_error():
    images, recon = torch.randn(3, 3, 7, 9), torch.randn(3, 3, 7, 9)
    expected = sum(float(a - b) ** 2 for a, b in zip(images.double().flatten(), recon.double().flatten())) / images.numel()
    assert rel_err(reconstruction_loss(images, recon), torch.tensor(expected)) <= FP32
    with pytest.raises(ValueError, match="reconstructions"):
        reconstruction_loss(images, recon[:, :, :6])


def test_hinge_losses_match_their_definitions():
    real, fake = _logits(4, 196), _logits(4, 196)
    r, f = real.double().flatten().tolist(), fake.double().flatten().tolist()
    d_expected = 0.5 * (sum(max(0.0, 1 - v) for v in r) / len(r) + sum(max(0.0, 1 + v) for v in f) / len(f))
    assert rel_err(discriminator_hinge_loss(real, fake), torch.tensor(d_expected)) <= FP32
    assert rel_err(generator_hinge_loss(fake), torch.tensor(-sum(f) / len(f))) <= FP32


def test_lecam_updates_its_averages_before_the_regulariser():
    ema = LeCAMEMA(decay=0.999)
    ema_real = ema_fake = 0.0
    for _ in range(3):
        real, fake = _logits(2, 50) + 0.5, _logits(2, 50) - 0.5
        r, f = real.double().flatten().tolist(), fake.double().flatten().tolist()
        ema_real = ema_real * 0.999 + sum(r) / len(r) * 0.001
        ema_fake = ema_fake * 0.999 + sum(f) / len(f) * 0.001
        expected = (sum(max(0.0, v - ema_fake) ** 2 for v in r) / len(r)
                    + sum(max(0.0, ema_real - v) ** 2 for v in f) / len(f))
        assert rel_err(lecam_regulariser(real, fake, ema), torch.tensor(expected)) <= FP32
    assert math.isclose(float(ema.real), ema_real, rel_tol=FP32)
    assert math.isclose(float(ema.fake), ema_fake, rel_tol=FP32)


def test_lecam_state_round_trips():
    ema = LeCAMEMA(decay=0.9)
    ema.update(_logits(3, 5), _logits(3, 5))
    restored = LeCAMEMA()
    restored.load_state_dict(ema.state_dict())
    assert (restored.decay, float(restored.real), float(restored.fake)) == (0.9, float(ema.real), float(ema.fake))


def test_consistency_loss_averages_over_real_and_fake_views():
    real, fake, real_s, fake_s = (_logits(3, 392) for _ in range(4))
    squares = [(a - b) ** 2 for a, b in zip(real.double().flatten().tolist(), real_s.double().flatten().tolist())]
    squares += [(a - b) ** 2 for a, b in zip(fake.double().flatten().tolist(), fake_s.double().flatten().tolist())]
    assert rel_err(consistency_loss(real, fake, real_s, fake_s), torch.tensor(sum(squares) / len(squares))) <= FP32


def _alignment_reference(tokens: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
    """-mean over (b, n) of cos(tokens[b, n // (N / T)], features[b, n]) in float64."""
    tokens, features = tokens.double(), features.double()
    b, t, _ = tokens.shape
    n = features.shape[1]
    total = 0.0
    for i in range(b):
        for j in range(n):
            u, v = tokens[i, j // (n // t)], features[i, j]
            total += float(u @ v / (u.norm() * v.norm()))
    return torch.tensor(-total / (b * n))


def test_alignment_loss_repeats_each_token_over_consecutive_patches():
    tokens = torch.randn(2, 4, 24, requires_grad=True)
    features = torch.randn(2, 12, 24) * 3
    loss = alignment_loss(tokens, features)
    assert rel_err(loss, _alignment_reference(tokens.detach(), features)) <= FP32
    # Gradient against the float64 evaluation differentiated by autograd.
    tokens64 = tokens.detach().double().requires_grad_(True)
    reference = -torch.nn.functional.cosine_similarity(
        tokens64.repeat_interleave(3, dim=1), features.double(), dim=-1, eps=0.0
    ).mean()
    (grad,) = torch.autograd.grad(loss, tokens)
    (grad_ref,) = torch.autograd.grad(reference, tokens64)
    assert rel_err(grad, grad_ref) <= FP32
    with pytest.raises(ValueError, match="multiple of the token count"):
        alignment_loss(tokens, features[:, :10])


def test_alignment_projector_layout_and_math():
    projector = AlignmentProjector(8, 16, 12)
    assert list(projector.state_dict()) == [f"{i}.{p}" for i in (0, 2, 4) for p in ("weight", "bias")]
    assert [tuple(projector.state_dict()[f"{i}.weight"].shape) for i in (0, 2, 4)] == [(16, 8), (16, 16), (12, 16)]
    x = torch.randn(2, 5, 8)
    w = {k: v.double() for k, v in projector.state_dict().items()}
    silu = lambda v: v / (1 + torch.exp(-v))  # noqa: E731
    h = silu(x.double() @ w["0.weight"].T + w["0.bias"])
    h = silu(h @ w["2.weight"].T + w["2.bias"])
    assert rel_err(projector(x), h @ w["4.weight"].T + w["4.bias"]) <= FP32


def test_adaptive_weight_is_the_gradient_norm_ratio():
    layer = torch.randn(6, 5, requires_grad=True)
    x = torch.randn(4, 6)
    nll = (x @ layer).square().mean()
    adversarial = -(x @ layer).tanh().mean()
    weight = adaptive_weight(nll, adversarial, layer)
    layer64, x64 = layer.detach().double().requires_grad_(True), x.double()
    (g1,) = torch.autograd.grad((x64 @ layer64).square().mean(), layer64)
    (g2,) = torch.autograd.grad(-(x64 @ layer64).tanh().mean(), layer64)
    assert rel_err(weight, g1.norm() / (g2.norm() + 1e-4)) <= FP32
    assert not weight.requires_grad
    (nll + weight * adversarial).backward()  # the graph was kept for the total loss


# ---------------------------------------------------------------------------------------------
# DiffAugment


def _augment_reference(x: torch.Tensor, policy: list[str], probability: float,
                       draws: torch.Generator) -> tuple[torch.Tensor, list[bool]]:
    """DiffAugment from its definitions in float64 with loops, drawing from `draws` in the
    documented order (per augmentation: the batch's coin, then the per-sample values); also
    which augmentations were applied."""
    x = x.double().clone()
    b, c, h, w = x.shape
    applied = []
    for name in policy:
        applied.append(float(torch.rand((), generator=draws)) <= probability)
        if not applied[-1]:
            continue
        if name == "color":
            brightness, saturation, contrast = (torch.rand(b, generator=draws).double() for _ in range(3))
            for i in range(b):
                x[i] = x[i] + brightness[i] - 0.5
                pixel_mean = x[i].mean(dim=0)
                x[i] = (x[i] - pixel_mean) * 2 * saturation[i] + pixel_mean
                x[i] = (x[i] - x[i].mean()) * (contrast[i] + 0.5) + x[i].mean()
        elif name == "translation":
            sh, sw = int(h / 8 + 0.5), int(w / 8 + 0.5)
            dy, dx = torch.randint(-sh, sh + 1, (b,), generator=draws), torch.randint(-sw, sw + 1, (b,), generator=draws)
            out = torch.zeros_like(x)
            for i in range(b):
                for r in range(h):
                    for col in range(w):
                        sr, sc = r + int(dy[i]), col + int(dx[i])
                        if 0 <= sr < h and 0 <= sc < w:
                            out[i, :, r, col] = x[i, :, sr, sc]
            x = out
        else:
            ratio = float(name.split("_")[1])
            ch, cw = int(h * ratio + 0.5), int(w * ratio + 0.5)
            cy = torch.randint(0, h + 1 - ch % 2, (b,), generator=draws)
            cx = torch.randint(0, w + 1 - cw % 2, (b,), generator=draws)
            for i in range(b):
                top, left = int(cy[i]) - ch // 2, int(cx[i]) - cw // 2
                x[i, :, max(top, 0):max(top + ch, 0), max(left, 0):max(left + cw, 0)] = 0
    return x, applied


@pytest.mark.parametrize("policy,probability", [
    ("color,translation,cutout_0.2", 0.5),
    ("color,translation,cutout_0.5", 1.0),
    ("translation,cutout_0.3", 0.7),
])
def test_diff_augment_matches_its_definition(policy, probability, seed):
    x = torch.randn(3, 3, 9, 11)
    decisions = set()
    for offset in range(6):
        generator = torch.Generator().manual_seed(seed + offset)
        draws = torch.Generator().set_state(generator.get_state())
        out = diff_augment(x, policy, probability, generator)
        expected, applied = _augment_reference(x, policy.split(","), probability, draws)
        assert rel_err(out, expected) <= FP32
        decisions.update(applied)
    assert decisions == ({True, False} if probability < 1 else {True})


def test_diff_augment_probability_is_per_batch():
    x = torch.randn(8, 3, 16, 16)
    for seed in range(10):
        out = diff_augment(x, "cutout_0.5", 0.5, torch.Generator().manual_seed(seed))
        changed = (out != x).flatten(1).any(dim=1)
        assert bool(changed.all()) or not bool(changed.any())


def test_diff_augment_slices_of_a_global_batch_equal_the_whole():
    x = torch.randn(6, 3, 12, 12)
    whole = diff_augment(x, "color,translation,cutout_0.2", 1.0, torch.Generator().manual_seed(3))
    parts = [diff_augment(x[i:i + 3], "color,translation,cutout_0.2", 1.0, torch.Generator().manual_seed(3), (i, 6))
             for i in (0, 3)]
    assert torch.equal(torch.cat(parts), whole)


def test_diff_augment_is_differentiable_and_checks_its_arguments():
    x = torch.randn(2, 3, 6, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda v: diff_augment(v, "color,translation,cutout_0.4", 1.0, torch.Generator().manual_seed(0)), (x,)
    )
    with pytest.raises(ValueError, match="unknown augmentation 'blur'"):
        diff_augment(x, "color,blur")
    with pytest.raises(ValueError, match="probability"):
        diff_augment(x, "color", 1.5)


# ---------------------------------------------------------------------------------------------
# Configuration


def test_default_config_is_the_authors_softvq_l_64_schedule():
    config = TokenizerLossConfig()
    first = config.loss_weights_at(0)
    assert first.perceptual == pytest.approx(1e-4) and first.generator == 0.0 and first.consistency == 0.0
    assert (first.reconstruction, first.entropy, first.alignment) == (1.0, 0.01, 0.1)
    assert config.loss_weights_at(4999).perceptual == pytest.approx(0.5)
    assert config.loss_weights_at(9999).perceptual == 1.0
    before, on = config.loss_weights_at(19998), config.loss_weights_at(19999)
    assert (before.generator, before.discriminator, before.lecam, before.consistency) == (0.0, 0.0, 0.0, 0.0)
    assert (on.generator, on.discriminator, on.consistency) == (0.2, 0.2, 4.0)
    assert on.lecam == pytest.approx(0.2 * 0.001)
    assert (config.diffaug_policy, config.diffaug_probability, config.lecam_decay) == (
        "color,translation,cutout_0.2", 0.5, 0.999)
    assert not config.adaptive_weight


def test_config_yaml_round_trip_overrides_and_errors(tmp_path):
    config = TokenizerLossConfig(perceptual_weight=0.0, adversarial_start_step=0, diffaug_policy="translation")
    path = tmp_path / "losses.yaml"
    config.save(path)
    assert TokenizerLossConfig.load(path) == config
    assert config.loss_weights_at(0).perceptual == 0.0 and config.loss_weights_at(0).generator == 0.2
    assert TokenizerLossConfig.from_yaml("lecam_weight: 1e-3\n").lecam_weight == 0.001
    path.write_text("lpips_weight: 1.0\n")
    with pytest.raises(ValueError, match="unknown loss config fields \\['lpips_weight'\\]"):
        TokenizerLossConfig.load(path)
    with pytest.raises(ValueError, match="diffaug_probability"):
        TokenizerLossConfig.from_yaml("diffaug_probability: 2\n")
    with pytest.raises(ValueError, match="consistency_policy"):
        TokenizerLossConfig(consistency_policy="colour")
    with pytest.raises(ValueError, match="adaptive_weight"):
        TokenizerLossConfig.from_yaml("adaptive_weight: 1\n")
