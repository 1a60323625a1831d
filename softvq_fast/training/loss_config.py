"""The tokenizer's loss weights and schedules as data. The defaults are the authors' SoftVQ-L-64
configuration (configs/softvq-l-64.yaml of their code):

  reconstruction MSE 1.0; LPIPS-VGG 1.0 ramped by min(1, step / 10000); entropy 0.01; alignment
  0.1; adversarial 0.2 (generator hinge, and the discriminator's hinge + 0.001 x LeCAM) from step
  20000; DiffAugment "color,translation,cutout_0.2" with probability 0.5; LeCAM EMA decay 0.999;
  consistency 4.0 (strong views "color,translation,cutout_0.5", probability 1) from step 20000, not
  scaled by the adversarial weight; no adaptive weight.

A weight of 0 switches its term off. `step` in `loss_weights_at` counts the tokenizer updates
already made (0 for the first iteration); the authors' `global_step` is step + 1, so LPIPS starts at
1/10000 of its weight and the adversarial terms start at step 19999.
"""
from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass
from pathlib import Path

import yaml

from softvq_fast.training.diffaug import parse_policy

__all__ = ["TokenizerLossConfig", "LossWeights"]


def _yaml_float(value):
    """YAML 1.1 reads 1e-3 (no dot) as a string: take it as the number it spells."""
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


@dataclass(frozen=True)
class LossWeights:
    """The weights of one iteration. Tokenizer loss = reconstruction x MSE + perceptual x LPIPS +
    entropy x entropy regulariser + alignment x alignment loss + generator x hinge generator loss
    (x the adaptive weight when enabled). Discriminator loss = discriminator x hinge loss + lecam x
    LeCAM + consistency x consistency loss."""

    reconstruction: float
    perceptual: float
    entropy: float
    alignment: float
    generator: float
    discriminator: float
    lecam: float
    consistency: float


@dataclass
class TokenizerLossConfig:
    """Weights, schedules and augmentation of the tokenizer's losses (authors' defaults)."""

    reconstruction_weight: float = 1.0
    perceptual_weight: float = 1.0
    perceptual_warmup_steps: int = 10_000
    entropy_weight: float = 0.01
    alignment_weight: float = 0.1
    adversarial_weight: float = 0.2
    adversarial_start_step: int = 20_000
    adaptive_weight: bool = False
    lecam_weight: float = 0.001
    lecam_decay: float = 0.999
    consistency_weight: float = 4.0
    diffaug_policy: str = "color,translation,cutout_0.2"
    diffaug_probability: float = 0.5
    consistency_policy: str = "color,translation,cutout_0.5"
    consistency_probability: float = 1.0

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise ValueError naming the field for a wrong type or value."""
        for item in dataclasses.fields(self):
            value = getattr(self, item.name)
            expected = {"float": (int, float), "int": int, "bool": bool, "str": str}[item.type]
            if isinstance(value, bool) is not (item.type == "bool") or not isinstance(value, expected):
                raise ValueError(f"{item.name}={value!r}: expected {item.type}")
            if item.type in ("float", "int") and not (math.isfinite(value) and value >= 0):
                raise ValueError(f"{item.name}={value!r}: must be finite and >= 0")
        for name in ("lecam_decay", "diffaug_probability", "consistency_probability"):
            if getattr(self, name) > 1:
                raise ValueError(f"{name}={getattr(self, name)}: must be in [0, 1]")
        for name in ("diffaug_policy", "consistency_policy"):
            try:
                parse_policy(getattr(self, name))
            except ValueError as exc:
                raise ValueError(f"{name}: {exc}") from None

    def loss_weights_at(self, step: int) -> LossWeights:
        """The weights of the iteration after `step` tokenizer updates (see the module docstring)."""
        if step < 0:
            raise ValueError(f"step={step} must be >= 0")
        global_step = step + 1
        warmup = self.perceptual_warmup_steps
        ramp = min(1.0, global_step / warmup) if warmup else 1.0
        adversarial_on = global_step >= self.adversarial_start_step
        adversarial = self.adversarial_weight if adversarial_on else 0.0
        return LossWeights(
            reconstruction=self.reconstruction_weight,
            perceptual=self.perceptual_weight * ramp,
            entropy=self.entropy_weight,
            alignment=self.alignment_weight,
            generator=adversarial,
            discriminator=adversarial,
            lecam=adversarial * self.lecam_weight,
            consistency=self.consistency_weight if adversarial_on else 0.0,
        )

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> "TokenizerLossConfig":
        """Fields given override the defaults; unknown fields raise ValueError naming them."""
        if not isinstance(values, dict):
            raise ValueError(f"loss config must be a mapping of fields, got {type(values).__name__}")
        types = {item.name: item.type for item in dataclasses.fields(cls)}
        unknown = sorted(set(values) - set(types))
        if unknown:
            raise ValueError(f"unknown loss config fields {unknown}; known: {sorted(types)}")
        return cls(**{name: _yaml_float(value) if types[name] == "float" else value for name, value in values.items()})

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    @classmethod
    def from_yaml(cls, text: str) -> "TokenizerLossConfig":
        return cls.from_dict(yaml.safe_load(text) or {})

    def save(self, path: str | os.PathLike) -> None:
        Path(path).write_text(self.to_yaml())

    @classmethod
    def load(cls, path: str | os.PathLike) -> "TokenizerLossConfig":
        try:
            return cls.from_yaml(Path(path).read_text())
        except (ValueError, yaml.YAMLError) as exc:
            raise ValueError(f"{path}: {exc}") from exc
