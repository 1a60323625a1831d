"""Class-conditional samples at evaluation scale: N images of balanced classes, sampled in parts of
`batch` images by one process or by the ranks of a torchrun, kept on disk as each part finishes
and assembled into one .npz in the ADM suite's layout (`softvq_fast.evaluation.npz`).

Determinism: image i's label and starting noise depend only on the seed and i (the noise is
drawn on the CPU from a generator of its own, so it is the same on every device); part k, the
images [k * batch, (k + 1) * batch), draws the stochastic samplers' (sde, ddpm) per-step noise
from a generator seeded by the seed and k. Rank r of W processes takes the parts r, r + W, ...,
so any number of processes writes the same file for the same settings (bit for bit on the CPU
at the same thread count; on GPUs up to the kernels' own run-to-run differences).

Resuming: the parts live in "<out>.parts/" (settings.json and part-000000.npy, ... each (b, H, W,
3) uint8, written under a temporary name and renamed when complete). A rerun with the same
settings samples only the missing parts; one with other settings is refused, naming them.
The folder is deleted once <out> is written.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

from softvq_fast.data import ShardPlan
from softvq_fast.evaluation.npz import write_npz_images
from softvq_fast.generation import (GENERATION_DTYPES, _device, check_pair, check_sampling_arguments, generate,
                                    resolve_sampler)
from softvq_fast.models import fields
from softvq_fast.models.adaln_transformer import AdaLNTransformer
from softvq_fast.models.config import SoftVQConfig
from softvq_fast.models.fields import FieldError

# "balanced": image i has class i mod C, so the first N images hold every class floor(N / C) or
# ceil(N / C) times. "uniform": each image's class drawn uniformly, as the authors' sampling
# script draws them (torch.randint per batch there, per image seed here).
LABEL_MODES = ("balanced", "uniform")
PARTS_SUFFIX = ".parts"
SETTINGS_NAME = "settings.json"
# Independent random streams of one seed: SeedSequence([stream, seed, index]).
_NOISE_STREAM, _LABEL_STREAM, _STEP_STREAM = 0, 1, 2


class SamplingError(ValueError):
    """An output (`out` or its parts folder) that this run cannot write or continue."""


def _stream_seed(stream: int, seed: int, index: int) -> int:
    """A 63-bit seed that depends on the stream, the seed and the index only."""
    return int(np.random.SeedSequence([stream, seed, index]).generate_state(1, np.uint64)[0] >> np.uint64(1))


def class_labels(indices: range, num_classes: int, mode: str = "balanced", seed: int = 0) -> torch.Tensor:
    """The labels (len(indices),) int64 of the images `indices` (see LABEL_MODES)."""
    if mode == "balanced":
        return torch.tensor([i % num_classes for i in indices], dtype=torch.int64)
    return torch.tensor([_stream_seed(_LABEL_STREAM, seed, i) % num_classes for i in indices], dtype=torch.int64)


def initial_noise(indices: range, latent_shape: Sequence[int], seed: int) -> torch.Tensor:
    """Starting noise (len(indices), *latent_shape) float32 on the CPU, image i's from its own seed."""
    seeds = (_stream_seed(_NOISE_STREAM, seed, i) for i in indices)
    return torch.stack([torch.randn(tuple(latent_shape), generator=torch.Generator().manual_seed(s)) for s in seeds])


def part_seed(seed: int, part: int) -> int:
    """The seed of part `part`'s per-step sampler noise."""
    return _stream_seed(_STEP_STREAM, seed, part)


def to_uint8_images(images: torch.Tensor) -> np.ndarray:
    """(B, 3, H, W) in [-1, 1] -> (B, H, W, 3) uint8, as the authors' sampling scripts convert:
    255 * (x + 1) / 2 clamped to [0, 255] and truncated."""
    pixels = (255.0 * ((images.float().clamp(-1.0, 1.0) + 1.0) / 2.0)).clamp(0.0, 255.0)
    return pixels.permute(0, 2, 3, 1).to("cpu", torch.uint8).numpy()


def weights_sha256(module: torch.nn.Module) -> str:
    """Hex sha256 of a module's state (names, dtypes, shapes and bytes, in name order)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        flat = tensor.detach().to("cpu").contiguous().reshape(-1)
        digest.update(f"{name} {flat.dtype} {tuple(tensor.shape)}\n".encode())
        digest.update(flat.view(torch.uint8).numpy())
    return digest.hexdigest()


def sampling_settings(
    tokenizer_config: SoftVQConfig, generator: AdaLNTransformer, *, num: int, batch: int, labels: str, seed: int,
    sampler: str | None, steps: int, cfg_scale: float, guidance_interval: tuple[float, float], path: str | None,
    dtype: torch.dtype, device: torch.device,
) -> dict:
    """What a resumed run must share with the run that started the folder, the models' weights
    aside (`sample_to_npz` adds their hashes). `generator` may be the meta-device skeleton of
    `AdaLNTransformer.from_config`: only its configuration is read."""
    sampler, path = resolve_sampler(generator, sampler, path)
    return {
        "num": num, "batch": batch, "labels": labels, "num_classes": generator.y_embedder.num_classes, "seed": seed,
        "generator_family": type(generator).__name__, "sampler": sampler, "steps": steps, "cfg_scale": float(cfg_scale),
        "guidance_interval": [float(guidance_interval[0]), float(guidance_interval[1])], "path": path,
        "dtype": str(dtype).removeprefix("torch."), "device": torch.device(device).type,
        "image_size": tokenizer_config.image_size,
    }


def parts_folder(out: str | Path) -> Path:
    out = Path(out)
    return out.with_name(out.name + PARTS_SUFFIX)


def _part_path(parts: Path, part: int) -> Path:
    return parts / f"part-{part:06d}.npy"


def _describe_change(key: str, old, new) -> str:
    if key.endswith("_sha256"):
        return f"{key}: the {key.removesuffix('_sha256')}'s weights differ"
    return f"{key}: {old!r} -> {new!r}"


def check_started_run(out: str | Path, settings: dict) -> None:
    """SamplingError unless `out` is free to write and its parts folder, if a run started it,
    was started with the same values of every key of `settings` (keys it lacks are not compared:
    the command checks the arguments before loading the models, the weights after)."""
    out = Path(out)
    parts = parts_folder(out)
    if out.exists():
        raise SamplingError(f"{out} exists; delete it or choose another output to sample again")
    if not parts.exists():
        return
    if not parts.is_dir():
        raise SamplingError(f"{parts} (where the finished parts are kept) exists and is not a folder")
    path = parts / SETTINGS_NAME
    if not path.exists():
        if any(parts.glob("part-*.npy")):
            raise SamplingError(f"{parts} holds parts but no {SETTINGS_NAME}; delete the folder to start again")
        return
    try:
        previous = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise SamplingError(f"{path} cannot be read ({exc}); delete {parts} to start again") from exc
    changes = [_describe_change(key, previous.get(key), value) for key, value in settings.items()
               if previous.get(key) != value]
    if changes:
        raise SamplingError(f"{parts} holds the parts of a run with other settings ({'; '.join(changes)}); use the "
                            f"same settings to continue it, or delete it (or choose another output) to start again")


def _start_or_continue(out: Path, settings: dict) -> None:
    """Rank 0's step before any process writes: check, then create the parts folder and its
    settings. (What a killed process left half-written there, under a temporary name, is never
    read and goes with the folder.)"""
    check_started_run(out, settings)
    parts = parts_folder(out)
    try:
        parts.mkdir(exist_ok=True)
    except OSError as exc:
        raise SamplingError(f"cannot create the folder {parts} ({exc.strerror or exc})") from exc
    path = parts / SETTINGS_NAME
    if not path.exists():
        partial = path.with_name(path.name + ".partial")
        partial.write_text(json.dumps(settings, indent=1) + "\n")
        os.replace(partial, path)


def _part_done(path: Path, shape: tuple[int, ...]) -> bool:
    """True when the part file exists and holds `shape` uint8 (a rename is atomic, so a part is
    complete or absent; the read guards against outside damage)."""
    try:
        array = np.load(path, mmap_mode="r")
    except (OSError, ValueError):
        return False
    return array.shape == shape and array.dtype == np.uint8


def _write_part(path: Path, images: np.ndarray, tag: str) -> None:
    temporary = path.with_name(f"{path.name}.tmp-{tag}")
    with open(temporary, "wb") as f:
        np.save(f, images, allow_pickle=False)
    os.replace(temporary, path)


def _rank_and_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _rank0_outcome(message: str | None, world: int) -> str | None:
    """Rank 0's error message (or None), on every rank: all fail alike instead of waiting."""
    if world == 1:
        return message
    box = [message]
    dist.broadcast_object_list(box, src=0)
    return box[0]


@dataclass(frozen=True)
class SamplingResult:
    """`out` as written; `parts` in all, `resumed` of them this process found finished on disk."""

    out: Path
    num: int
    parts: int
    resumed: int


def sample_to_npz(
    tokenizer,
    generator: AdaLNTransformer,
    out: str | Path,
    *,
    num: int,
    batch: int = 64,
    labels: str = "balanced",
    seed: int = 0,
    sampler: str | None = None,
    steps: int = 50,
    cfg_scale: float = 1.0,
    guidance_interval: tuple[float, float] = (0.0, 1.0),
    path: str | None = None,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    cuda_graph: bool | None = None,
    progress: bool = False,
) -> SamplingResult:
    """Sample `num` images with `generate` (arguments as there) and write them to `out`, an .npz
    with `arr_0` (num, H, W, 3) uint8 and `arr_1` (num,) int64 labels, image i at row i.

    `labels`: "balanced" (image i has class i mod num_classes) or "uniform". `batch` images are
    sampled at a time; each batch is a part kept on disk, so a rerun continues an interrupted run
    (see the module docstring). Under torch.distributed (initialised by the caller, e.g. under
    torchrun) every rank calls this with the same arguments, each with its own device; each
    samples its share of the parts and rank 0 writes `out`. The ranks meet at two barriers, after
    the sampling and after the writing: give the process group a timeout longer than the ranks'
    lag (the command uses gloo with a 7-day one; NCCL's default is 10 minutes). Arguments are checked before any
    work (ValueError naming them); SamplingError when `out` exists or its parts folder holds a
    run with other settings."""
    out = Path(out)
    fields.integer("num", num)
    fields.integer("batch", batch)
    fields.text("labels", labels, LABEL_MODES)
    check_pair(tokenizer.config, generator)
    check_sampling_arguments(generator, sampler=sampler, steps=steps, cfg_scale=cfg_scale,
                             guidance_interval=guidance_interval, path=path, seed=seed, cuda_graph=cuda_graph)
    parameter = next(generator.parameters())
    device = _device(device) if device is not None else parameter.device
    dtype = dtype or parameter.dtype
    if dtype not in GENERATION_DTYPES:
        raise FieldError("dtype", f"dtype must be one of {', '.join(map(str, GENERATION_DTYPES))} or None, "
                                  f"got {dtype!r}")
    rank, world = _rank_and_world()
    settings = sampling_settings(tokenizer.config, generator, num=num, batch=batch, labels=labels, seed=seed,
                                 sampler=sampler, steps=steps, cfg_scale=cfg_scale, guidance_interval=guidance_interval,
                                 path=path, dtype=dtype, device=device)
    failure = None
    if rank == 0:
        settings.update(tokenizer_sha256=weights_sha256(tokenizer), generator_sha256=weights_sha256(generator))
        try:
            _start_or_continue(out, settings)
        except SamplingError as exc:
            failure = str(exc)
    failure = _rank0_outcome(failure, world)
    if failure is not None:
        raise SamplingError(failure)

    plan = ShardPlan(num, batch)
    parts = parts_folder(out)
    size = tokenizer.config.image_size
    num_classes = generator.y_embedder.num_classes

    def shape(part: int) -> tuple[int, ...]:
        start, stop = plan.bounds(part)
        return (stop - start, size, size, 3)

    owned = plan.owned(rank, world)
    pending = [part for part in owned if not _part_done(_part_path(parts, part), shape(part))]
    todo = sum(shape(part)[0] for part in pending)
    with tqdm(total=todo, unit="img", disable=not progress or rank != 0, desc=f"sampling (rank 0 of {world})") as bar:
        for part in pending:
            indices = range(*plan.bounds(part))
            images = generate(
                tokenizer, generator, class_labels(indices, num_classes, labels, seed), sampler=sampler, steps=steps,
                cfg_scale=cfg_scale, guidance_interval=guidance_interval, path=path, seed=part_seed(seed, part),
                noise=initial_noise(indices, generator.latent_shape, seed), device=device, dtype=dtype,
                cuda_graph=cuda_graph,
            )
            _write_part(_part_path(parts, part), to_uint8_images(images), tag=f"{rank}-{os.getpid()}")
            bar.update(len(indices))
    if world > 1:
        dist.barrier()
    if rank == 0:
        finished = (np.load(_part_path(parts, part)) for part in range(plan.num_shards))
        write_npz_images(out, finished, (num, size, size, 3), labels=class_labels(range(num), num_classes, labels,
                                                                                  seed).numpy())
        shutil.rmtree(parts)
    if world > 1:
        dist.barrier()
    return SamplingResult(out, num, plan.num_shards, len(owned) - len(pending))
