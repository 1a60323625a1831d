"""`softvq_fast.data.LatentShards` and `StreamSampler`: items, normalisation, flips, shard checks
(missing, damaged, incomplete, foreign), memory-mapped reading in DataLoader workers, every item
once per epoch over the processes."""
from __future__ import annotations

import json
import pickle
import shutil

import pytest
import torch
from support.latent_shards import write_latent_dataset
from torch.utils.data import DataLoader

from softvq_fast import data


def _dataset(out, n=10, *, flips=True, labels=True, seed=0, unreadable=(), vq_mean=0.0, vq_std=1.0):
    rng = torch.Generator().manual_seed(seed)
    latents = torch.randn(n, 3, 2, generator=rng)
    classes = torch.arange(n) % 3 if labels else None
    flipped = latents.flip(1) + 100.0 if flips else None  # far from every latent: a flip is obvious
    write_latent_dataset(out, latents, classes, flips=flipped, shard_size=4, unreadable=unreadable,
                         vq_mean=vq_mean, vq_std=vq_std)
    return latents, classes, flipped


def test_items_are_the_readable_latents_normalised_with_the_tokenizer_stats(tmp_path):
    latents, labels, _ = _dataset(tmp_path / "d", unreadable=(2, 5), vq_mean=0.25, vq_std=2.0)
    kept = [i for i in range(10) if i not in (2, 5)]
    dataset = data.LatentShards(tmp_path / "d", flip=False)
    assert len(dataset) == 8 and dataset.latent_shape == (3, 2) and dataset.num_classes == 3
    items = [dataset[i] for i in range(len(dataset))]
    # the manifest's measured latent_mean / latent_std are not what generators are trained on
    expected = (latents[kept] - 0.25) / 2.0
    assert all(x.dtype == torch.float32 and x.shape == (3, 2) for x, _ in items)
    assert torch.equal(torch.stack([x for x, _ in items]), expected)
    assert [y for _, y in items] == labels[kept].tolist() == dataset.labels().tolist()
    raw = data.LatentShards(tmp_path / "d", flip=False, normalize=False)
    assert torch.equal(raw[7][0], latents[kept[7]])
    with pytest.raises(IndexError):
        dataset[8]


def test_unlabelled_latents_read_label_minus_one(tmp_path):
    _dataset(tmp_path / "d", labels=False, flips=False)
    dataset = data.LatentShards(tmp_path / "d")
    assert dataset[3][1] == -1 and dataset.num_classes == 0 and dataset.labels().tolist() == [-1] * 10


def test_flips_half_the_time_by_epoch_and_item_alone(tmp_path):
    n = 200
    latents = torch.randn(n, 1, 2)
    write_latent_dataset(tmp_path / "d", latents, flips=latents + 100.0, shard_size=64)
    dataset = data.LatentShards(tmp_path / "d", seed=3)
    before = torch.get_rng_state()
    flipped = {epoch: [bool(dataset[(i, epoch)][0].mean() > 50) for i in range(n)] for epoch in (0, 1)}
    assert torch.equal(torch.get_rng_state(), before)  # no global generator involved
    for epoch, flags in flipped.items():
        assert abs(sum(flags) - n / 2) < 4 * (n / 4) ** 0.5, (epoch, sum(flags))  # Binomial(200, 1/2): 4 sigma
        assert flags == [dataset.flipped(i, epoch) for i in range(n)]
    changed = sum(a != b for a, b in zip(flipped[0], flipped[1]))
    assert abs(changed - n / 2) < 4 * (n / 4) ** 0.5  # the next epoch draws again
    again = data.LatentShards(tmp_path / "d", seed=3)
    again.set_epoch(1)
    assert [bool(again[i][0].mean() > 50) for i in range(n)] == flipped[1]  # a rerun reads the same
    other_seed = data.LatentShards(tmp_path / "d", seed=4)
    assert [other_seed.flipped(i, 0) for i in range(n)] != flipped[0]
    assert not any(data.LatentShards(tmp_path / "d", flip=False, seed=3).flipped(i, 0) for i in range(n))


def _foreign_shard(folder, tmp_path):
    """shard-00001 of another run with the same settings, names and rows (other latents)."""
    _dataset(tmp_path / "other", seed=1)
    shutil.copy(tmp_path / "other" / "shard-00001.safetensors", folder / "shard-00001.safetensors")


def _truncate(folder, tmp_path):
    path = folder / "shard-00001.safetensors"
    path.write_bytes(path.read_bytes()[:-40])


def _without_flips(folder, tmp_path):
    _dataset(tmp_path / "other", flips=False)
    shutil.copy(tmp_path / "other" / "shard-00001.safetensors", folder / "shard-00001.safetensors")


def _other_tokenizer(folder, tmp_path):
    _dataset(tmp_path / "other", vq_std=3.0)
    shutil.copy(tmp_path / "other" / "shard-00001.safetensors", folder / "shard-00001.safetensors")


def _shifted_rows(folder, tmp_path):
    shutil.copy(folder / "shard-00000.safetensors", folder / "shard-00001.safetensors")


@pytest.mark.parametrize("damage, expected", [
    (lambda folder, tmp_path: (folder / "shard-00001.safetensors").unlink(), "shard-00001.safetensors: missing"),
    (_truncate, "shard-00001.safetensors: damaged"),
    (_foreign_shard, "shard-00001.safetensors: foreign: its latent statistics differ"),
    (_without_flips, "shard-00001.safetensors: incomplete or foreign: no latents_flip"),
    (_other_tokenizer, "shard-00001.safetensors: foreign: made with vq_std 3.0"),
    (_shifted_rows, "shard-00001.safetensors: foreign: its latent statistics"),
], ids=["missing", "truncated", "other-run", "no-flips", "other-tokenizer", "other-rows"])
def test_a_bad_shard_is_named_before_any_item_is_read(tmp_path, damage, expected):
    folder = tmp_path / "d"
    _dataset(folder)
    damage(folder, tmp_path)
    with pytest.raises(data.DatasetError, match="^latents: .*" + expected) as error:
        data.LatentShards(folder)
    assert error.value.argument == "latents"


def test_folders_without_fingerprints_still_check_rows(tmp_path):
    """A manifest written before shard_fingerprints existed loads; a shard holding other rows is
    still found (by its indices)."""
    folder = tmp_path / "d"
    _dataset(folder)
    manifest = json.loads((folder / data.MANIFEST_NAME).read_text())
    del manifest["shard_fingerprints"]
    (folder / data.MANIFEST_NAME).write_text(json.dumps(manifest))
    assert len(data.LatentShards(folder)) == 10
    _shifted_rows(folder, tmp_path)
    with pytest.raises(data.DatasetError, match=r"shard-00001.safetensors: foreign: its rows are not the images \[4, 8\)"):
        data.LatentShards(folder)


@pytest.mark.parametrize("make, expected", [
    (lambda folder: None, "does not exist"),
    (lambda folder: folder.mkdir(), "holds no manifest.json"),
    (lambda folder: (folder.mkdir(), (folder / "manifest.json").write_text("{")), "cannot be read"),
    (lambda folder: (folder.mkdir(), (folder / "manifest.json").write_text('{"complete": false}')), "unfinished"),
])
def test_a_folder_that_is_no_finished_dataset_is_refused(tmp_path, make, expected):
    make(tmp_path / "d")
    with pytest.raises(data.DatasetError, match=expected):
        data.LatentShards(tmp_path / "d")


def test_stream_sampler_gives_each_process_its_part_and_every_item_once_per_epoch():
    size, global_batch, steps = 10, 4, 5  # 20 positions: two epochs, a batch across their boundary
    ranks = [list(data.StreamSampler(size, global_batch=global_batch, rank=r, world_size=2, seed=7, stop_step=steps))
             for r in range(2)]
    assert all(len(keys) == steps * 2 for keys in ranks)
    # the global batch of step s is rank 0's 2 items then rank 1's: the one-process stream
    merged = [key for s in range(steps) for r in range(2) for key in ranks[r][2 * s: 2 * s + 2]]
    assert merged == list(data.StreamSampler(size, global_batch=global_batch, seed=7, stop_step=steps))
    epochs = [[index for index, epoch in merged if epoch == e] for e in (0, 1)]
    assert [sorted(items) for items in epochs] == [list(range(size))] * 2  # every item once per epoch
    assert epochs[0] != epochs[1] and epochs[0] != list(range(size))  # shuffled, again each epoch
    resumed = list(data.StreamSampler(size, global_batch=global_batch, rank=1, world_size=2, seed=7, start_step=3,
                                      stop_step=steps))
    assert resumed == ranks[1][6:]
    other = list(data.StreamSampler(size, global_batch=global_batch, seed=8, stop_step=steps))
    assert other != merged
    with pytest.raises(ValueError, match="divisible"):
        data.StreamSampler(size, global_batch=5, world_size=2, stop_step=1)


def test_dataloader_workers_read_the_shards_themselves(tmp_path, monkeypatch):
    _dataset(tmp_path / "d")
    monkeypatch.setattr(data, "MAX_OPEN_SHARDS", 2)
    dataset = data.LatentShards(tmp_path / "d", seed=1)
    sampler = data.StreamSampler(len(dataset), global_batch=4, seed=1, stop_step=5)
    inline = [dataset[key] for key in sampler]
    assert len(dataset._open) == 2  # at most MAX_OPEN_SHARDS handles, here of 3 shards
    copy = pickle.loads(pickle.dumps(dataset))  # what a spawned worker gets: no open file
    assert copy._open == {} and torch.equal(copy[(3, 1)][0], dataset[(3, 1)][0])
    loader = DataLoader(dataset, batch_size=4, sampler=sampler, num_workers=1)
    batches = list(loader)
    assert torch.equal(torch.cat([x for x, _ in batches]), torch.stack([x for x, _ in inline]))
    assert torch.cat([y for _, y in batches]).tolist() == [y for _, y in inline]
