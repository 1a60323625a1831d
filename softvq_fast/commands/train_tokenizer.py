"""`softvq-fast train-tokenizer`: train a SoftVQ-VAE tokenizer on an image folder, or fine-tune a
release, with the authors' losses (one process, or many under torchrun), resumable; the EMA is
exported in the release layout."""
from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

from softvq_fast.commands import arguments

EPILOG = """\
configuration (--config): a preset (default softvq-l-64, the authors' setting: MSE, LPIPS-VGG ramped
  over 10k steps, entropy 0.01, DINOv2 alignment 0.1, the DINO discriminator from step 20k with
  LeCAM and consistency regularisation; AdamW lr 1e-4 x global batch / 256, betas 0.9/0.95,
  weight decay 1e-4, one warm-up epoch then cosine to 0.1 x; 50 epochs; EMA 0.9999), a release
  folder to fine-tune, or a YAML file with up to three sections:
    model:    softvq-s-64 | RELEASE_FOLDER | {preset: softvq-s-64, num_latent_tokens: 32, ...}
    losses:   {perceptual_weight: 0, adversarial_start_step: 0, ...}   (the loss options below)
    training: {lr: 2.0e-4, epochs: 20, global_batch: 128, ...}        (the other options below)
  Options given on the command line override the file. RUN/config.yaml holds a run's effective
  configuration.

losses: each term's weight (0 switches it off, and then its frozen network's file is not needed):
  --dinov2 (the encoder's DINOv2 start and the alignment target, official or timm layout),
  --dino (the discriminator's DINO ViT-S/16, official layout), --vgg (torchvision's VGG16 for
  LPIPS; its linear heads come from the installed lpips package or --lpips-heads). Every file is
  checked before the first step; a missing, damaged or mismatched one is named with the layout
  expected.

batches: --global-batch images per step over all processes, in micro-batches of --micro-batch
  per process. The discriminator's batch norm spans a micro-batch over all processes, so N
  processes with micro-batches of B train like one process with micro-batches of N x B.

processes: `torchrun --nproc_per_node N -m softvq_fast.cli train-tokenizer ...` runs
  DistributedDataParallel (NCCL on GPUs, gloo on the CPU), the discriminator's batch norm
  synchronised; rank 0 writes.

run folder (--out): config.json, config.yaml, log.jsonl, checkpoints/ (atomic, the newest
  --keep-checkpoints kept), reconstructions/ (every --eval-every steps: held-out images and their
  reconstructions, PSNR/SSIM in the log), export/ (the EMA in the release layout with vq_mean and
  vq_std measured on --statistics-images training images: `softvq-fast encode-dataset --model
  RUN/export` reads it), tensorboard/ when installed. --resume continues from the newest checkpoint
  exactly as the run would have gone on; a folder holding another configuration is refused, naming
  what differs. A non-finite loss stops the run naming the step and the term.
"""

LOSS_HELP = {
    "reconstruction_weight": "MSE", "perceptual_weight": "LPIPS-VGG", "perceptual_warmup_steps": "LPIPS ramp",
    "entropy_weight": "soft-VQ entropy regulariser", "alignment_weight": "DINOv2 representation alignment",
    "adversarial_weight": "hinge GAN terms of both networks", "adversarial_start_step": "GAN terms from this step",
    "adaptive_weight": "the adaptive GAN weight", "lecam_weight": "LeCAM (x adversarial weight)",
    "lecam_decay": "LeCAM EMA decay", "consistency_weight": "discriminator consistency regularisation",
    "diffaug_policy": "DiffAugment before the discriminator", "diffaug_probability": "per augmentation",
    "consistency_policy": "strong views of the consistency term", "consistency_probability": "per augmentation",
}
PROBABILITIES = ("lecam_decay", "diffaug_probability", "consistency_probability")


def _taps(text: str) -> tuple[int, ...]:
    try:
        taps = tuple(int(part) for part in text.split(","))
    except ValueError:
        taps = ()
    if not taps or min(taps) < 0:
        raise argparse.ArgumentTypeError(f"expected block indices >= 0 separated by commas, e.g. 2,5,8,11, got {text!r}")
    return taps


def _add_loss_options(parser: argparse.ArgumentParser) -> None:
    from softvq_fast.training.diffaug import parse_policy
    from softvq_fast.training.loss_config import TokenizerLossConfig

    group = parser.add_argument_group("losses (default: the --config's)")
    for item in dataclasses.fields(TokenizerLossConfig):
        flag = "--" + item.name.replace("_", "-")
        text = f"{LOSS_HELP[item.name]} (default {item.default})"
        if item.type == "bool":
            group.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=text)
            continue
        kind = {"str": arguments.checked_by(parse_policy), "int": arguments.non_negative_int}.get(item.type) or (
            arguments.probability if item.name in PROBABILITIES else arguments.non_negative_float)
        group.add_argument(flag, type=kind, default=None, help=text)


def register(subparsers: argparse._SubParsersAction) -> None:
    from softvq_fast.training.loop import PRECISIONS
    from softvq_fast.training.tokenizer import LR_SCHEDULES

    parser = subparsers.add_parser(
        "train-tokenizer", help="train or fine-tune a SoftVQ-VAE tokenizer on images", description=__doc__,
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--images", required=True, type=Path, help="the training image folder")
    parser.add_argument("--config", default="softvq-l-64", help="a preset, a release folder or a YAML file (see below)")
    parser.add_argument("--out", required=True, type=Path, help="the run folder")
    parser.add_argument("--resume", action="store_true", help="continue the run in --out from its newest checkpoint")
    files = parser.add_argument_group("frozen networks (each needed only while its loss is on)")
    files.add_argument("--dinov2", type=Path, help="DINOv2 weights: the encoder's start and the alignment target")
    files.add_argument("--alignment-dinov2", type=Path, help="another DINOv2 file for alignment (default --dinov2)")
    files.add_argument("--alignment-depth", type=arguments.positive_int, help="blocks of the alignment DINOv2 to run")
    files.add_argument("--dino", type=Path, help="DINO ViT-S/16 weights (dino_deitsmall16_pretrain.pth)")
    files.add_argument("--discriminator-taps", type=_taps, help="DINO blocks the discriminator reads (default 2,5,8,11)")
    files.add_argument("--vgg", type=Path, help="torchvision VGG16 weights (LPIPS)")
    files.add_argument("--lpips-heads", type=Path, help="LPIPS v0.1 VGG heads (default: the lpips package's)")
    _add_loss_options(parser)
    training = parser.add_argument_group("training (default: the --config's)")
    training.add_argument("--steps", type=arguments.positive_int, help="optimiser steps (default: epochs x an epoch)")
    training.add_argument("--epochs", type=arguments.positive_int, help="passes over the images (default 50)")
    training.add_argument("--global-batch", type=arguments.positive_int, help="images per step, all processes (256)")
    training.add_argument("--micro-batch", type=arguments.positive_int,
                          help="images per forward pass and process (default: the per-process batch)")
    training.add_argument("--lr", type=arguments.positive_float, help="learning rate per 256 images (1e-4)")
    training.add_argument("--betas", type=arguments.unit_interval, nargs=2, metavar=("BETA1", "BETA2"),
                          help="AdamW betas (0.9 0.95)")
    training.add_argument("--weight-decay", type=arguments.non_negative_float, help="AdamW, not on biases (1e-4)")
    training.add_argument("--lr-schedule", choices=LR_SCHEDULES, help="cosine (default) or constant")
    training.add_argument("--warmup-epochs", type=arguments.non_negative_float, help="linear warm-up (1)")
    training.add_argument("--warmup-lr", type=arguments.non_negative_float, help="the warm-up's start (1e-5)")
    training.add_argument("--min-lr-ratio", type=arguments.probability, help="the cosine's floor x the lr (0.1)")
    training.add_argument("--grad-clip", type=arguments.positive_float, help="gradient norm clip, both networks (1)")
    training.add_argument("--ema-decay", type=arguments.unit_interval, help="the tokenizer's EMA (0.9999)")
    training.add_argument("--no-flip", dest="flip", action="store_false", default=None, help="no horizontal flips")
    training.add_argument("--activation-checkpointing", action=argparse.BooleanOptionalAction, default=None,
                          help="recompute the tokenizer's ViT activations in the backward instead of keeping them: "
                               "less memory (a larger --micro-batch fits), one more ViT forward per step, the same "
                               "training; a resumed run may change it (default off)")
    training.add_argument("--seed", type=arguments.non_negative_int)
    training.add_argument("--precision", choices=PRECISIONS, help="auto (default): bf16 autocast on GPUs, fp32 on CPUs")
    training.add_argument("--checkpoint-every", type=arguments.positive_int, help="steps (10000)")
    training.add_argument("--keep-checkpoints", type=arguments.positive_int, help="newest checkpoints kept (2)")
    training.add_argument("--log-every", type=arguments.positive_int, help="steps (50)")
    training.add_argument("--eval-every", type=arguments.non_negative_int, help="steps between reconstruction grids "
                                                                                "(5000; 0: none)")
    training.add_argument("--eval-count", type=arguments.non_negative_int, help="held-out images in a grid (8)")
    training.add_argument("--eval-images", type=Path, help="a folder of held-out images (default: --eval-count "
                                                           "images of --images, left out of training)")
    training.add_argument("--statistics-images", type=arguments.non_negative_int,
                          help="training images measuring vq_mean / vq_std at export (10000; 0: all)")
    training.add_argument("--num-workers", type=arguments.non_negative_int, help="DataLoader workers (4)")
    training.add_argument("--export", type=Path, help="where the EMA goes (default OUT/export)")
    training.add_argument("--device", type=arguments.device,
                          help="default: this process's GPU (LOCAL_RANK) if there is one, else cpu")
    parser.set_defaults(func=run)


def config_from_args(args: argparse.Namespace):
    """The TokenizerTrainingConfig of --config with the options given on the command line over it."""
    from softvq_fast.training.loss_config import TokenizerLossConfig
    from softvq_fast.training.tokenizer import TokenizerTrainingConfig, read_training_config

    values = vars(args)
    losses = {item.name: values[item.name] for item in dataclasses.fields(TokenizerLossConfig)
              if values[item.name] is not None}
    names = {item.name for item in dataclasses.fields(TokenizerTrainingConfig)} - {"model", "losses"}
    settings = {name: values[name] for name in names if values.get(name) is not None}
    for name in ("betas", "discriminator_taps"):
        if name in settings:
            settings[name] = tuple(settings[name])
    if "device" in settings:
        settings["device"] = str(settings["device"])
    return read_training_config(args.config, losses=losses, **settings)


def run(args: argparse.Namespace) -> int:
    from softvq_fast.training.tokenizer import train_tokenizer

    if args.device is not None:
        arguments.check_device_usable(args.device)
    with arguments.training_errors():
        export = train_tokenizer(config_from_args(args))
    print(f"exported the EMA tokenizer to {export}")
    return 0
