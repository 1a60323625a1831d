"""`softvq-fast encode-dataset`: encode an image folder into sharded latent files (resumable,
parallel loading, multi-GPU / multi-node under torchrun)."""
from __future__ import annotations

import argparse
import os
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader
from tqdm import tqdm

from softvq_fast import data


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "encode-dataset",
        help="encode an image folder to sharded safetensors latents",
        description="Centre-crop and resize every image under --images, encode it with the tokenizer in "
        "--model and write shards of latents to --out with a manifest.json. Rerunning skips finished "
        "shards. Under torchrun each process takes every WORLD_SIZE-th shard.",
    )
    parser.add_argument("--model", required=True, type=Path, help="tokenizer folder (config.json + model.safetensors)")
    parser.add_argument("--images", required=True, type=Path, help="folder of images (class subfolders give labels)")
    parser.add_argument("--out", required=True, type=Path, help="output folder")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--shard-size", type=int, default=1024, help="images per shard file")
    parser.add_argument("--hflip", action="store_true", help="also store latents of the horizontally flipped images")
    parser.add_argument("--num-workers", type=int, default=min(8, os.cpu_count() or 1), help="DataLoader worker processes")
    parser.add_argument("--device", default=None, help="default: this process's GPU (LOCAL_RANK) if there is one, else cpu")
    parser.add_argument("--bf16", action="store_true", help="run the encoder under bf16 autocast")
    parser.set_defaults(func=run)


# The ranks only meet at barriers (they exchange no tensors): gloo, on the CPU, with a timeout
# long enough for a rank that finishes its shards hours before the slowest one (NCCL's watchdog
# would end it after 10 minutes).
BARRIER_TIMEOUT = timedelta(days=7)


def _distributed() -> tuple[int, int, int]:
    """(rank, world size, local rank); joins the process group when started by torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1, 0
    dist.init_process_group(backend="gloo", timeout=BARRIER_TIMEOUT)
    return dist.get_rank(), world, int(os.environ.get("LOCAL_RANK", "0"))


def _device(requested: str | None, local_rank: int) -> torch.device:
    """--device, else this process's GPU if there is one, else the CPU. A CUDA device without an
    index is the GPU of LOCAL_RANK (modulo the visible GPUs: a launcher may show each process
    only its own); it becomes the current device."""
    if requested is None and not torch.cuda.is_available():
        return torch.device("cpu")
    device = torch.device(requested or "cuda")
    if device.type == "cuda":
        if device.index is None:
            device = torch.device("cuda", local_rank % torch.cuda.device_count())
        torch.cuda.set_device(device)
    return device


def run(args: argparse.Namespace) -> int:
    from softvq_fast.models import SoftVQVAE

    for name in ("batch_size", "shard_size"):
        if getattr(args, name) < 1:
            raise SystemExit(f"--{name.replace('_', '-')} must be at least 1")
    if not args.images.is_dir():
        raise SystemExit(f"--images: {args.images} is not a folder")
    rank, world, local_rank = _distributed()
    device = _device(args.device, local_rank)
    model = SoftVQVAE.from_pretrained(args.model, device=device)
    config = model.config
    files, labels = data.list_images(args.images)
    plan = data.ShardPlan(len(files), args.shard_size)
    settings = {
        "model": str(args.model.resolve()), "image_size": config.image_size, "hflip": args.hflip,
        "shard_size": args.shard_size, "num_images": len(files), "labels": labels is not None,
        "latent_shape": [config.num_latent_tokens, config.codebook_embed_dim],
        "vq_mean": config.vq_mean, "vq_std": config.vq_std, "normalized": False, "bf16": args.bf16,
    }
    if rank == 0:
        data.write_manifest_start(args.out, settings, files)
    if world > 1:
        dist.barrier()
        if rank != 0:  # shards hold image indices into rank 0's list: every rank must see it
            data.check_same_files(args.out, files)
    pending = [s for s in plan.owned(rank, world) if not data.shard_complete(data.shard_path(args.out, s))]
    sampler = data.DistributedShardSampler(plan, pending, args.batch_size)
    dataset = data.ImageFolderDataset(args.images, files, labels, config.image_size)
    loader = DataLoader(dataset, batch_sampler=sampler, num_workers=args.num_workers, pin_memory=device.type == "cuda")
    todo = sum(stop - start for start, stop in map(plan.bounds, pending))
    autocast = torch.bfloat16 if args.bf16 else None

    @torch.inference_mode()
    def encode(images: torch.Tensor) -> torch.Tensor:
        return model.encode(images.to(device, non_blocking=True), autocast_dtype=autocast)

    with tqdm(total=todo, unit="img", disable=rank != 0, desc=f"rank 0/{world}") as bar:
        written = data.encode_shards(
            encode, loader, plan, args.out, hflip=args.hflip, with_labels=labels is not None,
            metadata={"vq_mean": repr(config.vq_mean), "vq_std": repr(config.vq_std)},
            tag=f"{rank}-{os.getpid()}", on_batch=bar.update,
        )
    print(f"rank {rank}: wrote {written} shards, skipped {len(plan.owned(rank, world)) - len(pending)} finished ones")
    if world > 1:
        dist.barrier()
    if rank == 0:
        manifest = data.finish_manifest(args.out, plan)
        print(f"{args.out}: {plan.num_shards} shards, {len(files)} images, latent mean {manifest['latent_mean']:.4f} "
              f"std {manifest['latent_std']:.4f} (config vq_mean {config.vq_mean}, vq_std {config.vq_std})")
    if world > 1:
        dist.destroy_process_group()
    return 0
