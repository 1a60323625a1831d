"""Latent datasets written through encode-dataset's own writer (softvq_fast.data: prepare_output,
encode_shards, finish_manifest) from latents made up by a test."""
from __future__ import annotations

from pathlib import Path

import torch

from softvq_fast import data


def write_latent_dataset(
    out: Path, latents: torch.Tensor, labels: torch.Tensor | None = None, *, flips: torch.Tensor | None = None,
    shard_size: int = 4, unreadable: tuple[int, ...] = (), vq_mean: float = 0.0, vq_std: float = 1.0,
) -> dict:
    """Shards of `latents` (n, T, D) as `encode-dataset` writes them (labels (n,) with classes
    "class-0".. "class-{max}", `flips` (n, T, D) as latents_flip); `unreadable` dataset positions
    are left out as images that could not be read. Returns the manifest."""
    n = latents.shape[0]
    files = [f"image-{i:05d}.png" for i in range(n)]
    plan = data.ShardPlan(n, shard_size)
    classes = [f"class-{c}" for c in range(int(labels.max()) + 1)] if labels is not None else []
    settings = {"model": "synthetic", "images": "synthetic", "model_sha256": {"config.json": "0"}, "image_size": 0,
                "hflip": flips is not None, "shard_size": shard_size, "num_images": n, "labels": labels is not None,
                "classes": classes, "latent_shape": list(latents.shape[1:]), "vq_mean": vq_mean, "vq_std": vq_std,
                "normalized": False, "bf16": False}
    data.prepare_output(out, settings, files, [(0, 0)] * n, plan)
    # "images" carry the latents and their flips in a last axis of 2; encode-dataset's flip of the
    # images (flip(-1)) then swaps them, so encode() of the flipped "images" gives the flips.
    pairs = torch.stack([latents, flips if flips is not None else latents], dim=-1)

    def batches():
        for shard in range(plan.num_shards):
            start, stop = plan.bounds(shard)
            indices = torch.arange(start, stop)
            errors = ["unreadable" if int(i) in unreadable else "" for i in indices]
            shard_labels = labels[start:stop] if labels is not None else torch.full((stop - start,), -1)
            yield indices, pairs[start:stop], shard_labels, errors

    metadata = {"vq_mean": repr(vq_mean), "vq_std": repr(vq_std)}
    data.encode_shards(lambda images: images[..., 0].clone(), batches(), plan, out, hflip=flips is not None,
                       with_labels=labels is not None, metadata=metadata, tag="test")
    return data.finish_manifest(out, plan, files)


def gaussian_classes(num_classes: int, per_class: int, shape: tuple[int, int], *, spread: float, scale: float,
                     seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A dataset with a known distribution per class: class c is N(means[c], scale^2) per element,
    means[c] ~ N(0, spread^2) per element. Returns (latents (n, T, D), labels (n,), means (C, T, D))."""
    rng = torch.Generator().manual_seed(seed)
    means = spread * torch.randn(num_classes, *shape, generator=rng)
    labels = torch.arange(num_classes).repeat_interleave(per_class)
    latents = means[labels] + scale * torch.randn(len(labels), *shape, generator=rng)
    order = torch.randperm(len(labels), generator=rng)
    return latents[order], labels[order], means
