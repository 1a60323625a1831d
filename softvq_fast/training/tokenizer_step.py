"""The losses of one tokenizer-training iteration, in the order of the authors' training script
and loss module, for a trainer that owns the optimisers, the updates and the loop.

`tokenizer_losses(images x, step, draws)`:
  the tokenizer's training forward (drop path from `draws`): x̂, the latents, the entropy term
  reconstruction  mean (x - x̂)²
  perceptual      mean over the images of LPIPS-VGG(x, x̂) (its weight ramped, loss_config)
  entropy         the soft-VQ entropy regulariser (SoftVQVAE.training_forward), its mean code
                  distribution over the batch of all processes (tokenizer_losses.pooled_entropy)
  alignment       -mean cos(projection(latents) repeated over N / T patches, DINOv2(x)), the
                  frozen DINOv2 on the real images without gradient
  generator       -mean D(DiffAugment(x̂)), D in training mode (its batch-norm statistics and
                  spectral-norm vectors move) with its heads taking no gradient; from the
                  adversarial start. Before it, with `discriminator_forwards_before_start` (the
                  authors' behaviour), the same forward runs without gradient (weight 0).
  loss = Σ weight x term (x the adaptive weight on the generator term when enabled)
The trainer then updates the tokenizer (backward, clip, AdamW, EMA) and calls
`discriminator_losses(x, x̂ of that same forward, step, draws)`:
  real = D(DiffAugment(x)), fake = D(DiffAugment(x̂)), separate calls (separate batch statistics)
  hinge           0.5 (mean relu(1 - real) + mean relu(1 + fake))
  lecam           the LeCAM regulariser, its EMAs first updated with this step's mean logits
  consistency     mean squared difference between (real, fake) and D on strongly augmented views
                  (consistency_policy, probability 1 by default) of x and x̂, D called on each
  loss = discriminator weight x hinge + lecam weight x lecam + consistency weight x consistency
Before the adversarial start nothing is trained (`loss` None); with
`discriminator_forwards_before_start` the forwards run without gradient and their zero-weighted
terms are reported, so that the LeCAM EMAs, batch-norm statistics and spectral-norm vectors move
from the first step as the authors' do. A term whose config weight is 0 is not computed (except
reconstruction and entropy, which the forward gives anyway).

Randomness: every draw of a call (drop path, DiffAugment, the discriminator's crop) comes from
`StepDraws.generator`, in the order the call makes them; nothing touches a global generator.
With `StepDraws.rows`, per-sample draws are made for the whole batch and sliced, so that
processes holding parts of one batch with equal generator states (and batch norm synchronised
across them) compute what one process computes on the whole batch.

Distributed training: pass the DistributedDataParallel wrappers as `runner` to the calls; the
tokenizer-side discriminator forward always calls the unwrapped module (its heads' gradients are
not wanted there, so nothing is all-reduced for them).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch
from torch import nn

from softvq_fast.data import mix_seed
from softvq_fast.models.softvq_vae import SoftVQVAE, TrainingOutputs
from softvq_fast.models.vit import DropPathDraws
from softvq_fast.training.diffaug import diff_augment
from softvq_fast.training.discriminator import DinoDiscriminator
from softvq_fast.training.frozen import FrozenDINOv2
from softvq_fast.training.loss_config import TokenizerLossConfig
from softvq_fast.training.lpips import LPIPS
from softvq_fast.training.tokenizer_losses import (
    LeCAMEMA,
    adaptive_weight,
    alignment_loss,
    consistency_loss,
    discriminator_hinge_loss,
    generator_hinge_loss,
    lecam_regulariser,
    pooled_entropy,
    reconstruction_loss,
)

__all__ = ["StepDraws", "TokenizerLosses", "DiscriminatorLosses", "TokenizerTrainingStep", "NonFiniteTermError"]

# Which LossWeights field weights each term.
TOKENIZER_TERMS = {"reconstruction": "reconstruction", "perceptual": "perceptual", "entropy": "entropy",
                   "alignment": "alignment", "generator": "generator"}
DISCRIMINATOR_TERMS = {"hinge": "discriminator", "lecam": "lecam", "consistency": "consistency"}


class NonFiniteTermError(FloatingPointError):
    """A loss term that is inf or nan: `step`, `term` (its name) and `value`."""

    def __init__(self, step: int, term: str, value: float) -> None:
        super().__init__(f"step {step}: the loss term {term!r} is {value}")
        self.step, self.term, self.value = step, term, value


@dataclass(frozen=True)
class StepDraws:
    """The random source of one call: `generator`, and `rows` = (this process's first row, the
    batch size over all processes) when other processes hold the rest of the batch and draw from
    the same generator state (None: the batch is this process's alone)."""

    generator: torch.Generator
    rows: tuple[int, int] | None = None

    @classmethod
    def seeded(cls, *values: int, rows: tuple[int, int] | None = None, device: str | torch.device = "cpu") -> "StepDraws":
        """A generator on `device` seeded by softvq_fast.data.mix_seed(*values), e.g. (seed, step,
        micro-batch, 0) for the tokenizer call and (..., 1) for the discriminator call."""
        return cls(torch.Generator(device=device).manual_seed(mix_seed(*values)), rows)

    def drop_path(self) -> DropPathDraws:
        first, total = self.rows if self.rows is not None else (0, None)
        return DropPathDraws(self.generator, first, total)


@dataclass
class TokenizerLosses:
    """loss: the weighted sum to minimise (with its graph). terms: each computed term before its
    weight (detached float32 scalars), weights: its weight at this step. reconstructions: x̂
    (detached), the discriminator step's fake images. code_counts (C, K): argmax picks per code.
    stats: codebook_usage (fraction of codes picked in the batch), max_prob, zq_z_cos and, when
    enabled, adaptive_weight."""

    loss: torch.Tensor
    terms: dict[str, torch.Tensor]
    weights: dict[str, float]
    reconstructions: torch.Tensor
    code_counts: torch.Tensor
    stats: dict[str, torch.Tensor] = field(default_factory=dict)

    def as_terms(self, prefix: str = "tokenizer") -> dict[str, torch.Tensor]:
        """{"loss": loss, "<prefix>/<term>": value, "<prefix>/<stat>": value} for a training loop."""
        return {"loss": self.loss, **{f"{prefix}/{k}": v for k, v in {**self.terms, **self.stats}.items()}}


@dataclass
class DiscriminatorLosses:
    """loss: the weighted sum to minimise, None before the adversarial start (the forwards ran
    without gradient: nothing to train). terms / weights as in TokenizerLosses; stats: the mean
    real and fake logits."""

    loss: torch.Tensor | None
    terms: dict[str, torch.Tensor]
    weights: dict[str, float]
    stats: dict[str, torch.Tensor] = field(default_factory=dict)

    def as_terms(self, prefix: str = "discriminator") -> dict[str, torch.Tensor]:
        values = {f"{prefix}/{k}": v for k, v in {**self.terms, **self.stats}.items()}
        return {"loss": self.loss, **values} if self.loss is not None else values


def _unwrap(module: nn.Module) -> nn.Module:
    """The module inside torch.compile and DistributedDataParallel wrappers."""
    module = getattr(module, "_orig_mod", module)
    return getattr(module, "module", module)


@contextlib.contextmanager
def _without_parameter_grads(module: nn.Module) -> Iterator[None]:
    """Within the block no parameter of `module` requires a gradient (inputs still get theirs)."""
    flags = [(p, p.requires_grad) for p in module.parameters()]
    for parameter, _ in flags:
        parameter.requires_grad_(False)
    try:
        yield
    finally:
        for parameter, flag in flags:
            parameter.requires_grad_(flag)


def _weighted(terms: dict[str, torch.Tensor], weights: dict[str, float]) -> torch.Tensor:
    return sum(weights[name] * value for name, value in terms.items())


class TokenizerTrainingStep:
    """The two loss computations of an iteration (module docstring).

    tokenizer: the SoftVQVAE in training (softvq_fast.training.tokenizer_model), its projector
        `projection` needed when alignment_weight > 0.
    loss_config: weights, schedules and augmentations (the authors' defaults).
    lpips: needed when perceptual_weight > 0; alignment: the frozen DINOv2 (load_alignment_network),
        needed when alignment_weight > 0; discriminator: needed when adversarial_weight > 0.
    discriminator_forwards_before_start: run the discriminator's forwards (without gradient)
        before the adversarial start too, as the authors do (default).
    autocast_dtype: run the networks under autocast (the soft quantiser stays float32).
    check_finite: raise NonFiniteTermError naming the first inf or nan term (one device sync per
        call; a loop that checks its logged terms does not need it).
    `lecam` holds the LeCAM EMAs (state_dict / load_state_dict for checkpoints)."""

    def __init__(
        self,
        tokenizer: SoftVQVAE,
        loss_config: TokenizerLossConfig,
        *,
        lpips: LPIPS | None = None,
        alignment: FrozenDINOv2 | None = None,
        discriminator: DinoDiscriminator | None = None,
        discriminator_forwards_before_start: bool = True,
        autocast_dtype: torch.dtype | None = None,
        check_finite: bool = False,
    ) -> None:
        loss_config.validate()
        model = _unwrap(tokenizer)
        required = (
            ("lpips", lpips, "perceptual_weight", "the LPIPS network"),
            ("alignment", alignment, "alignment_weight", "the frozen alignment DINOv2"),
            ("discriminator", discriminator, "adversarial_weight", "the discriminator"),
        )
        for argument, value, weight, what in required:
            if value is None and getattr(loss_config, weight) > 0:
                raise ValueError(f"{argument}: {weight}={getattr(loss_config, weight)} needs {what} (or set {weight} to 0)")
        if loss_config.alignment_weight > 0 and getattr(model, "projection", None) is None:
            raise ValueError(f"tokenizer: alignment_weight={loss_config.alignment_weight} needs the tokenizer's projector "
                             "`projection` (tokenizer_for_training(..., alignment=True))")
        self.tokenizer, self.model, self.config = tokenizer, model, loss_config
        self.lpips = lpips if loss_config.perceptual_weight > 0 else None
        self.alignment = alignment if loss_config.alignment_weight > 0 else None
        self.discriminator = discriminator if loss_config.adversarial_weight > 0 else None
        self.forwards_before_start = discriminator_forwards_before_start
        self.autocast_dtype = autocast_dtype
        self.check_finite = check_finite
        self.lecam = LeCAMEMA(loss_config.lecam_decay)

    # ------------------------------------------------------------------------------- tokenizer
    def tokenizer_losses(self, images: torch.Tensor, step: int, draws: StepDraws, *,
                         runner: Callable[..., TrainingOutputs] | None = None) -> TokenizerLosses:
        """The tokenizer's loss on images (B, 3, S, S) in [-1, 1] after `step` tokenizer updates
        (TokenizerLossConfig.loss_weights_at). `runner`: what runs the tokenizer's forward (its
        DistributedDataParallel wrapper; default the tokenizer)."""
        weights = self.config.loss_weights_at(step)
        runner = self.tokenizer if runner is None else runner
        outputs = runner(images, training_outputs=True, draws=draws.drop_path(), autocast_dtype=self.autocast_dtype)
        fake = outputs.reconstructions
        rows = outputs.latents.shape[0] * outputs.latents.shape[1]
        terms = {"reconstruction": reconstruction_loss(images, fake),
                 "entropy": pooled_entropy(outputs.entropy_loss, outputs.entropy_column_sum, rows)}
        with self._autocast(images):
            if self.lpips is not None:
                terms["perceptual"] = self.lpips(images, fake).float().mean()
            if self.alignment is not None:
                with torch.no_grad():
                    features = self.alignment(images)
                terms["alignment"] = alignment_loss(outputs.projected.float(), features.float())
            adversarial = weights.generator > 0
            if self.discriminator is not None and (adversarial or self.forwards_before_start):
                terms["generator"] = self._generator_loss(fake, draws, adversarial)
        term_weights = {name: getattr(weights, TOKENIZER_TERMS[name]) for name in terms}
        stats = {"codebook_usage": (outputs.code_counts > 0).float().mean(), "max_prob": outputs.max_prob.detach(),
                 "zq_z_cos": outputs.cos.detach()}
        if self.config.adaptive_weight and adversarial:
            nll = _weighted({k: terms[k] for k in terms if k in ("reconstruction", "perceptual")}, term_weights)
            stats["adaptive_weight"] = adaptive_weight(nll, terms["generator"], self.model.decoder.to_pixel.model.weight)
            term_weights["generator"] *= float(stats["adaptive_weight"])
        loss = _weighted(terms, term_weights)
        losses = TokenizerLosses(loss, {k: v.detach().float() for k, v in terms.items()}, term_weights,
                                 fake.detach(), outputs.code_counts, stats)
        self._check(losses.terms, step)
        return losses

    def _generator_loss(self, fake: torch.Tensor, draws: StepDraws, train: bool) -> torch.Tensor:
        # The unwrapped module: no DistributedDataParallel bookkeeping for gradients never used.
        discriminator = _unwrap(self.discriminator)
        context = _without_parameter_grads(discriminator) if train else torch.no_grad()
        with context:
            logits = self._logits(discriminator, fake, draws, strong=False)
        return generator_hinge_loss(logits)

    # --------------------------------------------------------------------------- discriminator
    def discriminator_losses(self, images: torch.Tensor, reconstructions: torch.Tensor, step: int, draws: StepDraws,
                             *, runner: Callable[..., torch.Tensor] | None = None) -> DiscriminatorLosses | None:
        """The discriminator's loss on real images and the reconstructions of the same iteration
        (TokenizerLosses.reconstructions, from before the tokenizer's update), after `step`
        tokenizer updates. None when there is no discriminator, or before the adversarial start
        without discriminator_forwards_before_start. `runner`: what runs the discriminator (its
        DistributedDataParallel wrapper; default the discriminator)."""
        if self.discriminator is None:
            return None
        weights = self.config.loss_weights_at(step)
        train = weights.discriminator > 0
        if not train and not self.forwards_before_start:
            return None
        runner = self.discriminator if runner is None else runner
        real_images, fake_images = images.detach(), reconstructions.detach()
        with contextlib.nullcontext() if train else torch.no_grad(), self._autocast(images):
            real = self._logits(runner, real_images, draws, strong=False)
            fake = self._logits(runner, fake_images, draws, strong=False)
            terms = {"hinge": discriminator_hinge_loss(real, fake)}
            if self.config.lecam_weight > 0:
                terms["lecam"] = lecam_regulariser(real, fake, self.lecam)
            if self.config.consistency_weight > 0:
                strong_real = self._logits(runner, real_images, draws, strong=True)
                strong_fake = self._logits(runner, fake_images, draws, strong=True)
                terms["consistency"] = consistency_loss(real, fake, strong_real, strong_fake)
        term_weights = {name: getattr(weights, DISCRIMINATOR_TERMS[name]) for name in terms}
        losses = DiscriminatorLosses(
            _weighted(terms, term_weights) if train else None, {k: v.detach() for k, v in terms.items()}, term_weights,
            {"real_logits": real.detach().mean(), "fake_logits": fake.detach().mean()},
        )
        self._check(losses.terms, step)
        return losses

    # ------------------------------------------------------------------------------- helpers
    def _logits(self, discriminator: Callable[..., torch.Tensor], images: torch.Tensor, draws: StepDraws,
                strong: bool) -> torch.Tensor:
        """D(DiffAugment(images)) in float32, with the augmentation policy of the consistency term
        when `strong`."""
        config = self.config
        policy, probability = ((config.consistency_policy, config.consistency_probability) if strong
                               else (config.diffaug_policy, config.diffaug_probability))
        augmented = diff_augment(images, policy, probability, draws.generator, draws.rows)
        return discriminator(augmented, draws.generator).float()

    def _autocast(self, images: torch.Tensor) -> contextlib.AbstractContextManager:
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(images.device.type, dtype=self.autocast_dtype)

    def _check(self, terms: dict[str, torch.Tensor], step: int) -> None:
        if not self.check_finite:
            return
        values = torch.stack([value.float() for value in terms.values()])
        finite = torch.isfinite(values)
        if not bool(finite.all()):
            index = int((~finite).nonzero()[0])
            raise NonFiniteTermError(step, list(terms)[index], float(values[index]))

    def state_dict(self) -> dict:
        """The LeCAM EMAs (the step's only state)."""
        return {"lecam": self.lecam.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.lecam.load_state_dict(state["lecam"])
