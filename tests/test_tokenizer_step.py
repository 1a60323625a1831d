"""The tokenizer-training step: every loss term against a float64 evaluation written from the
authors' formulas (the frozen networks and the tokenizer evaluated in float64, the
discriminator's logits replayed from its pre-step state with the same draws), gradients reaching
only the trained networks, and a whole iteration before and after the adversarial start.

Tiny networks: the 2-block training tokenizer (32 px, 8 tokens), LPIPS on a random VGG16 and
random heads, a random 2-block DINOv2-S for alignment (its file written here), the DINO
discriminator on the first block of the conformance data's DINO (a tap after block 0: two heads)
with fresh heads."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file
from torch.nn import functional as F

from softvq_fast.training.diffaug import diff_augment
from softvq_fast.training.discriminator import DinoDiscriminator
from softvq_fast.training.frozen import VGG16Features
from softvq_fast.training.loss_config import TokenizerLossConfig
from softvq_fast.training.lpips import LPIPS, VGG16_CHANNELS
from softvq_fast.training.tokenizer_model import load_alignment_network, tokenizer_for_training
from softvq_fast.training.tokenizer_step import NonFiniteTermError, StepDraws, TokenizerTrainingStep
from support.numerics import rel_err
from support.sharp_models import float64_copy, float64_evaluation
from support.tokenizer_training import tiny_training_config, training_forward_float64
from test_frozen import SMALL, _random_timm_state

FP32 = 1e-5
# Step 0 is before the adversarial start, step 5 after it; the perceptual ramp is still rising at 0.
LOSSES = TokenizerLossConfig(adversarial_start_step=3, perceptual_warmup_steps=4)
BEFORE, AFTER = 0, 5


@pytest.fixture(scope="module")
def networks(tmp_path_factory, reference_dir) -> dict:
    generator = torch.Generator().manual_seed(16)
    dinov2 = tmp_path_factory.mktemp("frozen") / "dinov2.safetensors"
    save_file(_random_timm_state(SMALL, generator), str(dinov2))
    heads = [torch.rand(1, c, 1, 1, generator=generator) for c in VGG16_CHANNELS]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(16)
        lpips = LPIPS(VGG16Features(), heads)
        discriminator = DinoDiscriminator.from_file(
            reference_dir / "vectors/training/dino_discriminator/dino_vits16_random.safetensors", taps=(0,)).train()
    return {
        "lpips": lpips,
        "alignment": load_alignment_network(tiny_training_config(), dinov2, depth=2),
        "discriminator": discriminator,
    }


def _copy(discriminator: DinoDiscriminator) -> DinoDiscriminator:
    """The heads copied (their parameters, batch-norm statistics and spectral-norm vectors), the
    frozen trunk shared."""
    copied = DinoDiscriminator(discriminator.dino, discriminator.taps).train(discriminator.training)
    copied.load_state_dict(discriminator.state_dict())
    return copied


def _step(networks: dict, config: TokenizerLossConfig = LOSSES, **kwargs) -> TokenizerTrainingStep:
    tokenizer = tokenizer_for_training(tiny_training_config(), seed=3)
    return TokenizerTrainingStep(tokenizer, config, lpips=networks["lpips"], alignment=networks["alignment"],
                                 discriminator=_copy(networks["discriminator"]), **kwargs)


def _images(batch: int, seed: int) -> torch.Tensor:
    return torch.rand(batch, 3, 32, 32, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def _same_state(module: torch.nn.Module, other: torch.nn.Module) -> bool:
    """Equal batch-norm counts, statistics and spectral-norm vectors (to float32 rounding: the
    step's forwards may run other backends than the replay's)."""
    return all(torch.equal(a, b) if not a.is_floating_point() else rel_err(a, b) <= FP32
               for a, b in zip(module.buffers(), other.buffers()))


def _replayed_logits(discriminator, images, draws: StepDraws, policy: str, probability: float) -> torch.Tensor:
    """D(DiffAugment(images)) with the draws the step makes next, in float64."""
    with torch.no_grad():
        return discriminator(diff_augment(images, policy, probability, draws.generator), draws.generator).double()


def test_tokenizer_terms_match_float64(networks, seed):
    step = _step(networks)
    images = _images(2, seed)
    for index in (BEFORE, AFTER):
        discriminator = _copy(step.discriminator)
        losses = step.tokenizer_losses(images, index, StepDraws.seeded(seed, index, 0))

        reference = training_forward_float64(float64_copy(step.model), images)
        fake64, x64 = reference["reconstructions"], images.double()
        lpips64, dinov2_64 = float64_copy(networks["lpips"]), float64_copy(networks["alignment"])
        with float64_evaluation():
            features = F.normalize(dinov2_64(x64), dim=-1)  # (B, 16, 384): each token over 2 patches
        tokens = F.normalize(reference["projected"], dim=-1).repeat_interleave(2, dim=1)
        generator_logits = _replayed_logits(discriminator, losses.reconstructions, StepDraws.seeded(seed, index, 0),
                                            LOSSES.diffaug_policy, LOSSES.diffaug_probability)
        expected = {
            "reconstruction": (x64 - fake64).square().mean(),
            "perceptual": lpips64(x64, fake64).mean(),
            "entropy": reference["entropy"],
            "alignment": -(tokens * features).sum(-1).mean(),
            "generator": -generator_logits.mean(),
        }
        weights = {"reconstruction": 1.0, "perceptual": min(1.0, (index + 1) / 4), "entropy": 0.01, "alignment": 0.1,
                   "generator": 0.2 if index == AFTER else 0.0}
        assert losses.weights == weights
        for name, value in expected.items():
            assert rel_err(losses.terms[name], value) <= FP32, (index, name)
        assert rel_err(losses.loss, sum(weights[k] * v for k, v in expected.items())) <= FP32
        assert _same_state(step.discriminator, discriminator)  # exactly the one replayed forward
        assert set(losses.stats) == {"codebook_usage", "max_prob", "zq_z_cos"}


def test_discriminator_terms_match_float64(networks, seed):
    step = _step(networks)
    images, fake = _images(2, seed), _images(2, seed + 1) * 0.5
    ema_real = ema_fake = 0.0
    for index in (BEFORE, AFTER):
        discriminator = _copy(step.discriminator)
        losses = step.discriminator_losses(images, fake, index, StepDraws.seeded(seed, index, 1))

        draws = StepDraws.seeded(seed, index, 1)
        real_logits, fake_logits = (_replayed_logits(discriminator, x, draws, LOSSES.diffaug_policy, 0.5) for x in (images, fake))
        strong = [_replayed_logits(discriminator, x, draws, LOSSES.consistency_policy, 1.0) for x in (images, fake)]
        ema_real = 0.999 * ema_real + 0.001 * float(real_logits.mean())
        ema_fake = 0.999 * ema_fake + 0.001 * float(fake_logits.mean())
        expected = {
            "hinge": 0.5 * (F.relu(1 - real_logits).mean() + F.relu(1 + fake_logits).mean()),
            "lecam": F.relu(real_logits - ema_fake).square().mean() + F.relu(ema_real - fake_logits).square().mean(),
            "consistency": (torch.cat([real_logits, fake_logits]) - torch.cat(strong)).square().mean(),
        }
        on = index == AFTER
        weights = {"hinge": 0.2 * on, "lecam": 0.2 * 0.001 * on, "consistency": 4.0 * on}
        assert losses.weights == weights
        for name, value in expected.items():
            assert rel_err(losses.terms[name], value) <= FP32, (index, name)
        assert abs(float(step.lecam.real) - ema_real) <= FP32 * abs(ema_real)
        assert abs(float(step.lecam.fake) - ema_fake) <= FP32 * abs(ema_fake)
        if on:
            assert rel_err(losses.loss, sum(weights[k] * v for k, v in expected.items())) <= FP32
        else:
            assert losses.loss is None  # forwards only: nothing to train before the start
        assert _same_state(step.discriminator, discriminator)

    restored = _step(networks)
    restored.load_state_dict(step.state_dict())
    assert (float(restored.lecam.real), float(restored.lecam.fake)) == (float(step.lecam.real), float(step.lecam.fake))


def test_a_whole_iteration_trains_only_the_trained_networks(networks, seed):
    config = TokenizerLossConfig(adversarial_start_step=2, perceptual_warmup_steps=4)
    step = _step(networks, config)
    tokenizer, discriminator = step.model, step.discriminator
    frozen = [networks["lpips"], networks["alignment"], discriminator.dino]
    trained = {name: p for name, p in tokenizer.named_parameters() if p.requires_grad}
    optimiser = torch.optim.AdamW(trained.values(), lr=1e-4)
    discriminator_optimiser = torch.optim.AdamW(discriminator.parameters(), lr=1e-4)
    images = _images(2, seed)
    pixel_head = tokenizer.decoder.to_pixel.model.weight
    for index in (0, 1):  # before the start, then the first adversarial iteration
        if index == 1:
            # The same iteration without the adversarial term: its gradient must differ (the
            # generator term's gradient reaches the tokenizer through x̂).
            without = TokenizerTrainingStep(tokenizer, TokenizerLossConfig(adversarial_start_step=10, perceptual_warmup_steps=4),
                                            lpips=networks["lpips"], alignment=networks["alignment"],
                                            discriminator=_copy(discriminator))
            loss = without.tokenizer_losses(images, index, StepDraws.seeded(seed, index, 0)).loss
            gradient_without, = torch.autograd.grad(loss, pixel_head)
        losses = step.tokenizer_losses(images, index, StepDraws.seeded(seed, index, 0))
        losses.loss.backward()
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in trained.values())
        assert all(p.grad is None and p.requires_grad for p in discriminator.parameters())
        assert all(p.grad is None for network in frozen for p in network.parameters())
        if index == 1:
            assert losses.weights["generator"] == 0.2
            assert rel_err(pixel_head.grad, gradient_without) > 1e-3
        optimiser.step()
        optimiser.zero_grad(set_to_none=True)
        result = step.discriminator_losses(images, losses.reconstructions, index, StepDraws.seeded(seed, index, 1))
        assert (result.loss is None) == (index == 0)
        if result.loss is not None:
            result.loss.backward()
            assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in discriminator.parameters())
            assert all(p.grad is None for p in trained.values())
            discriminator_optimiser.step()
        assert all(torch.isfinite(v) for v in {**losses.terms, **result.terms}.values())


def test_a_non_finite_term_is_named(networks, monkeypatch, seed):
    step = _step(networks, TokenizerLossConfig(adversarial_weight=0.0), check_finite=True)
    assert step.discriminator is None and step.discriminator_losses(_images(1, 0), _images(1, 1), 5, None) is None
    monkeypatch.setattr(LPIPS, "forward", lambda self, x, y: torch.full((x.shape[0],), float("inf")))
    with pytest.raises(NonFiniteTermError, match=r"step 7: the loss term 'perceptual' is inf"):
        step.tokenizer_losses(_images(2, seed), 7, StepDraws.seeded(seed, 7, 0))


def test_missing_networks_are_named(networks):
    tokenizer = tokenizer_for_training(tiny_training_config(), seed=0)
    with pytest.raises(ValueError, match=r"lpips: perceptual_weight=1\.0 needs the LPIPS network"):
        TokenizerTrainingStep(tokenizer, LOSSES, alignment=networks["alignment"], discriminator=networks["discriminator"])
    with pytest.raises(ValueError, match=r"discriminator: adversarial_weight=0\.2 needs the discriminator"):
        TokenizerTrainingStep(tokenizer, LOSSES, lpips=networks["lpips"], alignment=networks["alignment"])
    plain = tokenizer_for_training(tiny_training_config(repa=False), seed=0)
    with pytest.raises(ValueError, match=r"tokenizer: alignment_weight=0\.1 needs the tokenizer's projector"):
        TokenizerTrainingStep(plain, LOSSES, lpips=networks["lpips"], alignment=networks["alignment"],
                              discriminator=networks["discriminator"])
