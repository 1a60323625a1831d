"""Images in, latents out: preprocessing, image folders and the sharded latent dataset written by
`softvq-fast encode-dataset`.

Output folder layout:
  manifest.json            settings, normalisation stats, shard list (rewritten when complete)
  files.txt                the images in dataset order (paths relative to the input folder)
  shard-00000.safetensors  `latents` (n, T, D) float32, `indices` (n,) int64 dataset positions,
                           `labels` (n,) int64 when the input has class subfolders,
                           `latents_flip` (n, T, D) with --hflip; metadata: vq_mean, vq_std and
                           the shard's latent sum, sum of squares and element count.
A shard is written to a temporary name and renamed when complete, so an interrupted run never
leaves a partial shard; a rerun skips every shard that exists.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch
from PIL import Image
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch.utils.data import Dataset, Sampler

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff"})
MANIFEST_NAME = "manifest.json"
FILES_NAME = "files.txt"


# ------------------------------------------------------------------------------ preprocessing
def center_crop_resize(image: Image.Image, size: int) -> Image.Image:
    """The central square of the shorter side, resized to size x size (bicubic, antialiased), RGB."""
    image = image.convert("RGB")
    side = min(image.size)
    left, top = (image.width - side) // 2, (image.height - side) // 2
    return image.crop((left, top, left + side, top + side)).resize((size, size), Image.BICUBIC)


def image_to_tensor(image: Image.Image) -> torch.Tensor:
    """RGB PIL image -> (3, H, W) float32 in [-1, 1]."""
    array = np.asarray(image, dtype=np.uint8)
    return torch.from_numpy(array.copy()).permute(2, 0, 1).float() / 127.5 - 1.0


def tensor_to_image(x: torch.Tensor) -> Image.Image:
    """(3, H, W) in [-1, 1] -> RGB PIL image (values clamped)."""
    array = ((x.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return Image.fromarray(array.permute(1, 2, 0).numpy())


def load_image(path: str | Path, size: int) -> torch.Tensor:
    """An image file, centre-cropped and resized, as (3, size, size) in [-1, 1]."""
    with Image.open(path) as image:
        return image_to_tensor(center_crop_resize(image, size))


# ---------------------------------------------------------------------------------- datasets
def list_images(folder: Path) -> tuple[list[str], list[int] | None]:
    """Image paths under `folder` (relative, sorted) and, when every image sits in a first-level
    subfolder, a class label per image (index of its sorted subfolder name), else None."""
    files = sorted(
        str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS
    )
    if not files:
        raise ValueError(f"images: no image files ({', '.join(sorted(IMAGE_EXTENSIONS))}) under {folder}")
    parts = [Path(f).parts for f in files]
    if any(len(p) < 2 for p in parts):
        return files, None
    classes = sorted({p[0] for p in parts})
    return files, [classes.index(p[0]) for p in parts]


class ImageFolderDataset(Dataset):
    """Items (index, image (3, size, size) in [-1, 1], label or -1)."""

    def __init__(self, folder: Path, files: list[str], labels: list[int] | None, size: int) -> None:
        self.folder, self.files, self.labels, self.size = folder, files, labels, size

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> tuple[int, torch.Tensor, int]:
        label = self.labels[index] if self.labels is not None else -1
        return index, load_image(self.folder / self.files[index], self.size), label


# ------------------------------------------------------------------------------------ shards
@dataclass(frozen=True)
class ShardPlan:
    """Consecutive dataset ranges of `shard_size` images; shard i goes to rank i % world_size."""

    num_images: int
    shard_size: int

    @property
    def num_shards(self) -> int:
        return -(-self.num_images // self.shard_size)

    def bounds(self, shard: int) -> tuple[int, int]:
        start = shard * self.shard_size
        return start, min(start + self.shard_size, self.num_images)

    def owned(self, rank: int, world_size: int) -> list[int]:
        return list(range(rank, self.num_shards, world_size))


def shard_path(out: Path, shard: int) -> Path:
    return out / f"shard-{shard:05d}.safetensors"


def shard_complete(path: Path) -> bool:
    """True when the final shard file exists and its header reads (a rename is atomic, so a
    shard is either complete or absent; the read guards against outside damage)."""
    if not path.is_file():
        return False
    try:
        with safe_open(str(path), framework="pt") as f:
            return "latents" in f.keys()
    except (SafetensorError, OSError):
        return False


class DistributedShardSampler(Sampler[list[int]]):
    """Batches of dataset indices for the pending shards of one rank (a batch never spans two
    shards, so a shard's batches are the same whatever the number of processes)."""

    def __init__(self, plan: ShardPlan, shards: list[int], batch_size: int) -> None:
        self.plan, self.shards, self.batch_size = plan, shards, batch_size

    def __iter__(self) -> Iterator[list[int]]:
        for shard in self.shards:
            start, stop = self.plan.bounds(shard)
            for first in range(start, stop, self.batch_size):
                yield list(range(first, min(first + self.batch_size, stop)))

    def __len__(self) -> int:
        return sum(-(-(stop - start) // self.batch_size) for start, stop in map(self.plan.bounds, self.shards))


def write_shard(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str], tag: str) -> None:
    """Write to a temporary name beside `path`, then rename (atomic on POSIX)."""
    temporary = path.with_name(f"{path.name}.tmp-{tag}")
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(temporary), metadata=metadata)
    os.replace(temporary, path)


def latent_stats(latents: torch.Tensor) -> dict[str, str]:
    x = latents.double()
    return {"sum": repr(x.sum().item()), "sum_sq": repr(x.square().sum().item()), "count": str(x.numel())}


def files_digest(files: list[str]) -> str:
    return hashlib.sha256("\n".join(files).encode()).hexdigest()


def _write_text_atomic(path: Path, text: str) -> None:
    """A killed run leaves the old file or the new one, never half of one."""
    partial = path.with_name(path.name + ".partial")
    partial.write_text(text)
    os.replace(partial, path)


def check_same_files(out: Path, files: list[str]) -> None:
    """Raise unless `files` is the list the manifest in `out` was started with."""
    manifest = json.loads((out / MANIFEST_NAME).read_text())
    if manifest["files_sha256"] != files_digest(files):
        raise ValueError(
            f"images: this process lists {len(files)} images, not the {manifest['num_images']} of "
            f"{out / FILES_NAME} that rank 0 listed; every rank must see the same image folder"
        )


def write_manifest_start(out: Path, settings: dict, files: list[str]) -> None:
    """Create files.txt and manifest.json, or check that an existing manifest has the same
    settings and file list (a resumed run must not mix two datasets in one folder)."""
    out.mkdir(parents=True, exist_ok=True)
    manifest_path = out / MANIFEST_NAME
    settings = {**settings, "files": FILES_NAME, "files_sha256": files_digest(files)}
    if manifest_path.is_file():
        previous = json.loads(manifest_path.read_text())
        changed = sorted(k for k in settings if previous.get(k) != settings[k])
        if changed:
            raise ValueError(
                f"out: {out} holds a run with different settings ({', '.join(changed)}); use a new output folder"
            )
        _write_text_atomic(manifest_path, json.dumps({**previous, "complete": False}, indent=1) + "\n")
        return
    _write_text_atomic(out / FILES_NAME, "\n".join(files) + "\n")
    _write_text_atomic(manifest_path, json.dumps({**settings, "complete": False}, indent=1) + "\n")


def finish_manifest(out: Path, plan: ShardPlan) -> dict:
    """Add the shard list and dataset latent mean/std to the manifest once every shard exists."""
    manifest_path = out / MANIFEST_NAME
    manifest = json.loads(manifest_path.read_text())
    total = total_sq = 0.0
    count = 0
    shards = []
    for shard in range(plan.num_shards):
        path = shard_path(out, shard)
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata()
        total += float(meta["sum"])
        total_sq += float(meta["sum_sq"])
        count += int(meta["count"])
        start, stop = plan.bounds(shard)
        shards.append({"file": path.name, "start": start, "count": stop - start})
    mean = total / count
    manifest.update(
        shards=shards,
        latent_mean=mean,
        latent_std=max(total_sq / count - mean * mean, 0.0) ** 0.5,
        complete=True,
    )
    _write_text_atomic(manifest_path, json.dumps(manifest, indent=1) + "\n")
    return manifest


def encode_shards(
    encode: Callable[[torch.Tensor], torch.Tensor],
    loader: Iterator,
    plan: ShardPlan,
    out: Path,
    *,
    hflip: bool,
    with_labels: bool,
    metadata: dict[str, str],
    tag: str,
    on_batch: Callable[[int], None] = lambda n: None,
) -> int:
    """Consume batches (indices, images, labels) in the sampler's order, write each shard as soon
    as its last batch is encoded. Returns the number of shards written."""
    pending: dict[str, list[torch.Tensor]] = {}
    written = 0
    for indices, images, labels in loader:
        parts = {"indices": indices.long(), "latents": encode(images).cpu()}
        if hflip:
            parts["latents_flip"] = encode(images.flip(-1)).cpu()
        if with_labels:
            parts["labels"] = labels.long()
        for key, value in parts.items():
            pending.setdefault(key, []).append(value)
        on_batch(len(indices))
        shard = int(indices[0]) // plan.shard_size
        start, stop = plan.bounds(shard)
        if int(indices[-1]) == stop - 1:
            tensors = {key: torch.cat(values) for key, values in pending.items()}
            pending.clear()
            if tensors["indices"].tolist() != list(range(start, stop)):
                raise RuntimeError(f"shard {shard}: batches arrived out of order (the sampler must yield shard by shard)")
            write_shard(shard_path(out, shard), tensors, {**metadata, **latent_stats(tensors["latents"])}, tag)
            written += 1
    return written
