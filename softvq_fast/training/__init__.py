"""Training: the generators' objectives and trainer (flow matching for SiT, DDPM for DiT), the
tokenizer's losses, frozen networks and trainer, and the loop both trainers share.

Names load on first use (each from the module that holds it), so `import softvq_fast.training`
reads no training module until one of its names is asked for.
"""
from __future__ import annotations

import importlib
from typing import Any

# name -> the module of softvq_fast.training that defines it
_EXPORTS = {
    **dict.fromkeys(("FLOW_WEIGHTINGS", "diffusion_loss", "flow_matching_loss", "flow_matching_times",
                     "label_drop_mask"), "objectives"),
    "variational_bound_bits": "diffusion",
    **dict.fromkeys(("LoopSettings", "TrainingLoop", "Part", "Runtime", "start_runtime", "SetupError", "TrainingError",
                     "NonFiniteLossError", "WarmupCosine"), "loop"),
    **dict.fromkeys(("GeneratorTrainingConfig", "train_generator"), "generator"),
    **dict.fromkeys(("tokenizer_for_training", "training_config", "load_alignment_network", "init_encoder_from_dinov2",
                     "measure_latent_statistics", "export_release", "LatentStatistics"), "tokenizer_model"),
    **dict.fromkeys(("TrainingImageFolder", "ImageBatch", "collate_images", "SkippedImages", "SkippedImage"),
                    "image_data"),
    **dict.fromkeys(("TokenizerTrainingStep", "StepDraws", "TokenizerLosses", "DiscriminatorLosses",
                     "NonFiniteTermError"), "tokenizer_step"),
    **dict.fromkeys(("reconstruction_loss", "pooled_entropy", "generator_hinge_loss", "discriminator_hinge_loss",
                     "LeCAMEMA", "lecam_regulariser", "consistency_loss", "AlignmentProjector", "alignment_loss",
                     "adaptive_weight"), "tokenizer_losses"),
    **dict.fromkeys(("TokenizerLossConfig", "LossWeights"), "loss_config"),
    "LPIPS": "lpips",
    "DinoDiscriminator": "discriminator",
    "diff_augment": "diffaug",
    **dict.fromkeys(("load_dinov2", "load_dino_vits16", "load_vgg16", "FrozenWeightsError"), "frozen"),
    **dict.fromkeys(("TokenizerTrainingConfig", "read_training_config", "train_tokenizer"), "tokenizer"),
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'softvq_fast.training' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"softvq_fast.training.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
