"""`train_tokenizer(config)`: the SoftVQ-VAE tokenizer trained, or fine-tuned from a release, on
an image folder with the authors' losses (`TokenizerTrainingStep`), on `softvq_fast.training.loop`.

An iteration, as the authors' script runs it: the tokenizer's loss on the global batch (forward
and backward per micro-batch), one AdamW update of the tokenizer and its EMA; then the
discriminator's loss on the same real images and the reconstructions of that forward, one AdamW
update of the discriminator. Both optimisers follow one learning-rate schedule (`WarmupCosine`,
base lr x global batch / 256). Before the adversarial start the discriminator's forwards still run
(its batch-norm statistics, spectral-norm vectors and LeCAM averages move, as the authors') but it
takes no update: the authors step AdamW with zero gradients then, which applies weight decay alone
and advances AdamW's step count (so their first adversarial updates get no bias correction); here
the discriminator's AdamW starts at the adversarial start.

Randomness: the data order and crops come from the seed (StreamSampler, TrainingImageFolder); the
draws of micro-batch m of step s (drop path, DiffAugment) from generators seeded by (seed, s, m, 0)
for the tokenizer's call and (seed, s, m, 1) for the discriminator's, shared by all processes,
each slicing its rows of the micro-batch. The discriminator's batch norm couples the images of a
micro-batch (synchronised over the processes), so P processes with micro-batches of B images train
as one process with micro-batches of P x B.

An image that cannot be read is skipped (a warning names it; the count is checkpointed): a
micro-batch may be short. A micro-batch that is empty on any process is left out on all of them,
and a step whose micro-batches are all empty makes no update (logged as "skipped_step").

The run folder (`config.out`):
  config.json       the run: model, losses, training settings, the data's identity (a resumed run
                    must match it)
  config.yaml       the effective configuration (`--config RUN/config.yaml` repeats the run)
  log.jsonl         per log interval each term's mean, images/s, lr; events (start, checkpoints,
                    reconstructions with PSNR/SSIM, skipped images, export)
  checkpoints/      step-NNNNNNNNN.pt: both networks, both optimisers, the EMA, the LeCAM
                    averages, the skipped-image count, the RNG states, step and data position
  reconstructions/  step-N.png: the held-out images (top row), the tokenizer's reconstructions,
                    the EMA's
  export/           the EMA tokenizer in the release layout with vq_mean / vq_std measured on a
                    sample of the training images (SoftVQVAE.from_pretrained, encode-dataset and
                    generate read it)
  tensorboard/      when tensorboard is installed
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import torch
import torch.distributed as dist
import yaml
from torch.utils.data import DataLoader, Dataset

from softvq_fast.data import DatasetError, ImageFolderDataset, StreamSampler, files_digest, mix_seed, tensor_to_image
from softvq_fast.data import try_load_image
from softvq_fast.models import fields
from softvq_fast.models.checkpoint import CheckpointError, read_config
from softvq_fast.models.config import PRESETS, SoftVQConfig
from softvq_fast.models.softvq_vae import SoftVQVAE
from softvq_fast.training.discriminator import DEFAULT_TAPS, DinoDiscriminator
from softvq_fast.training.frozen import FrozenWeightsError, load_vgg16
from softvq_fast.training.image_data import SkippedImages, TrainingImageFolder, collate_images
from softvq_fast.training.loop import (
    LoopSettings, Part, Runtime, SetupError, TrainingLoop, WarmupCosine, attention_backend, check_adamw,
    in_runtime, linear_backend, prepare_run_folder, settings_dict, slow_backend_warnings, write_atomic,
)
from softvq_fast.training.loss_config import TokenizerLossConfig
from softvq_fast.training.lpips import LPIPS, load_lpips_heads
from softvq_fast.training.tokenizer_model import (
    export_release, load_alignment_network, measure_latent_statistics, tokenizer_for_training, training_config,
)
from softvq_fast.training.tokenizer_step import StepDraws, TokenizerTrainingStep

__all__ = ["TokenizerTrainingConfig", "read_training_config", "train_tokenizer", "training_backends"]

DEFAULT_PRESET = "softvq-l-64"
LR_SCHEDULES = ("cosine", "constant")
# The authors scale the learning rate by the global batch over this.
LR_REFERENCE_BATCH = 256
# SoftVQConfig fields a YAML model section may not set, and where they are set instead.
MODEL_FIELDS_SET_ELSEWHERE = {
    "entropy_loss_ratio": "losses.entropy_weight",
    "repa_loss_weight": "losses.alignment_weight",
    "repa": "losses.alignment_weight (the projector trains when it is > 0)",
}
# Settings a YAML training section may not hold: where the data, networks and run live, and how
# this invocation runs.
NOT_IN_YAML = frozenset({"images", "out", "model", "losses", "resume", "export", "dinov2", "alignment_dinov2", "dino",
                         "vgg", "lpips_heads", "eval_images", "device", "progress"})
# Settings a resumed run may change: how it runs, logs, evaluates and where its files are, not
# what it trains (the held-out images are part of the data's identity).
OPERATIONAL_SETTINGS = frozenset({
    "out", "images", "model", "losses", "dinov2", "alignment_dinov2", "dino", "vgg", "lpips_heads", "micro_batch",
    "precision", "compile", "fsdp", "checkpoint_every", "keep_checkpoints", "log_every", "eval_every", "eval_images",
    "eval_count", "statistics_images", "device", "progress", "num_workers", "resume", "export",
    "activation_checkpointing",
})
HOLD_OUT_STREAM = 0x4E1D  # mixed into the seed of the held-out choice, apart from the data order's


@dataclass(kw_only=True)
class TokenizerTrainingConfig(LoopSettings):
    """A tokenizer training run (keyword arguments); the defaults are the authors' SoftVQ-L-64
    configuration (configs/softvq-l-64.yaml, with the AdamW it meant).

    images: the training image folder (class subfolders or flat), random resized crops and flips
        (TrainingImageFolder).
    model: a preset name (`training_config(preset)`: the authors' training fields, the encoder
        started from DINOv2), a release folder to fine-tune (`tokenizer_for_training`), or a
        SoftVQConfig.
    losses: the loss weights and schedules. A term whose weight is 0 is off, and the frozen
        network it needs is not read.
    dinov2: DINOv2 weights (official or timm layout) of config.encoder_model, the new encoder's
        start (when model.enc_pretrained), and of config.repa_model for representation alignment
        unless `alignment_dinov2` gives another file; alignment_depth: the blocks of that network
        to run (default all of repa_model's; a file cut shorter needs it).
    dino: the DINO ViT-S/16 weights (official layout) of the discriminator's trunk, read at the
        blocks `discriminator_taps`. vgg: torchvision's VGG16 weights for LPIPS, with its linear
        heads from `lpips_heads` (default: the installed lpips package's).
    steps: optimiser steps (default `epochs` x images // global_batch).
    lr: per LR_REFERENCE_BATCH images (the rate is lr x global_batch / 256); lr_schedule "cosine":
        linear warm-up from `warmup_lr` over `warmup_epochs`, then cosine to `min_lr_ratio` x the
        rate (timm's schedule, as the authors run it); "constant": the rate throughout.
    betas, weight_decay: both AdamWs; 1-D parameters and biases take no weight decay.
    eval_every: steps between reconstruction grids with PSNR/SSIM (0: none) of `eval_count`
        held-out images: those of `eval_images`, or else that many images of `images` chosen by
        the seed and left out of training.
    statistics_images: how many training images (centre crops) measure vq_mean / vq_std at export.
    export: where the EMA goes at the end (default out/export).
    activation_checkpointing: the tokenizer's ViT blocks recompute their activations in the
        backward instead of keeping them (SoftVQVAE.set_activation_checkpointing): less memory
        for a larger micro-batch, one more forward of the ViTs per step; the same training.
    FSDP and torch.compile are not implemented for the tokenizer (fsdp and compile stay False).
    """

    images: Path
    out: Path
    model: str | SoftVQConfig = DEFAULT_PRESET
    losses: TokenizerLossConfig = field(default_factory=TokenizerLossConfig)
    dinov2: Path | None = None
    alignment_dinov2: Path | None = None
    alignment_depth: int | None = None
    dino: Path | None = None
    discriminator_taps: tuple[int, ...] = DEFAULT_TAPS
    vgg: Path | None = None
    lpips_heads: Path | None = None
    steps: int | None = None
    epochs: int = 50
    global_batch: int = 256
    lr: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.95)
    weight_decay: float = 1e-4
    lr_schedule: str = "cosine"
    warmup_epochs: float = 1.0
    warmup_lr: float = 1e-5
    min_lr_ratio: float = 0.1
    flip: bool = True
    checkpoint_every: int = 10_000
    log_every: int = 50
    eval_every: int = 5000
    eval_count: int = 8
    eval_images: Path | None = None
    statistics_images: int = 10_000
    num_workers: int = 4
    resume: bool = False
    export: Path | None = None
    activation_checkpointing: bool = False

    def check(self) -> None:
        """FieldError (a ValueError) naming the first setting that cannot train, before anything is read."""
        LoopSettings.check(self if self.steps is not None else dataclasses.replace(self, steps=1))
        fields.optional_integer("steps", self.steps)
        if not isinstance(self.model, (str, os.PathLike, SoftVQConfig)):
            raise fields.FieldError("model", f"model must be a preset name, a release folder or a SoftVQConfig, "
                                             f"got {self.model!r}")
        if not isinstance(self.losses, TokenizerLossConfig):
            raise fields.FieldError("losses", f"losses must be a TokenizerLossConfig, got {self.losses!r}")
        self.losses.validate()
        fields.optional_integer("alignment_depth", self.alignment_depth)
        if (not isinstance(self.discriminator_taps, (tuple, list)) or not self.discriminator_taps
                or not all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in self.discriminator_taps)):
            raise fields.FieldError("discriminator_taps", "discriminator_taps must be block indices >= 0 (at least "
                                                          f"one), got {self.discriminator_taps!r}")
        fields.integer("epochs", self.epochs)
        check_adamw(self.lr, self.betas, self.weight_decay)
        fields.text("lr_schedule", self.lr_schedule, LR_SCHEDULES)
        fields.real("warmup_epochs", self.warmup_epochs, at_least=0)
        fields.real("warmup_lr", self.warmup_lr, at_least=0)
        fields.real("min_lr_ratio", self.min_lr_ratio, at_least=0, at_most=1)
        for name in ("eval_every", "eval_count", "statistics_images", "num_workers"):
            fields.integer(name, getattr(self, name), minimum=0)
        for name in ("flip", "resume", "activation_checkpointing"):
            fields.boolean(name, getattr(self, name))
        for name, what in (("fsdp", "FSDP"), ("compile", "torch.compile")):
            if getattr(self, name):
                raise fields.FieldError(name, f"{name}: {what} is not implemented for the tokenizer trainer (it "
                                              "replicates the model over the processes)")

    # ------------------------------------------------------------------------------ derived
    def total_steps(self, images: int) -> int:
        return self.steps if self.steps is not None else self.epochs * self.steps_per_epoch(images)

    def steps_per_epoch(self, images: int) -> int:
        return max(images // self.global_batch, 1)

    def schedule(self, images: int) -> WarmupCosine:
        """The learning rate by update, for a training set of `images` images."""
        base = self.lr * self.global_batch / LR_REFERENCE_BATCH
        return WarmupCosine(base, self.total_steps(images), round(self.warmup_epochs * self.steps_per_epoch(images)),
                            self.warmup_lr, self.min_lr_ratio * base, cosine=self.lr_schedule == "cosine")

    # ------------------------------------------------------------------------------ YAML
    def to_yaml(self) -> str:
        """The model, losses and training sections `read_training_config` reads back (paths and
        how this invocation runs are left to the command line)."""
        model = self.model if not isinstance(self.model, SoftVQConfig) else {
            k: v for k, v in dataclasses.asdict(self.model).items() if k not in MODEL_FIELDS_SET_ELSEWHERE}
        training = {k: v for k, v in settings_dict(self).items() if k not in NOT_IN_YAML}
        return yaml.safe_dump({"model": str(model) if isinstance(model, os.PathLike) else model,
                               "losses": self.losses.to_dict(), "training": training}, sort_keys=False)


# ------------------------------------------------------------------------------------ YAML
def _yaml_model(value: Any, where: str) -> str | SoftVQConfig:
    """The YAML model section: a preset name or a release folder, or a mapping of SoftVQConfig
    fields over `preset` (its training configuration) or over SoftVQConfig's defaults."""
    if isinstance(value, str):
        return value
    if not isinstance(value, dict):
        raise SetupError("config", f"{where}: model must be a preset name, a release folder or a mapping of "
                                   f"SoftVQConfig fields, got {value!r}")
    values = dict(value)
    preset = values.pop("preset", None)
    for name, instead in MODEL_FIELDS_SET_ELSEWHERE.items():
        if name in values:
            raise SetupError("config", f"{where}: model.{name} is set through {instead}")
    known = {item.name for item in dataclasses.fields(SoftVQConfig)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise SetupError("config", f"{where}: unknown model fields {unknown} (SoftVQConfig fields and `preset`)")
    try:
        base = training_config(preset) if preset is not None else SoftVQConfig()
        config = dataclasses.replace(base, **values)
        config.validate()
    except (TypeError, ValueError) as exc:
        raise SetupError("config", f"{where}: model: {exc}") from None
    return config


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        sections = yaml.safe_load(path.read_text()) or {}
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise SetupError("config", f"{path}: cannot be read as YAML ({exc})") from None
    if not isinstance(sections, dict) or set(sections) - {"model", "losses", "training"}:
        found = sorted(sections) if isinstance(sections, dict) else type(sections).__name__
        hint = (" (the authors' flat training config is not read: write its settings into these sections, see "
                "`softvq-fast train-tokenizer --help`)") if isinstance(sections, dict) and "vq_model" in sections else ""
        raise SetupError("config", f"{path}: expected the sections model, losses and training, found {found}{hint}")
    return sections


def read_training_config(source: str | os.PathLike = DEFAULT_PRESET, *, losses: dict[str, Any] | None = None,
                         **settings: Any) -> TokenizerTrainingConfig:
    """The configuration `source` names, with `losses` (TokenizerLossConfig fields) and `settings`
    (TokenizerTrainingConfig fields, `images` and `out` among them) over it.

    source: a preset ("softvq-l-64": the authors' setting), a release folder (fine-tuning it), or a
    YAML file of three optional sections:
        model: a preset or a release folder, or a mapping of SoftVQConfig fields (over those of
               `preset:` when given), e.g. {preset: softvq-s-64, num_latent_tokens: 32}
        losses: TokenizerLossConfig fields, e.g. {perceptual_weight: 0, adversarial_start_step: 0}
        training: TokenizerTrainingConfig fields except paths, e.g. {lr: 2.0e-4, epochs: 20}
    SetupError("config", ...) naming the file and the field at fault; the settings given here
    are checked by TokenizerTrainingConfig.check."""
    path = Path(source)
    sections: dict[str, Any] = {}
    if path.is_file():
        sections = _read_yaml(path)
        where = str(path)
    elif path.is_dir() or str(source) in PRESETS:
        sections = {"model": str(source)}
        where = str(source)
    else:
        raise SetupError("config", f"{source!r} is neither a YAML file, a release folder nor a preset "
                                   f"({', '.join(PRESETS)})")
    model = _yaml_model(sections.get("model", DEFAULT_PRESET), where)
    try:
        loss_config = TokenizerLossConfig.from_dict(sections.get("losses") or {})
    except ValueError as exc:
        raise SetupError("config", f"{where}: losses: {exc}") from None
    training = sections.get("training") or {}
    if not isinstance(training, dict):
        raise SetupError("config", f"{where}: training must be a mapping of settings, got {training!r}")
    allowed = {item.name for item in dataclasses.fields(TokenizerTrainingConfig)} - NOT_IN_YAML
    unknown = sorted(set(training) - allowed)
    if unknown:
        raise SetupError("config", f"{where}: unknown training settings {unknown}; known: {sorted(allowed)}")
    training = {k: tuple(v) if isinstance(v, list) else v for k, v in training.items()}
    try:  # the file's settings alone, so that an error here is the file's
        TokenizerTrainingConfig(images=Path("."), out=Path("."), model=model, losses=loss_config, **training).check()
    except ValueError as exc:
        raise SetupError("config", f"{where}: training: {exc}") from None
    loss_config = TokenizerLossConfig.from_dict({**loss_config.to_dict(), **(losses or {})})
    if isinstance(model, SoftVQConfig):  # its loss fields follow the losses (MODEL_FIELDS_SET_ELSEWHERE)
        model = dataclasses.replace(model, entropy_loss_ratio=loss_config.entropy_weight,
                                    repa_loss_weight=loss_config.alignment_weight, repa=loss_config.alignment_weight > 0)
    return TokenizerTrainingConfig(**{"model": model, "losses": loss_config, **training, **settings})


# ------------------------------------------------------------------------------------ data
class ImageSubset(Dataset):
    """The items `indices` of a TrainingImageFolder as items 0..len-1, with its keys (an index, or
    (index, epoch)); each keeps its own view (seeded by its index in the folder)."""

    def __init__(self, folder: TrainingImageFolder, indices: list[int]) -> None:
        self.folder, self.indices = folder, indices

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, key: int | tuple[int, int]):
        if isinstance(key, tuple):
            return self.folder[(self.indices[key[0]], key[1])]
        return self.folder[self.indices[key]]


@dataclass
class TrainingImages:
    """The training items, the folder's file list and the held-out images' paths."""

    folder: TrainingImageFolder
    train: ImageSubset
    held_out: list[Path]

    def identity(self) -> dict[str, Any]:
        """What makes two image folders the same data for a resumed run."""
        return {"items": len(self.train), "image_size": self.folder.image_size,
                "files_sha256": files_digest(self.folder.files), "training_files_sha256": files_digest(self.train_files())}

    def train_files(self) -> list[str]:
        return [self.folder.files[i] for i in self.train.indices]


def training_images(config: TokenizerTrainingConfig, image_size: int) -> TrainingImages:
    """The image folder; `eval_count` held-out images from `eval_images` or else chosen from the
    folder by the seed (and left out of training) when reconstruction grids are on."""
    try:
        folder = TrainingImageFolder(config.images, image_size, seed=config.seed, flip=config.flip)
    except DatasetError as exc:
        raise SetupError("images", exc.message) from None
    everything = list(range(len(folder)))
    held_out: list[Path] = []
    if config.eval_every and config.eval_count:
        if config.eval_images is not None:
            try:
                listing = TrainingImageFolder(config.eval_images, image_size)
            except DatasetError as exc:
                raise SetupError("eval_images", exc.message) from None
            held_out = [listing.folder / name for name in listing.files[: config.eval_count]]
        else:
            if len(folder) <= config.eval_count:
                raise SetupError("eval_count", f"the {len(folder)} images of {config.images} cannot spare "
                                               f"{config.eval_count} held-out images for the reconstruction grids; "
                                               "give eval_images, fewer, or 0")
            generator = torch.Generator().manual_seed(mix_seed(config.seed, HOLD_OUT_STREAM))
            chosen = sorted(torch.randperm(len(folder), generator=generator)[: config.eval_count].tolist())
            held_out = [folder.folder / folder.files[i] for i in chosen]
            everything = sorted(set(everything) - set(chosen))
    if len(everything) < config.global_batch:
        print(f"warning: {len(everything)} training images are fewer than a global batch of {config.global_batch}: "
              "each batch repeats images", file=sys.stderr)
    return TrainingImages(folder, ImageSubset(folder, everything), held_out)


def _centre_crops(items: list) -> torch.Tensor:
    """collate_fn of ImageFolderDataset for the latent statistics: the readable images (B, 3, S, S)."""
    images = [image for _, image, _, error in items if not error]
    return torch.stack(images) if images else torch.zeros(0, 3, 0, 0)


# ------------------------------------------------------------------------------------ networks
@dataclass
class Networks:
    """The tokenizer to train and the loss networks its losses need (None where a loss is off)."""

    tokenizer: SoftVQVAE
    lpips: LPIPS | None
    alignment: torch.nn.Module | None
    discriminator: DinoDiscriminator | None
    source: str


@dataclass(frozen=True)
class ModelSource:
    """What the tokenizer starts from: `start` (a SoftVQConfig for new weights, or a release
    folder to fine-tune), its architecture `config`, and a description for the run config."""

    start: SoftVQConfig | Path
    config: SoftVQConfig
    description: str


def model_source(config: TokenizerTrainingConfig) -> ModelSource:
    """config.model resolved without reading any weights; SetupError("config", ...) when it
    names nothing usable."""
    model = config.model
    if isinstance(model, SoftVQConfig):
        return ModelSource(model, model, "config")
    try:
        if Path(model).is_dir():
            folder = Path(model)
            return ModelSource(folder, read_config(folder), str(folder.resolve()))
        preset = training_config(str(model))
        return ModelSource(preset, preset, str(model))
    except (CheckpointError, ValueError) as exc:
        raise SetupError("config", str(exc)) from None


def _needed(file: Path | None, argument: str, why: str) -> Path:
    if file is None:
        raise SetupError(argument, f"{why}: give its file")
    return Path(file)


@contextlib.contextmanager
def _blamed_on(argument: str, invalid: str = "config") -> Iterator[None]:
    """A file that cannot be used (FrozenWeightsError) inside the block as SetupError(argument),
    a setting it cannot take (another CheckpointError or ValueError) as SetupError(invalid)."""
    try:
        yield
    except FrozenWeightsError as exc:
        raise SetupError(argument, str(exc)) from None
    except (CheckpointError, ValueError) as exc:
        raise SetupError(invalid, str(exc)) from None


def load_networks(config: TokenizerTrainingConfig, model: ModelSource) -> Networks:
    """Every network of the run from its file, checked before any step: SetupError naming the
    argument (dinov2, dino, vgg, ...) and, for a file that is missing, damaged or of another
    architecture, the file and the layout expected. Random initialisations draw from generators
    seeded by config.seed."""
    losses, source = config.losses, model.start
    alignment = losses.alignment_weight > 0
    encoder_weights = None
    if isinstance(source, SoftVQConfig) and source.enc_pretrained:
        encoder_weights = _needed(config.dinov2, "dinov2", f"the encoder starts from DINOv2 {source.encoder_model} "
                                  "(model.enc_pretrained is true; set it false to start from random weights)")
    with _blamed_on("dinov2"):
        tokenizer = tokenizer_for_training(source, encoder_weights=encoder_weights, alignment=alignment,
                                           seed=config.seed)
    tokenizer.set_activation_checkpointing(config.activation_checkpointing)
    networks = Networks(tokenizer, None, None, None, model.description)
    if alignment:
        argument = "alignment_dinov2" if config.alignment_dinov2 is not None else "dinov2"
        file = _needed(config.alignment_dinov2 or config.dinov2, argument, f"representation alignment "
                       f"(alignment_weight {losses.alignment_weight}) needs the frozen DINOv2 "
                       f"{tokenizer.config.repa_model} (or set alignment_weight to 0)")
        with _blamed_on(argument):
            networks.alignment = load_alignment_network(tokenizer.config, file, depth=config.alignment_depth)
    if losses.perceptual_weight > 0:
        file = _needed(config.vgg, "vgg", f"LPIPS (perceptual_weight {losses.perceptual_weight}) needs torchvision's "
                                          "VGG16 weights (or set perceptual_weight to 0)")
        with _blamed_on("lpips_heads"):
            heads = load_lpips_heads(config.lpips_heads)
        with _blamed_on("vgg"):
            networks.lpips = LPIPS(load_vgg16(file), heads)
    if losses.adversarial_weight > 0:
        file = _needed(config.dino, "dino", f"the discriminator (adversarial_weight {losses.adversarial_weight}) "
                                            "needs the DINO ViT-S/16 weights (or set adversarial_weight to 0)")
        with _blamed_on("dino", invalid="discriminator_taps"), torch.random.fork_rng(devices=[]):
            torch.manual_seed(mix_seed(config.seed, 1))
            networks.discriminator = DinoDiscriminator.from_file(file, tuple(config.discriminator_taps)).train()
    return networks


# ------------------------------------------------------------------------------------ backends
def training_backends(model: SoftVQVAE, micro_batch: int, device: torch.device,
                      autocast_dtype: torch.dtype | None) -> dict[str, str]:
    """The backend each op picks for this tokenizer's training step, forward and backward:
    attention (the encoder's sequence of class/register, image and latent tokens, in the autocast
    dtype), linear (inputs that need a gradient), soft_vq (float32, with gradients). Raises the
    op's NoBackendError when a backend the model was set to cannot train."""
    from softvq_fast.ops.soft_vq import BACKENDS as SOFT_VQ, SoftVQInputs

    encoder, config = model.encoder.model, model.config
    tokens = (config.image_size // config.enc_patch_size) ** 2 + encoder.num_prefix_tokens + config.num_latent_tokens
    block = encoder.blocks[0]
    soft_vq = SoftVQInputs(device, torch.float32, True, config.codebook_embed_dim)
    return {"attention": attention_backend(block.attn, micro_batch, tokens, device, autocast_dtype),
            "linear": linear_backend(block.attn.qkv, micro_batch * tokens, device),
            "soft_vq": SOFT_VQ.select(soft_vq, model.quantize.backend).name}


# ------------------------------------------------------------------------------------ evaluation
class ReconstructionGrids:
    """A hook: every `every` steps and at the last, rank 0 reconstructs the held-out images with
    the tokenizer in training and with its EMA (eval mode), writes out/reconstructions/step-N.png
    (rows: the images, the tokenizer's reconstructions, the EMA's) and logs their mean PSNR and
    SSIM ("reconstructions" events in log.jsonl, "reconstructions/*" in TensorBoard)."""

    def __init__(self, loop: TrainingLoop, part: Part, held_out: list[Path], every: int, image_size: int) -> None:
        self.loop, self.part, self.every = loop, part, every
        self.folder = Path(loop.settings.out) / "reconstructions"
        self.images = None
        if not (loop.runtime.is_main and every and held_out):
            return
        loaded = []
        for path in held_out:
            image, reason = try_load_image(path, image_size)
            if image is None:
                print(f"warning: {path}: skipped from the reconstruction grids, cannot be read ({reason})",
                      file=sys.stderr)
            else:
                loaded.append(image)
        self.images = torch.stack(loaded) if loaded else None

    @torch.no_grad()
    def _reconstruct(self, model: SoftVQVAE, images: torch.Tensor) -> torch.Tensor:
        was_training = model.training
        model.eval()
        try:
            dtype = self.loop.autocast_dtype
            return model.decode(model.encode(images, autocast_dtype=dtype), autocast_dtype=dtype).float().clamp(-1, 1)
        finally:
            model.train(was_training)

    def __call__(self, step: int) -> None:
        if self.images is None or (step % self.every and step != self.loop.settings.steps):
            return
        from softvq_fast.metrics import SSIM_WINDOW, psnr, ssim

        images = self.images.to(self.loop.runtime.device)
        rows = [images, self._reconstruct(self.part.module, images), self._reconstruct(self.part.ema, images)]
        unit = [(row.float() + 1) / 2 for row in rows]
        values = {}
        for name, row in (("", unit[1]), ("ema_", unit[2])):
            values[f"{name}psnr"] = float(psnr(unit[0], row).mean())
            if min(images.shape[-2:]) >= SSIM_WINDOW:
                values[f"{name}ssim"] = float(ssim(unit[0], row).mean())
        grid = torch.cat([torch.cat(list(row.cpu()), dim=2) for row in rows], dim=1)
        path = self.folder / f"step-{step}.png"
        self.folder.mkdir(parents=True, exist_ok=True)
        write_atomic(path, lambda f: tensor_to_image(grid).save(f, format="PNG"))
        self.loop.log_metrics("reconstructions", values, path=str(path))


# ------------------------------------------------------------------------------------ training
def run_config(config: TokenizerTrainingConfig, settings: TokenizerTrainingConfig, networks: Networks,
               data: TrainingImages) -> dict[str, Any]:
    """What the run trains (the config.json a resumed run must match)."""
    training = {k: v for k, v in settings_dict(settings).items() if k not in OPERATIONAL_SETTINGS}
    return {"model": {"source": networks.source, "config": dataclasses.asdict(networks.tokenizer.config)},
            "losses": config.losses.to_dict(), "training": training, "data": data.identity()}


def train_tokenizer(config: TokenizerTrainingConfig, hooks: Iterable[Callable[[int], None]] = ()) -> Path:
    """Train (or with `config.resume`, continue) a tokenizer run; returns the export folder.

    Everything is checked before the first step: the settings (FieldError, a ValueError, naming
    the field), the image folder, the model, every frozen network file the losses need, the run
    folder against the configuration of the run it holds (SetupError naming the argument). A
    non-finite loss term stops the run (NonFiniteLossError naming the step and the term) before
    any later checkpoint. `hooks`: functions called with each finished step number (after
    logging and checkpointing). Under torchrun every process calls this; see the module
    docstring and softvq_fast.training.loop."""
    return in_runtime(config, lambda runtime: _train(config, runtime, hooks))


def _train(config: TokenizerTrainingConfig, runtime: Runtime, hooks: Iterable[Callable[[int], None]]) -> Path:
    model = model_source(config)
    data = training_images(config, model.config.image_size)
    networks = load_networks(config, model)
    tokenizer = networks.tokenizer
    settings = dataclasses.replace(config, steps=config.total_steps(len(data.train)))
    schedule = config.schedule(len(data.train))
    loop = TrainingLoop(settings, runtime, config=run_config(config, settings, networks, data),
                        data_size=len(data.train))
    backends = training_backends(tokenizer, loop.plan.micro_batch, runtime.device, loop.autocast_dtype)
    for warning in slow_backend_warnings(backends, runtime.device):
        if runtime.is_main:
            print(f"warning: {warning}", file=sys.stderr)
    out = Path(config.out)
    checkpoint = prepare_run_folder(out, loop.config, resume=config.resume, runtime=runtime)
    if runtime.is_main:
        write_atomic(out / "config.yaml", lambda f: f.write(config.to_yaml().encode()))
    optimiser = dict(lr=schedule.at(0), betas=tuple(config.betas), weight_decay=config.weight_decay,
                     decay_vectors=False)
    tokenizer_part = loop.add_part("tokenizer", tokenizer, **optimiser)
    discriminator_part = None
    if networks.discriminator is not None:
        discriminator_part = loop.add_part("discriminator", networks.discriminator, ema=False, **optimiser)
    device = runtime.device
    step = TokenizerTrainingStep(
        tokenizer_part.module, config.losses,
        lpips=networks.lpips.to(device) if networks.lpips is not None else None,
        alignment=networks.alignment.to(device) if networks.alignment is not None else None,
        discriminator=discriminator_part.module if discriminator_part is not None else None,
        autocast_dtype=loop.autocast_dtype,
    )
    skipped = SkippedImages()
    loop.extra_state = {"losses": step, "skipped_images": skipped}
    if checkpoint is not None:
        loop.load_checkpoint(checkpoint)
    loop.open_logs(resumed=checkpoint is not None)
    loop.log_event("start", world_size=runtime.world_size, device=str(device), backends=backends,
                   resumed_from=str(checkpoint) if checkpoint else None, plan=vars(loop.plan), steps=settings.steps,
                   images=len(data.train), held_out=len(data.held_out), base_lr=schedule.base)
    sampler = StreamSampler(len(data.train), global_batch=config.global_batch, rank=runtime.rank,
                            world_size=runtime.world_size, seed=config.seed, start_step=loop.step,
                            stop_step=settings.steps)
    loader = DataLoader(data.train, batch_size=loop.plan.micro_batch, sampler=sampler, num_workers=config.num_workers,
                        collate_fn=collate_images, pin_memory=device.type == "cuda")
    iteration = TokenizerIteration(loop, step, tokenizer_part, discriminator_part, schedule, skipped)
    grids = ReconstructionGrids(loop, tokenizer_part, data.held_out, config.eval_every, tokenizer.config.image_size)
    try:
        loop.run(iteration, iter(loader), hooks=[grids, *hooks],
                 progress_terms=("loss", "discriminator/loss"), unit="images")
        export = Path(config.export or out / "export")
        _export(loop, tokenizer_part, config, data, export)
    finally:
        loop.close()
    return export


class TokenizerIteration:
    """The loop's step function: step(number, micro_batches) -> the step's terms (module
    docstring). Terms: "tokenizer/<term>" and "discriminator/<term>" before their weights, the
    codebook statistics, "loss" (the tokenizer's), "discriminator/loss" (from the adversarial
    start) and the gradient norms, in that order (the first non-finite one is the one named)."""

    def __init__(self, loop: TrainingLoop, step: TokenizerTrainingStep, tokenizer: Part, discriminator: Part | None,
                 schedule: WarmupCosine, skipped: SkippedImages) -> None:
        self.loop, self.step, self.tokenizer, self.discriminator = loop, step, tokenizer, discriminator
        self.schedule, self.skipped = schedule, skipped

    def draws(self, number: int, micro_batch: int, call: int) -> StepDraws:
        runtime, size = self.loop.runtime, self.loop.plan.micro_batch
        return StepDraws.seeded(self.loop.settings.seed, number, micro_batch, call, device=runtime.device,
                                rows=(runtime.rank * size, runtime.world_size * size))

    def usable(self, number: int, micro_batches: list) -> list[tuple[int, torch.Tensor]]:
        """(index, images on the device) of the micro-batches that hold images on every process;
        records the skipped images (warnings here, the count over all processes)."""
        runtime = self.loop.runtime
        before = self.skipped.count
        skipped_here = sum(self.skipped.record(batch) for batch in micro_batches)
        empty = [batch.images.shape[0] == 0 for batch in micro_batches]
        if runtime.distributed:
            counts = torch.tensor([*empty, skipped_here], dtype=torch.int64, device=runtime.device)
            dist.all_reduce(counts)
            *empty, skipped_here = counts.tolist()
        self.skipped.count = before + skipped_here
        if skipped_here:
            self.loop.log_event("skipped_images", step=number, count=skipped_here, total=self.skipped.count)
        return [(index, batch.images.to(runtime.device, non_blocking=True))
                for index, (batch, none) in enumerate(zip(micro_batches, empty)) if not none]

    def __call__(self, number: int, micro_batches: list) -> dict[str, torch.Tensor]:
        updates = number - 1  # the losses' schedules count the updates already made
        for part in (self.tokenizer, self.discriminator):
            if part is not None:
                self.loop.set_lr(part, self.schedule.at(updates))
        batches = self.usable(number, micro_batches)
        if not batches:
            self.loop.log_event("skipped_step", step=number, reason="no micro-batch holds images on every process")
            return {}
        fakes: dict[int, torch.Tensor] = {}

        def tokenizer_loss(runner, item, _) -> dict[str, torch.Tensor]:
            index, images = item
            losses = self.step.tokenizer_losses(images, updates, self.draws(number, index, 0), runner=runner)
            fakes[index] = losses.reconstructions
            return losses.as_terms()

        terms = self.loop.accumulate(self.tokenizer, batches, tokenizer_loss)
        norms = self.loop.update(self.tokenizer)
        if self.discriminator is not None:
            def discriminator_loss(runner, item, _) -> dict[str, torch.Tensor]:
                index, images = item
                result = self.step.discriminator_losses(images, fakes.pop(index), updates,
                                                        self.draws(number, index, 1), runner=runner)
                return result.as_terms()

            adversarial = self.loop.accumulate(self.discriminator, batches, discriminator_loss)
            if "loss" in adversarial:
                adversarial["discriminator/loss"] = adversarial.pop("loss")
                norms.update(self.loop.update(self.discriminator))
            terms.update(adversarial)
        sums = ("loss", "discriminator/loss")
        return {**{k: v for k, v in terms.items() if k not in sums}, **{k: terms[k] for k in sums if k in terms},
                **norms}


def _export(loop: TrainingLoop, part: Part, config: TokenizerTrainingConfig, data: TrainingImages,
            export: Path) -> None:
    """The EMA in the release layout, vq_mean / vq_std measured on up to statistics_images
    training images (centre crops, a sample chosen by the seed, shared out over the processes)."""
    runtime = loop.runtime
    files = data.train_files()
    count = min(config.statistics_images or len(files), len(files))
    generator = torch.Generator().manual_seed(mix_seed(config.seed, HOLD_OUT_STREAM, 1))
    sample = torch.randperm(len(files), generator=generator)[:count].tolist()[runtime.rank::runtime.world_size]
    ema = part.ema
    dataset = ImageFolderDataset(data.folder.folder, [files[i] for i in sample], None, ema.config.image_size)
    loader = DataLoader(dataset, batch_size=loop.plan.micro_batch, num_workers=config.num_workers,
                        collate_fn=_centre_crops)
    statistics = measure_latent_statistics(ema, loader, max(len(sample), 1), autocast_dtype=loop.autocast_dtype)
    if runtime.is_main:
        losses = config.losses
        ema.config = dataclasses.replace(ema.config, entropy_loss_ratio=losses.entropy_weight,
                                         repa_loss_weight=losses.alignment_weight)
        export_release(ema, export, statistics)
        loop.log_event("export", path=str(export), vq_mean=statistics.mean, vq_std=statistics.std,
                       images=statistics.images)
    runtime.barrier()
