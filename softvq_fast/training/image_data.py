"""Image folders for tokenizer training: the authors' random resized crop and horizontal flip,
reproducible per (seed, epoch, image), and unreadable images skipped, named and counted.

The folder is listed and its files are read as `softvq_fast.data` does for encode-dataset (class
subfolders or a flat folder, links followed, 16-bit and float images scaled to 8 bits). Each item
is then transformed as the authors' training data (their `random_crop_arr`, then a flip):

  1. draw the shorter side s uniformly from [ceil(S / 1.0), ceil(S / 0.8)] (S = image_size:
     256..320 at 256 px, 512..640 at 512 px);
  2. halve the image (box filter, sizes floored) while its shorter side is at least 2 s;
  3. resize it (bicubic) so that its shorter side is s, the other side round(side * s / shorter);
  4. crop S x S at a uniform random offset (row, then column);
  5. flip left-right with probability 1/2 (`flip`).

The draws of item i in epoch e come from a generator seeded by (seed, e, i) alone, in the order
above: the same item of the same epoch is the same tensor in any process, worker or resumed run.

An image that cannot be read yields a `SkippedImage` instead of raising; `collate_images` drops
those from the batch and lists them in `ImageBatch.skipped`, and `SkippedImages.record` (in the
training process) logs a warning naming each and keeps the count. So a batch may hold fewer
images than asked, none at all when every one of them failed.
"""
from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch
from PIL import Image
from torch.utils.data import Dataset

from softvq_fast.data import image_to_tensor, list_images, mix_seed, to_rgb

__all__ = [
    "TrainingImageFolder",
    "SkippedImage",
    "ImageBatch",
    "collate_images",
    "SkippedImages",
    "random_resized_crop",
    "shorter_side_range",
]

logger = logging.getLogger(__name__)

# The authors' random_crop_arr: the crop is between 80 % and 100 % of the resized shorter side.
MIN_CROP_FRACTION, MAX_CROP_FRACTION = 0.8, 1.0


def shorter_side_range(image_size: int) -> tuple[int, int]:
    """The inclusive range of the resized shorter side for crops of `image_size`."""
    return math.ceil(image_size / MAX_CROP_FRACTION), math.ceil(image_size / MIN_CROP_FRACTION)


def _uniform_int(low: int, high: int, generator: torch.Generator) -> int:
    """An integer uniform in [low, high] (inclusive)."""
    return int(torch.randint(low, high + 1, (), generator=generator))


def random_resized_crop(image: Image.Image, image_size: int, generator: torch.Generator) -> Image.Image:
    """Steps 1-4 of the module docstring on an RGB image: an image_size x image_size RGB image."""
    low, high = shorter_side_range(image_size)
    side = _uniform_int(low, high, generator)
    while min(image.size) >= 2 * side:
        image = image.resize(tuple(length // 2 for length in image.size), resample=Image.Resampling.BOX)
    scale = side / min(image.size)
    image = image.resize(tuple(round(length * scale) for length in image.size), resample=Image.Resampling.BICUBIC)
    top = _uniform_int(0, image.height - image_size, generator)
    left = _uniform_int(0, image.width - image_size, generator)
    return image.crop((left, top, left + image_size, top + image_size))


@dataclass(frozen=True)
class SkippedImage:
    """An item whose image could not be read: its index, path and the reason."""

    index: int
    path: str
    reason: str


class TrainingImageFolder(Dataset):
    """The images under `folder` (class subfolders give labels, a flat folder none) as items
    (index, image (3, S, S) float32 in [-1, 1], label or -1), S = image_size, transformed as the
    module docstring says; or a SkippedImage for a file that cannot be read.

    Keys: an index (in the epoch set by `set_epoch`, for torch's DistributedSampler) or a pair
    (index, epoch), as softvq_fast.data.StreamSampler yields them."""

    def __init__(self, folder: str | os.PathLike, image_size: int, *, seed: int = 0, flip: bool = True) -> None:
        if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1:
            raise ValueError(f"image_size must be a positive integer, got {image_size!r}")
        self.folder = Path(folder)
        listing = list_images(self.folder)
        self.files, self.labels, self.classes = listing.files, listing.labels, listing.classes
        self.image_size, self.seed, self.flip = image_size, seed, flip
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.files)

    def set_epoch(self, epoch: int) -> None:
        """The epoch of plain integer keys (DataLoader workers copy the dataset when an iteration
        starts: set it before)."""
        self.epoch = epoch

    def view(self, image: Image.Image, index: int, epoch: int) -> torch.Tensor:
        """The training view of item `index` in `epoch` of an already opened image."""
        generator = torch.Generator().manual_seed(mix_seed(self.seed, epoch, index))
        crop = random_resized_crop(to_rgb(image), self.image_size, generator)
        if self.flip and bool(torch.rand((), generator=generator) < 0.5):
            crop = crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        return image_to_tensor(crop)

    def __getitem__(self, key: int | tuple[int, int]) -> tuple[int, torch.Tensor, int] | SkippedImage:
        index, epoch = key if isinstance(key, tuple) else (key, self.epoch)
        if not 0 <= index < len(self.files):
            raise IndexError(f"item {index} of an image folder of {len(self.files)}")
        path = self.folder / self.files[index]
        try:
            with Image.open(path) as image:
                view = self.view(image, index, epoch)
        except Exception as exc:  # Pillow's decoders raise many types for damaged or odd files
            return SkippedImage(index, str(path), f"{type(exc).__name__}: {exc}")
        return index, view, self.labels[index] if self.labels is not None else -1


@dataclass
class ImageBatch:
    """A training batch: images (B, 3, S, S) float32 in [-1, 1], labels (B,) int64 (-1 without
    classes), indices (B,) int64 of the items, and the items of the batch that were skipped."""

    images: torch.Tensor
    labels: torch.Tensor
    indices: torch.Tensor
    skipped: list[SkippedImage] = field(default_factory=list)

    def pin_memory(self) -> "ImageBatch":
        """For DataLoader(pin_memory=True)."""
        return ImageBatch(self.images.pin_memory(), self.labels.pin_memory(), self.indices.pin_memory(), self.skipped)


def collate_images(items: Sequence[tuple[int, torch.Tensor, int] | SkippedImage]) -> ImageBatch:
    """DataLoader collate_fn of TrainingImageFolder: the readable items stacked, the skipped
    ones listed. A batch of only skipped items has images of shape (0, 3, 0, 0)."""
    good = [item for item in items if not isinstance(item, SkippedImage)]
    skipped = [item for item in items if isinstance(item, SkippedImage)]
    if not good:
        empty = torch.zeros(0, dtype=torch.int64)
        return ImageBatch(torch.zeros(0, 3, 0, 0), empty, empty.clone(), skipped)
    indices, images, labels = zip(*good)
    return ImageBatch(torch.stack(images), torch.tensor(labels, dtype=torch.int64),
                      torch.tensor(indices, dtype=torch.int64), skipped)


class SkippedImages:
    """The training process's record of the images skipped so far: `record(batch)` warns naming
    each newly skipped file and adds it to `count` (a checkpointable state)."""

    def __init__(self) -> None:
        self.count = 0

    def record(self, batch: ImageBatch) -> int:
        """Warn about and count the batch's skipped images; returns how many it had."""
        for item in batch.skipped:
            logger.warning("%s: skipped, cannot be read as an image (%s)", item.path, item.reason)
        self.count += len(batch.skipped)
        return len(batch.skipped)

    def state_dict(self) -> dict[str, int]:
        return {"count": self.count}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.count = int(state["count"])
