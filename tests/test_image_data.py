"""Image folders for tokenizer training: the authors' random resized crop and flip rebuilt here
from their definition, reproducibility per (seed, epoch, image), unreadable images skipped,
named and counted through DataLoader workers and a distributed sampler."""
from __future__ import annotations

import logging
import math

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader, DistributedSampler

from softvq_fast.data import DatasetError, mix_seed
from softvq_fast.training.image_data import (
    ImageBatch,
    SkippedImage,
    SkippedImages,
    TrainingImageFolder,
    collate_images,
    shorter_side_range,
)
from support.tokenizer_files import write_png16

SIZE = 32


def _write(path, width: int, height: int, seed: int) -> np.ndarray:
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)
    return pixels


def _authors_view(pixels: np.ndarray, size: int, seed: int, epoch: int, index: int) -> torch.Tensor:
    """The authors' random_crop_arr + RandomHorizontalFlip + ToTensor + Normalize(0.5, 0.5),
    written from their definition with the draws taken in the documented order."""
    generator = torch.Generator().manual_seed(mix_seed(seed, epoch, index))
    draw = lambda low, high: int(torch.randint(low, high + 1, (), generator=generator))  # noqa: E731
    side = draw(math.ceil(size / 1.0), math.ceil(size / 0.8))
    image = Image.fromarray(pixels)
    while min(image.size) >= 2 * side:
        image = image.resize((image.width // 2, image.height // 2), resample=Image.Resampling.BOX)
    scale = side / min(image.size)
    image = image.resize((round(image.width * scale), round(image.height * scale)), resample=Image.Resampling.BICUBIC)
    array = np.asarray(image)
    top = draw(0, array.shape[0] - size)
    left = draw(0, array.shape[1] - size)
    array = array[top:top + size, left:left + size]
    if torch.rand((), generator=generator) < 0.5:
        array = array[:, ::-1]
    return torch.from_numpy(array.copy()).permute(2, 0, 1).float() / 255 * 2 - 1


def test_views_are_the_authors_random_resized_crop_and_flip(tmp_path, seed):
    # A wide image, a tall one, and one large enough for the box-filter halving.
    shapes = {"wide.png": (97, 61), "tall.png": (40, 71), "large.png": (230, 171)}
    pixels = {name: _write(tmp_path / name, w, h, seed + i) for i, (name, (w, h)) in enumerate(shapes.items())}
    dataset = TrainingImageFolder(tmp_path, SIZE, seed=seed)
    assert dataset.files == sorted(shapes) and dataset.labels is None
    flips = set()
    for index, name in enumerate(dataset.files):
        for epoch in range(4):
            item_index, view, label = dataset[index, epoch]
            expected = _authors_view(pixels[name], SIZE, seed, epoch, index)
            assert (item_index, label) == (index, -1) and view.shape == (3, SIZE, SIZE)
            assert torch.allclose(view, expected, atol=1e-6), (name, epoch)
            flips.add(bool(torch.rand((), generator=_after_crop_draws(seed, epoch, index)) < 0.5))
    assert flips == {True, False}
    assert shorter_side_range(256) == (256, 320) and shorter_side_range(512) == (512, 640)


def _after_crop_draws(seed: int, epoch: int, index: int) -> torch.Generator:
    generator = torch.Generator().manual_seed(mix_seed(seed, epoch, index))
    for _ in range(3):
        torch.randint(0, 2, (), generator=generator)
    return generator


def test_items_depend_on_seed_epoch_and_index_alone(tmp_path, seed):
    for klass, count in (("cats", 2), ("dogs", 1)):
        for i in range(count):
            _write(tmp_path / klass / f"{i}.png", 50, 44, seed + i)
    dataset = TrainingImageFolder(tmp_path, SIZE, seed=seed)
    assert dataset.classes == ["cats", "dogs"] and dataset.labels == [0, 0, 1]
    first = dataset[2, 3]
    assert torch.equal(first[1], dataset[2, 3][1]) and first[2] == 1
    dataset.set_epoch(3)
    assert torch.equal(dataset[2][1], first[1])
    assert not torch.equal(dataset[2, 4][1], first[1])
    assert not torch.equal(TrainingImageFolder(tmp_path, SIZE, seed=seed + 1)[2, 3][1], first[1])
    unflipped = TrainingImageFolder(tmp_path, SIZE, seed=seed, flip=False)
    for epoch in range(6):
        flipped = bool(torch.rand((), generator=_after_crop_draws(seed, epoch, 0)) < 0.5)
        view = dataset[0, epoch][1]
        assert torch.equal(unflipped[0, epoch][1], view.flip(-1) if flipped else view)
        assert view.min() >= -1 and view.max() <= 1
    with pytest.raises(IndexError, match="item 3 of an image folder of 3"):
        dataset[3]


def test_a_missing_folder_or_a_file_is_named(tmp_path):
    with pytest.raises(DatasetError, match=f"images: {tmp_path / 'absent'} does not exist"):
        TrainingImageFolder(tmp_path / "absent", SIZE)
    _write(tmp_path / "one.png", 40, 36, 0)
    with pytest.raises(DatasetError, match=f"images: {tmp_path / 'one.png'} is not a folder"):
        TrainingImageFolder(tmp_path / "one.png", SIZE)


def test_sixteen_bit_images_are_scaled_not_clipped(tmp_path):
    write_png16(tmp_path / "gray16.png", np.full((40, 36), 32896, dtype=np.uint16))  # 128 in 8 bits
    _, view, _ = TrainingImageFolder(tmp_path, SIZE)[0]
    assert torch.allclose(view, torch.full_like(view, 128 / 127.5 - 1), atol=1e-6)


def test_unreadable_images_are_skipped_named_and_counted(tmp_path, seed, caplog):
    for i in range(7):
        _write(tmp_path / f"{i}.png", 40, 36, seed + i)
    (tmp_path / "3.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    data = (tmp_path / "5.png").read_bytes()
    (tmp_path / "5.png").write_bytes(data[: len(data) // 2])  # truncated
    dataset = TrainingImageFolder(tmp_path, SIZE, seed=seed)
    skipped = dataset[3]
    assert isinstance(skipped, SkippedImage) and skipped.index == 3 and skipped.path.endswith("3.png")

    seen, counter = [], SkippedImages()
    for rank in range(2):
        sampler = DistributedSampler(dataset, num_replicas=2, rank=rank, shuffle=True, seed=seed)
        loader = DataLoader(dataset, batch_size=2, sampler=sampler, num_workers=2, collate_fn=collate_images)
        with caplog.at_level(logging.WARNING, logger="softvq_fast.training.image_data"):
            for batch in loader:
                assert isinstance(batch, ImageBatch) and batch.images.shape[1:] == (3, SIZE, SIZE)
                assert len(batch.images) == len(batch.labels) == len(batch.indices) == 2 - len(batch.skipped)
                counter.record(batch)
                seen += batch.indices.tolist() + [item.index for item in batch.skipped]
    # DistributedSampler pads 7 items to 8: one index is read twice.
    assert set(seen) == set(range(7)) and len(seen) == 8
    assert counter.count == sum(seen.count(i) for i in (3, 5))
    assert sum("3.png: skipped, cannot be read" in r.getMessage() for r in caplog.records) == seen.count(3)
    assert any("5.png: skipped" in r.getMessage() for r in caplog.records)
    restored = SkippedImages()
    restored.load_state_dict(counter.state_dict())
    assert restored.count == counter.count

    empty = collate_images([skipped])
    assert empty.images.shape == (0, 3, 0, 0) and empty.skipped == [skipped]
