"""Image batches in the layout of the ADM evaluation suite (guided-diffusion's evaluations/):
an .npz whose `arr_0` holds N x H x W x 3 uint8 images (and, for class-conditional samples,
`arr_1` their N int64 labels). Read and written a batch at a time, never whole: 50,000 images of
256 px are 9.8 GB."""
from __future__ import annotations

import os
import zipfile
from pathlib import Path
from typing import IO, Iterable, Iterator

import numpy as np
from numpy.lib import format as npy

IMAGES_KEY = "arr_0"
LABELS_KEY = "arr_1"
_HEADER_READERS = {(1, 0): npy.read_array_header_1_0, (2, 0): npy.read_array_header_2_0}


class NpzError(ValueError):
    """A file that is not the .npz expected; the message names it."""


def npz_keys(path: str | Path) -> list[str]:
    """The array names in an .npz (without ".npy"); NpzError naming the file when it is missing
    or not an .npz (a zip of .npy files)."""
    path = Path(path)
    if not path.is_file():
        raise NpzError(f"{path}: {'is a folder' if path.is_dir() else 'not found'}")
    try:
        with zipfile.ZipFile(path) as archive:
            return [name[: -len(".npy")] for name in archive.namelist() if name.endswith(".npy")]
    except (zipfile.BadZipFile, OSError) as exc:
        raise NpzError(f"{path}: not an .npz file ({exc})") from exc


def _read_header(stream: IO[bytes], where: str) -> tuple[tuple[int, ...], bool, np.dtype]:
    try:
        version = npy.read_magic(stream)
        reader = _HEADER_READERS.get(version)
        if reader is None:
            raise ValueError(f"unsupported .npy format version {version}")
        return reader(stream)
    except ValueError as exc:
        raise NpzError(f"{where}: not a readable .npy array ({exc})") from exc


class NpzImages:
    """The `arr_0` images of an .npz, checked on opening: NpzError naming the file unless they are
    (N, H, W, 3) uint8 in C order with N >= `min_count`. `batches(size)` streams them."""

    def __init__(self, path: str | Path, *, min_count: int = 1) -> None:
        self.path = Path(path)
        keys = npz_keys(self.path)
        if IMAGES_KEY not in keys:
            raise NpzError(f"{self.path}: no {IMAGES_KEY} image array (it holds {', '.join(keys) or 'no arrays'})")
        with self._open() as stream:
            shape, fortran_order, dtype = _read_header(stream, f"{self.path} ({IMAGES_KEY})")
        if len(shape) != 4 or shape[3] != 3 or dtype != np.uint8 or fortran_order:
            order = ", Fortran order" if fortran_order else ""
            raise NpzError(f"{self.path}: {IMAGES_KEY} must be images (N, H, W, 3) uint8 as the ADM suite reads "
                           f"them, got {shape} {dtype}{order}")
        if shape[0] < min_count or min(shape[1:3]) < 1:
            raise NpzError(f"{self.path}: {IMAGES_KEY} holds {shape[0]} images of {shape[1]} x {shape[2]}; "
                           f"at least {min_count} non-empty images are needed")
        self.shape: tuple[int, int, int, int] = shape

    def __len__(self) -> int:
        return self.shape[0]

    def _open(self) -> IO[bytes]:
        archive = zipfile.ZipFile(self.path)
        stream = archive.open(IMAGES_KEY + ".npy")
        archive.close()  # the open member keeps the file open until it is closed itself
        return stream

    def batches(self, size: int) -> Iterator[np.ndarray]:
        """(b, H, W, 3) uint8 arrays of `size` images (the last one shorter), in file order."""
        image_bytes = int(np.prod(self.shape[1:]))
        with self._open() as stream:
            _read_header(stream, str(self.path))
            for start in range(0, len(self), size):
                count = min(size, len(self) - start)
                data = stream.read(count * image_bytes)
                if len(data) != count * image_bytes:
                    raise NpzError(f"{self.path}: {IMAGES_KEY} ends after {start + len(data) // image_bytes} of "
                                   f"its {len(self)} images (a truncated file)")
                yield np.frombuffer(bytearray(data), dtype=np.uint8).reshape(count, *self.shape[1:])


def _member(key: str) -> zipfile.ZipInfo:
    """A stored zip member with a fixed timestamp: the same arrays give the same file bytes."""
    return zipfile.ZipInfo(key + ".npy", date_time=(1980, 1, 1, 0, 0, 0))


def write_npz_images(path: str | Path, batches: Iterable[np.ndarray], shape: tuple[int, int, int, int],
                     labels: np.ndarray | None = None) -> None:
    """Write `batches` of (b, H, W, 3) uint8 images, `shape` (N, H, W, 3) in all, as `arr_0` (and
    `labels` (N,) as `arr_1`) of an uncompressed .npz that np.load and the ADM suite read. Written
    beside `path` under a temporary name and renamed when complete (a killed run leaves no half
    file under `path`); the same images give the same bytes. ValueError when the batches do not
    add up to `shape`."""
    path = Path(path)
    partial = path.with_name(path.name + ".partial")
    header = {"descr": npy.dtype_to_descr(np.dtype(np.uint8)), "fortran_order": False, "shape": tuple(shape)}
    try:
        with zipfile.ZipFile(partial, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as archive:
            with archive.open(_member(IMAGES_KEY), "w", force_zip64=True) as stream:
                npy.write_array_header_1_0(stream, header)
                written = 0
                for batch in batches:
                    fits = batch.dtype == np.uint8 and batch.shape[1:] == tuple(shape[1:])
                    if not fits or written + len(batch) > shape[0]:
                        raise ValueError(f"a batch of {batch.shape} {batch.dtype} does not continue images {shape} "
                                         f"uint8 after {written} of them")
                    stream.write(np.ascontiguousarray(batch).data)
                    written += len(batch)
                if written != shape[0]:
                    raise ValueError(f"the batches hold {written} images, not {shape[0]}")
            if labels is not None:
                with archive.open(_member(LABELS_KEY), "w") as stream:
                    npy.write_array(stream, np.asarray(labels, dtype=np.int64), allow_pickle=False)
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)
