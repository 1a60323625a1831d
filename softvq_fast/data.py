"""Images in, latents out: preprocessing, image folders and the sharded latent dataset written by
`softvq-fast encode-dataset`, and its reader for training (`LatentShards`, `StreamSampler`).

Output folder layout:
  manifest.json            settings (with the tokenizer's content hashes), normalisation stats, the
                           shard list with each shard's fingerprint (its latent statistics) and the
                           images that could not be read (rewritten when complete)
  files.jsonl              the images in dataset order, one JSON object a line: "path" (relative to
                           the input folder), "size" (bytes) and "mtime_ns" when the run started.
                           JSON, so that any file name (a newline in it too) reads back unchanged
  shard-00000.safetensors  `latents` (n, T, D) float32, `indices` (n,) int64 dataset positions,
                           `labels` (n,) int64 when the input has class subfolders,
                           `latents_flip` (n, T, D) with --hflip; metadata: vq_mean, vq_std, the
                           shard's latent sum, sum of squares and element count, and `skipped`, a
                           JSON list of [position, reason] of the images that could not be read.
Shard i covers the dataset positions [i * shard_size, (i + 1) * shard_size); its n rows are those
positions minus its unreadable images. A shard is written to a temporary name and renamed when
complete, so an interrupted run never leaves a partial shard; a rerun skips every shard that
exists, encodes again each one holding an image whose size or mtime changed, and refuses to
continue when the settings, the image names or the tokenizer's files changed.
"""
from __future__ import annotations

import bisect
import hashlib
import json
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch
from PIL import Image
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch.utils.data import Dataset, Sampler

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff"})
MANIFEST_NAME = "manifest.json"
FILES_NAME = "files.jsonl"
LEGACY_FILES_NAME = "files.txt"  # names one a line, written before files.jsonl; read, never written
# Pillow modes of one channel deeper than 8 bits -> the value that is white. Pillow opens 16-bit
# files as I;16* or (older versions, some TIFFs) I; float files as F, taken to hold [0, 1].
HIGH_BIT_DEPTH_WHITE = {"I;16": 65535, "I;16L": 65535, "I;16B": 65535, "I;16N": 65535, "I": 65535, "F": 1.0}
# What a killed run can leave in the output folder (write_shard's and _write_text_atomic's names).
TEMPORARY_NAME = re.compile(r"shard-\d{5,}\.safetensors\.tmp-.+|(manifest\.json|files\.jsonl)\.partial")
HASH_CHUNK = 1 << 24


class DatasetError(ValueError):
    """A bad image folder or output folder; `argument` is the one at fault ("images" or "out")."""

    def __init__(self, argument: str, message: str) -> None:
        super().__init__(f"{argument}: {message}")
        self.argument, self.message = argument, message


# ------------------------------------------------------------------------------ preprocessing
def to_rgb(image: Image.Image) -> Image.Image:
    """8-bit RGB. One-channel images deeper than 8 bits are scaled to 0..255, not clipped (16-bit
    by 255/65535, float from [0, 1]); values outside that range raise ValueError. Other modes go
    through Pillow's convert (alpha is dropped; 16-bit RGB PNGs already open as 8-bit RGB)."""
    white = HIGH_BIT_DEPTH_WHITE.get(image.mode)
    if white is None:
        return image.convert("RGB")
    array = np.asarray(image, dtype=np.float64)
    low, high = float(array.min()), float(array.max())
    if not (0 <= low and high <= white):  # NaN fails too
        raise ValueError(f"mode {image.mode} image with values in [{low}, {high}], expected [0, {white}]")
    return Image.fromarray(np.round(array * (255 / white)).astype(np.uint8)).convert("RGB")


def center_crop_resize(image: Image.Image, size: int) -> Image.Image:
    """The central square of the shorter side, resized to size x size (bicubic, antialiased), RGB
    (`to_rgb`)."""
    if size < 1:
        raise ValueError(f"size must be at least 1, got {size}")
    image = to_rgb(image)
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


def try_load_image(path: str | Path, size: int) -> tuple[torch.Tensor | None, str]:
    """(`load_image`, "") or (None, the reason) for a file that cannot be read as an image."""
    try:
        return load_image(path, size), ""
    except Exception as exc:  # Pillow's decoders raise many types for damaged or odd files
        return None, f"{type(exc).__name__}: {exc}"


# ---------------------------------------------------------------------------------- datasets
@dataclass(frozen=True)
class ImageListing:
    """Image paths relative to the folder (sorted) and, when every image sits in a subfolder, a
    label per image: the index of its first-level folder among `classes` (the sorted names of the
    first-level folders that hold images)."""

    files: list[str]
    labels: list[int] | None
    classes: list[str]


def _walk_image_files(folder: Path) -> list[str]:
    """Relative paths of the image files under `folder`, symbolic links to files and to folders
    followed alike. A link back to a folder that contains it (a loop) and a link to nothing are
    skipped with a warning; a folder that cannot be read is an error (a class would vanish)."""
    if not folder.is_dir():
        raise DatasetError("images", f"{folder} {'is not a folder' if folder.exists() else 'does not exist'}")
    found: list[str] = []
    top = folder.stat()
    stack: list[tuple[Path, tuple[str, ...], frozenset]] = [(folder, (), frozenset({(top.st_dev, top.st_ino)}))]
    while stack:
        directory, relative, ancestors = stack.pop()
        try:
            with os.scandir(directory) as scan:
                entries = list(scan)
        except OSError as exc:
            raise DatasetError("images", f"cannot read the folder {directory} ({exc.strerror or exc})") from exc
        for entry in entries:
            parts = (*relative, entry.name)
            if entry.is_dir():
                status = entry.stat()
                key = (status.st_dev, status.st_ino)
                if key in ancestors:
                    logger.warning("%s: skipped, a link back to a folder that contains it", entry.path)
                    continue
                stack.append((Path(entry.path), parts, ancestors | {key}))
            elif os.path.splitext(entry.name)[1].lower() in IMAGE_EXTENSIONS:
                if entry.is_file():
                    found.append(os.path.join(*parts))
                elif entry.is_symlink():
                    logger.warning("%s: skipped, a link to nothing", entry.path)
    return sorted(found)


def list_images(folder: Path) -> ImageListing:
    """The images under `folder` (`_walk_image_files`) with class labels when every image sits in
    a subfolder; a warning says why there are no labels when only some do, and which first-level
    folders hold no image (they are not classes). DatasetError when there is no image."""
    files = _walk_image_files(folder)
    if not files:
        raise DatasetError("images", f"no image files ({', '.join(sorted(IMAGE_EXTENSIONS))}) under {folder}")
    top_level = [f for f in files if os.sep not in f]
    if top_level:
        if len(top_level) < len(files):
            logger.warning("%s: no class labels: %d of %d images sit directly in the folder (%s, ...), not in a "
                           "class folder", folder, len(top_level), len(files), top_level[0])
        return ImageListing(files, None, [])
    first_level = [f.split(os.sep, 1)[0] for f in files]
    classes = sorted(set(first_level))
    index = {name: i for i, name in enumerate(classes)}
    with os.scandir(folder) as scan:
        empty = sorted(e.name for e in scan if e.is_dir() and e.name not in index)
    if empty:
        logger.warning("%s: %d folders hold no image and are not classes: %s", folder, len(empty), ", ".join(empty[:5]))
    return ImageListing(files, [index[name] for name in first_level], classes)


def image_stats(folder: Path, files: list[str]) -> list[tuple[int, int]]:
    """(size in bytes, mtime in ns) of each file, links followed: what tells a resumed run that an
    image changed under the same name."""
    stats = []
    for name in files:
        status = os.stat(folder / name)
        stats.append((status.st_size, status.st_mtime_ns))
    return stats


class ImageFolderDataset(Dataset):
    """Items (index, image (3, size, size) in [-1, 1], label or -1, error). An image that cannot
    be read is all zeros with `error` its reason ("" otherwise), so one bad file does not end a
    long run; the consumer drops it."""

    def __init__(self, folder: Path, files: list[str], labels: list[int] | None, size: int) -> None:
        self.folder, self.files, self.labels, self.size = folder, files, labels, size

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> tuple[int, torch.Tensor, int, str]:
        label = self.labels[index] if self.labels is not None else -1
        image, error = try_load_image(self.folder / self.files[index], self.size)
        return index, image if image is not None else torch.zeros(3, self.size, self.size), label, error


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


def remove_stale_temporaries(out: Path) -> list[str]:
    """Delete what killed runs left in `out` (only names of `TEMPORARY_NAME`, only in `out` itself);
    returns their names. Call it before any process of this run writes."""
    stale = sorted(e.name for e in os.scandir(out) if TEMPORARY_NAME.fullmatch(e.name) and e.is_file(follow_symlinks=False))
    for name in stale:
        (out / name).unlink(missing_ok=True)
    return stale


def latent_stats(latents: torch.Tensor) -> dict[str, str]:
    x = latents.double()
    return {"sum": repr(x.sum().item()), "sum_sq": repr(x.square().sum().item()), "count": str(x.numel())}


def shard_fingerprint(metadata: dict[str, str]) -> str:
    """The shard's latent sum, sum of squares and count as written in its metadata: recorded in
    the manifest, so that a reader tells a shard of this run from a look-alike of another run
    (same name, rows and positions) without reading its latents."""
    return f"{metadata['sum']} {metadata['sum_sq']} {metadata['count']}"


def file_sha256(path: Path) -> str:
    """Hex sha256 of a file's bytes, read in chunks (checkpoints can be gigabytes)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def files_digest(files: list[str]) -> str:
    return hashlib.sha256(json.dumps(files).encode()).hexdigest()


# ---------------------------------------------------------------------------------- manifest
# Where the inputs were read from: recorded, not compared on resume (their content is).
UNCOMPARED_SETTINGS = frozenset({"model", "images"})


def _write_text_atomic(path: Path, text: str) -> None:
    """A killed run leaves the old file or the new one, never half of one."""
    partial = path.with_name(path.name + ".partial")
    partial.write_text(text)
    os.replace(partial, path)


def _write_json(path: Path, value: dict) -> None:
    _write_text_atomic(path, json.dumps(value, indent=1) + "\n")


def read_manifest(out: Path) -> dict:
    """The manifest in `out`; DatasetError naming it when it cannot be read."""
    path = out / MANIFEST_NAME
    try:
        manifest = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DatasetError("out", f"{path} cannot be read ({exc}); use a new output folder") from exc
    if not isinstance(manifest, dict):
        raise DatasetError("out", f"{path} is not a manifest (not a JSON object); use a new output folder")
    return manifest


def _read_file_records(out: Path, manifest: dict) -> list[dict]:
    path = out / manifest.get("files", FILES_NAME)
    try:
        text = path.read_text()
        if path.name == LEGACY_FILES_NAME:
            return [{"path": line} for line in text.splitlines()]
        return [json.loads(line) for line in text.splitlines()]
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DatasetError("out", f"{path} cannot be read ({exc}); use a new output folder") from exc


def read_file_list(out: Path) -> list[str]:
    """The image paths of an output folder in dataset order (shard `indices` index this list);
    reads files.jsonl, or the files.txt of folders written before it."""
    return [record["path"] for record in _read_file_records(out, read_manifest(out))]


def check_same_files(out: Path, files: list[str]) -> None:
    """Raise unless `files` is the list the manifest in `out` was started with."""
    manifest = read_manifest(out)
    if manifest["files_sha256"] != files_digest(files):
        raise DatasetError(
            "images",
            f"this process lists {len(files)} images, not the {manifest['num_images']} of "
            f"{out / FILES_NAME} that rank 0 listed; every rank must see the same image folder",
        )


def _setting_change(key: str, old, new) -> str:
    if old is None:
        return f"{key}: not recorded (started by an older softvq-fast)"
    if key == "model_sha256":
        names = sorted(name for name in {*old, *new} if old.get(name) != new.get(name))
        return f"model_sha256: the tokenizer's {', '.join(names)} changed"
    if key == "files_sha256":
        return "files_sha256: the image names differ"
    return f"{key}: {old!r} -> {new!r}"


def _write_file_list(out: Path, files: list[str], stats: list[tuple[int, int]]) -> None:
    records = (json.dumps({"path": f, "size": size, "mtime_ns": mtime}) for f, (size, mtime) in zip(files, stats))
    _write_text_atomic(out / FILES_NAME, "".join(line + "\n" for line in records))


def prepare_output(out: Path, settings: dict, files: list[str], stats: list[tuple[int, int]], plan: ShardPlan) -> list[int]:
    """Rank 0's step before any process writes a shard. A new `out`: create it, files.jsonl and
    manifest.json. A started one: check that its run has the same settings and image names
    (else DatasetError naming what changed: a resumed run must not mix two datasets or two
    tokenizers in one folder), then delete the shards holding an image whose size or mtime
    changed since that run started, so that they are encoded again. Returns those shards."""
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DatasetError("out", f"cannot create the folder {out} ({exc.strerror or exc})") from exc
    settings = {**settings, "files": FILES_NAME, "files_sha256": files_digest(files)}
    manifest_path = out / MANIFEST_NAME
    if not manifest_path.exists():
        if any(out.glob("shard-*.safetensors")):
            raise DatasetError("out", f"{out} holds shard files but no {MANIFEST_NAME}; use a new output folder")
        _write_file_list(out, files, stats)
        _write_json(manifest_path, {**settings, "complete": False})
        return []
    previous = read_manifest(out)
    changes = [_setting_change(k, previous.get(k), v) for k, v in settings.items()
               if k not in UNCOMPARED_SETTINGS and previous.get(k) != v]
    if changes:
        raise DatasetError("out", f"{out} holds a run with different settings ({'; '.join(changes)}); "
                                  "use a new output folder")
    recorded = [(r["size"], r["mtime_ns"]) for r in _read_file_records(out, previous)]
    changed = sorted({i // plan.shard_size for i, (old, new) in enumerate(zip(recorded, stats)) if old != new})
    for shard in changed:  # before the new stats are recorded: a kill in between re-encodes again
        shard_path(out, shard).unlink(missing_ok=True)
    if changed:
        _write_file_list(out, files, stats)
    _write_json(manifest_path, {**previous, **settings, "complete": False})
    return changed


def finish_manifest(out: Path, plan: ShardPlan, files: list[str]) -> dict:
    """Add the shard list, the unreadable images and the dataset latent mean/std to the manifest
    once every shard exists. DatasetError when no image could be read."""
    manifest = read_manifest(out)
    total = total_sq = 0.0
    count = 0
    shards, skipped, fingerprints = [], [], {}
    for shard in range(plan.num_shards):
        path = shard_path(out, shard)
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata()
            rows = f.get_slice("indices").get_shape()[0]
        total += float(meta["sum"])
        total_sq += float(meta["sum_sq"])
        count += int(meta["count"])
        skipped += [{"index": i, "path": files[i], "reason": reason} for i, reason in json.loads(meta["skipped"])]
        start, stop = plan.bounds(shard)
        shards.append({"file": path.name, "start": start, "stop": stop, "count": rows})
        fingerprints[path.name] = shard_fingerprint(meta)
    manifest.update(shards=shards, skipped=skipped, shard_fingerprints=fingerprints)
    if count == 0:
        _write_json(out / MANIFEST_NAME, manifest)
        raise DatasetError("images", f"none of the {plan.num_images} images could be read (the reasons are in "
                                     f"{out / MANIFEST_NAME}, 'skipped')")
    mean = total / count
    manifest.update(latent_mean=mean, latent_std=max(total_sq / count - mean * mean, 0.0) ** 0.5, complete=True)
    _write_json(out / MANIFEST_NAME, manifest)
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
    on_skip: Callable[[int, str], None] = lambda index, reason: None,
) -> int:
    """Consume batches (indices, images, labels, errors) in the sampler's order, write each shard
    as soon as its last batch is encoded. Images with an error are left out of the shard, listed
    in its `skipped` metadata and passed to `on_skip(index, reason)`. Returns the number of
    shards written."""
    pending: dict[str, list[torch.Tensor]] = {}
    skipped: list[tuple[int, str]] = []
    written = 0
    for indices, images, labels, errors in loader:
        readable = torch.tensor([not error for error in errors], dtype=torch.bool)
        parts = {"indices": indices.long()[readable], "latents": encode(images).cpu()[readable]}
        if hflip:
            parts["latents_flip"] = encode(images.flip(-1)).cpu()[readable]
        if with_labels:
            parts["labels"] = labels.long()[readable]
        for key, value in parts.items():
            pending.setdefault(key, []).append(value)
        for index, error in zip(indices.tolist(), errors):
            if error:
                skipped.append((index, error))
                on_skip(index, error)
        on_batch(len(indices))
        shard = int(indices[0]) // plan.shard_size
        start, stop = plan.bounds(shard)
        if int(indices[-1]) == stop - 1:
            tensors = {key: torch.cat(values) for key, values in pending.items()}
            pending.clear()
            left_out = {i for i, _ in skipped}
            if tensors["indices"].tolist() != [i for i in range(start, stop) if i not in left_out]:
                raise RuntimeError(f"shard {shard}: batches arrived out of order (the sampler must yield shard by shard)")
            shard_metadata = {**metadata, **latent_stats(tensors["latents"]), "skipped": json.dumps(skipped)}
            write_shard(shard_path(out, shard), tensors, shard_metadata, tag)
            skipped = []
            written += 1
    return written


# ----------------------------------------------------------------------------- reading shards
MAX_OPEN_SHARDS = 64
_MASK64 = (1 << 64) - 1
_GOLDEN64 = 0x9E3779B97F4A7C15


def mix_seed(*values: int) -> int:
    """A 63-bit integer that depends on every value (one splitmix64 round per value): the seeds
    of per-epoch shuffles and per-item flips, which touch no global generator."""
    state = 0
    for value in values:
        z = (state ^ (value & _MASK64)) + _GOLDEN64 & _MASK64
        z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9 & _MASK64
        z = (z ^ (z >> 27)) * 0x94D049BB133111EB & _MASK64
        state = z ^ (z >> 31)
    return state >> 1


@dataclass(frozen=True)
class ShardRows:
    """One shard of a latent dataset: its file and the dataset rows [first, first + count) it holds."""

    path: Path
    first: int
    count: int


def _shard_problem(f, entry: dict, manifest: dict, fingerprint: str | None, expected_indices: list[int]) -> str | None:
    """Why the open shard `f` is not the one `entry` of `manifest` lists, or None."""
    keys = set(f.keys())
    expected = {"latents", "indices"} | ({"labels"} if manifest.get("labels") else set()) \
        | ({"latents_flip"} if manifest.get("hflip") else set())
    if keys != expected:
        missing, extra = sorted(expected - keys), sorted(keys - expected)
        return "incomplete or foreign: " + "; ".join(
            part for part in (missing and f"no {', '.join(missing)}", extra and f"unexpected {', '.join(extra)}") if part
        ) + f" (the manifest's run has labels={bool(manifest.get('labels'))}, hflip={bool(manifest.get('hflip'))})"
    rows = (entry["count"], *manifest["latent_shape"])
    for name in sorted(keys):
        shape, dtype = tuple(f.get_slice(name).get_shape()), f.get_slice(name).get_dtype()
        want_shape, want_dtype = (rows, "F32") if name.startswith("latents") else (rows[:1], "I64")
        if shape != want_shape or dtype != want_dtype:
            return f"{name} is {dtype} {shape}, the manifest lists {want_dtype} {want_shape}"
    meta = f.metadata() or {}
    for name in ("vq_mean", "vq_std"):
        try:
            recorded = float(meta[name])
        except (KeyError, ValueError):
            return f"its metadata has no {name}"
        if recorded != manifest[name]:
            return f"foreign: made with {name} {recorded}, the manifest's tokenizer has {manifest[name]}"
    if fingerprint is not None and (set(meta) < {"sum", "sum_sq", "count"} or shard_fingerprint(meta) != fingerprint):
        return "foreign: its latent statistics differ from those manifest.json recorded for it (a shard of another run?)"
    if f.get_tensor("indices").tolist() != expected_indices:
        return f"foreign: its rows are not the images [{entry['start']}, {entry['stop']}) of this dataset"
    return None


def check_shards(folder: Path, manifest: dict) -> list[ShardRows]:
    """The shards `manifest` lists, each checked: it exists, reads as safetensors (complete: the
    header covers the file), holds the tensors of the manifest's settings in their shapes and
    dtypes, records the manifest's vq_mean / vq_std and latent statistics, and holds the rows of
    its dataset range. DatasetError("latents", ...) naming the first shard that fails."""
    if not manifest.get("complete") or not isinstance(manifest.get("shards"), list):
        raise DatasetError("latents", f"{folder / MANIFEST_NAME} describes an unfinished encode-dataset run "
                                      "(run it again to finish)")
    fingerprints = manifest.get("shard_fingerprints")  # absent from folders written before it was recorded
    skipped = {record["index"] for record in manifest.get("skipped", [])}
    shards, first = [], 0
    for entry in manifest["shards"]:
        path = folder / entry["file"]
        if not path.is_file():
            raise DatasetError("latents", f"{path}: missing (listed in {MANIFEST_NAME})")
        expected = [i for i in range(entry["start"], entry["stop"]) if i not in skipped]
        try:
            with safe_open(str(path), framework="pt") as f:
                fingerprint = None if fingerprints is None else fingerprints.get(entry["file"], "")
                problem = _shard_problem(f, entry, manifest, fingerprint, expected)
        except (SafetensorError, OSError) as exc:
            problem = f"damaged: cannot be read as safetensors ({exc})"
        if problem is None and len(expected) != entry["count"]:
            problem = f"the manifest lists {entry['count']} rows for {len(expected)} readable images"
        if problem:
            raise DatasetError("latents", f"{path}: {problem}")
        shards.append(ShardRows(path, first, entry["count"]))
        first += entry["count"]
    return shards


class LatentShards(Dataset):
    """The latents of an `encode-dataset` output folder as items (latent (T, D) float32, label),
    in shard order (the readable images in dataset order).

    folder: the encode-dataset output (manifest.json + shard-NNNNN.safetensors).
    flip: where the shards hold `latents_flip` (encode-dataset --hflip), return the latents of
        the flipped image with probability 1/2, decided by (seed, epoch, item) alone
        (`flipped`), never by a global generator: a rerun and a resumed run read the same items.
    normalize: return (z - vq_mean) / vq_std with the tokenizer config's vq_mean and vq_std that
        every shard records in its metadata (what SoftVQVAE.normalize_latents applies and
        softvq_fast.generate inverts), not the latent_mean / latent_std measured in the manifest.
    Keys: an item number i (in the epoch set by `set_epoch`, 0 at first) or a pair (i, epoch), as
    `StreamSampler` yields them. The label is an int, -1 where the images had no class folders.

    The constructor reads manifest.json and checks every shard it lists (`check_shards`): a
    missing, damaged, incomplete or foreign shard is a DatasetError naming it before any
    training starts. Shards are memory-mapped (safetensors safe_open) and opened lazily by each
    process that reads them (a pickled copy, as DataLoader workers get, carries no open file), at
    most MAX_OPEN_SHARDS at once; an item reads its own row only."""

    def __init__(self, folder: str | Path, *, flip: bool = True, normalize: bool = True, seed: int = 0) -> None:
        self.folder = Path(folder)
        if not (self.folder / MANIFEST_NAME).is_file():
            what = "does not exist" if not self.folder.exists() else f"holds no {MANIFEST_NAME}"
            raise DatasetError("latents", f"{self.folder} {what} (expected an encode-dataset output folder)")
        try:
            manifest = read_manifest(self.folder)
        except DatasetError as exc:
            raise DatasetError("latents", exc.message.replace("use a new output folder", "encode the dataset again")) from None
        self.shards = check_shards(self.folder, manifest)
        self.latent_shape: tuple[int, int] = tuple(manifest["latent_shape"])
        self.vq_mean, self.vq_std = float(manifest["vq_mean"]), float(manifest["vq_std"])
        self.has_labels, self.has_flips = bool(manifest.get("labels")), bool(manifest.get("hflip"))
        self.classes: list[str] = list(manifest.get("classes", []))
        self.manifest = manifest
        self.flip, self.normalize, self.seed = flip, normalize, seed
        self.epoch = 0
        self._firsts = [shard.first for shard in self.shards]
        self._length = sum(shard.count for shard in self.shards)
        self._open: dict[int, object] = {}

    def __len__(self) -> int:
        return self._length

    @property
    def num_classes(self) -> int:
        """The number of class folders of the encoded images (0 without labels)."""
        return len(self.classes)

    def set_epoch(self, epoch: int) -> None:
        """The epoch of plain integer keys (for torch's DistributedSampler; DataLoader workers
        copy the dataset when an iteration starts, so set it before)."""
        self.epoch = epoch

    def flipped(self, index: int, epoch: int) -> bool:
        """Whether item `index` reads `latents_flip` in `epoch` (where the shards hold flips)."""
        return self.flip and self.has_flips and bool(mix_seed(self.seed, epoch, index) >> 31 & 1)

    def labels(self) -> torch.Tensor:
        """Every item's label, (len,) int64 (-1 without labels)."""
        if not self.has_labels:
            return torch.full((len(self),), -1, dtype=torch.int64)
        parts = []
        for shard in self.shards:
            with safe_open(str(shard.path), framework="pt") as f:
                parts.append(f.get_tensor("labels"))
        return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.int64)

    def __getitem__(self, key: int | tuple[int, int]) -> tuple[torch.Tensor, int]:
        index, epoch = key if isinstance(key, tuple) else (key, self.epoch)
        if not 0 <= index < self._length:
            raise IndexError(f"item {index} of a dataset of {self._length}")
        number = bisect.bisect_right(self._firsts, index) - 1
        row = index - self.shards[number].first
        f = self._handle(number)
        latent = f.get_slice("latents_flip" if self.flipped(index, epoch) else "latents")[row].float()
        if self.normalize:
            latent = (latent - self.vq_mean) / self.vq_std
        return latent, int(f.get_slice("labels")[row]) if self.has_labels else -1

    def _handle(self, number: int):
        f = self._open.pop(number, None)
        if f is None:
            if len(self._open) >= MAX_OPEN_SHARDS:
                self._open.pop(next(iter(self._open))).__exit__(None, None, None)  # the least recently read
            f = safe_open(str(self.shards[number].path), framework="pt")
        self._open[number] = f  # (re)inserted last: the dict's order is the reading order
        return f

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_open": {}}


class EpochStream:
    """One shuffled pass over `size` items after another: stream position p is item
    permutation(p // size)[p % size], each epoch's permutation drawn from a generator seeded by
    (seed, epoch) alone."""

    def __init__(self, size: int, seed: int = 0) -> None:
        if size < 1:
            raise ValueError(f"an epoch stream needs at least one item, got size={size}")
        self.size, self.seed = size, seed
        self._cached: tuple[int, list[int]] | None = None

    def permutation(self, epoch: int) -> list[int]:
        if self._cached is None or self._cached[0] != epoch:
            rng = torch.Generator().manual_seed(mix_seed(self.seed, epoch))
            self._cached = (epoch, torch.randperm(self.size, generator=rng).tolist())
        return self._cached[1]

    def at(self, position: int) -> tuple[int, int]:
        """(item, epoch) at a stream position."""
        epoch, offset = divmod(position, self.size)
        return self.permutation(epoch)[offset], epoch


class StreamSampler(Sampler[tuple[int, int]]):
    """One process's share of the global batches of steps [start_step, stop_step) of an
    `EpochStream`: global batch s is stream positions [s * G, (s + 1) * G), G = global_batch,
    and rank r of W takes the contiguous slice [r * G / W, (r + 1) * G / W) of it. Yields
    (item, epoch) keys (`LatentShards`); batch them by the per-rank batch or a divisor of it.

    Over the ranks, each epoch's positions hold every item once (batches run across epoch
    boundaries instead of dropping or repeating items), and which items a global batch holds
    does not depend on the number of processes."""

    def __init__(self, size: int, *, global_batch: int, rank: int = 0, world_size: int = 1, seed: int = 0,
                 start_step: int = 0, stop_step: int) -> None:
        if global_batch % world_size:
            raise ValueError(f"global_batch={global_batch} must be divisible by world_size={world_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank={rank} must lie in [0, world_size={world_size})")
        self.stream = EpochStream(size, seed)
        self.global_batch, self.rank, self.world_size = global_batch, rank, world_size
        self.start_step, self.stop_step = start_step, stop_step

    @property
    def rank_batch(self) -> int:
        return self.global_batch // self.world_size

    def __len__(self) -> int:
        return max(self.stop_step - self.start_step, 0) * self.rank_batch

    def __iter__(self) -> Iterator[tuple[int, int]]:
        for step in range(self.start_step, self.stop_step):
            first = step * self.global_batch + self.rank * self.rank_batch
            for position in range(first, first + self.rank_batch):
                yield self.stream.at(position)
