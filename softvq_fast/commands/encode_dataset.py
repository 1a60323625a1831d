"""`softvq-fast encode-dataset`: encode an image folder into sharded latent files (resumable,
parallel loading, multi-GPU / multi-node under torchrun)."""
from __future__ import annotations

import argparse
import os
import sys
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader
from tqdm import tqdm

from softvq_fast import data, distributed
from softvq_fast.commands import arguments

EPILOG = """\
images: every file with an image extension under --images (other files are ignored), symbolic
  links to files and to folders followed alike; a link back to a folder that contains it, or to
  nothing, is skipped with a warning, and a folder that cannot be read stops the run. When every
  image sits in a subfolder, the first-level folder is the class: labels index the sorted names
  of the folders that hold images (manifest.json "classes"). 16-bit grayscale images are scaled
  to 8 bits, not clipped (float ones from [0, 1]); alpha is dropped. An image that cannot be
  read is skipped with a warning naming it and listed with the reason in manifest.json
  "skipped"; the other images keep their positions and labels.

resuming: a rerun into the same --out skips finished shards and deletes files a killed run left
  half-written. It refuses to continue (naming what changed) when the settings, the image names
  or the tokenizer's files (sha256 of config.json and the weights) differ from the run that
  started the folder. An image whose size or mtime changed since then makes its shard be encoded
  again (so does fixing an unreadable one). Never run two encode-dataset processes (other than
  the ranks of one torchrun) on one --out at once.
"""


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "encode-dataset",
        help="encode an image folder to sharded safetensors latents",
        description="Centre-crop and resize every image under --images, encode it with the tokenizer in\n"
        "--model and write shards of latents to --out with a manifest.json and files.jsonl (the\n"
        "image list, JSON lines). Rerunning skips finished shards. Under torchrun each process takes\n"
        "every WORLD_SIZE-th shard.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--model", required=True, type=Path,
                        help="tokenizer: a release folder (config.json + model.safetensors) or a Hugging Face Hub repo id")
    parser.add_argument("--images", required=True, type=Path, help="folder of images (class subfolders give labels)")
    parser.add_argument("--out", required=True, type=Path, help="output folder")
    parser.add_argument("--batch-size", type=arguments.positive_int, default=32, help="images encoded at a time")
    parser.add_argument("--shard-size", type=arguments.positive_int, default=1024, help="images per shard file")
    parser.add_argument("--hflip", action="store_true", help="also store latents of the horizontally flipped images")
    parser.add_argument("--num-workers", type=arguments.non_negative_int, default=min(8, os.cpu_count() or 1),
                        help="DataLoader worker processes (0: load in the main process)")
    parser.add_argument("--device", type=arguments.device, default=None,
                        help="default: this process's GPU (LOCAL_RANK) if there is one, else cpu")
    parser.add_argument("--bf16", action="store_true", help="run the encoder under bf16 autocast")
    parser.set_defaults(func=run)


# The ranks only meet at barriers (they exchange no tensors): gloo, on the CPU, with a timeout
# long enough for a rank that finishes its shards hours before the slowest one (NCCL's watchdog
# would end it after 10 minutes).
BARRIER_TIMEOUT = timedelta(days=7)


def join_ranks() -> tuple[int, int]:
    """(rank, world size), joining torchrun's process group (gloo: the ranks only meet at
    barriers, whatever their devices) when started by torchrun."""
    distributed.join_process_group("gloo", BARRIER_TIMEOUT)
    return distributed.rank_and_world()


def command_device(requested: torch.device | None) -> torch.device:
    """--device (checked usable), else this process's GPU if there is one, else the CPU
    (`softvq_fast.distributed.process_device`)."""
    if requested is not None:
        arguments.check_device_usable(requested)
    return distributed.process_device(requested)


def _check_paths(args: argparse.Namespace) -> None:
    """The folder arguments, before any process loads or writes anything."""
    if not args.images.exists():
        raise arguments.UsageError(f"--images: {args.images} does not exist")
    if not args.images.is_dir():
        raise arguments.UsageError(f"--images: {args.images} is not a folder")
    if args.out.exists() and not args.out.is_dir():
        raise arguments.UsageError(f"--out: {args.out} exists and is not a folder")


def run(args: argparse.Namespace) -> int:
    from softvq_fast.models.checkpoint import CheckpointError

    _check_paths(args)
    try:
        return _encode(args)
    except CheckpointError as exc:
        raise arguments.UsageError(f"--model: {exc}") from None
    except data.DatasetError as exc:
        raise arguments.UsageError(f"--{exc.argument}: {exc.message}") from None


def _encode(args: argparse.Namespace) -> int:
    from softvq_fast.models import SoftVQVAE

    rank, world = join_ranks()
    device = command_device(args.device)
    model = SoftVQVAE.from_pretrained(args.model, device=device)
    config = model.config
    listing = data.list_images(args.images)
    files, labels = listing.files, listing.labels
    plan = data.ShardPlan(len(files), args.shard_size)
    if rank == 0:
        weights = Path(model.load_report.weights_file)
        settings = {
            "model": str(weights.parent.resolve()), "images": str(args.images.resolve()),
            "model_sha256": {p.name: data.file_sha256(p) for p in (weights.parent / "config.json", weights)},
            "image_size": config.image_size, "hflip": args.hflip, "shard_size": args.shard_size,
            "num_images": len(files), "labels": labels is not None, "classes": listing.classes,
            "latent_shape": [config.num_latent_tokens, config.codebook_embed_dim],
            "vq_mean": config.vq_mean, "vq_std": config.vq_std, "normalized": False, "bf16": args.bf16,
        }
        stale = data.remove_stale_temporaries(args.out) if args.out.is_dir() else []
        again = data.prepare_output(args.out, settings, files, data.image_stats(args.images, files), plan)
        if stale:
            print(f"{args.out}: removed {len(stale)} temporary files a killed run left")
        if again:
            print(f"{args.out}: images changed since the run started (size or mtime): encoding shards "
                  f"{', '.join(map(str, again))} again")
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

    def warn_skipped(index: int, reason: str) -> None:
        tqdm.write(f"warning: {args.images / files[index]}: skipped, cannot be read ({reason})", file=sys.stderr)

    with tqdm(total=todo, unit="img", disable=rank != 0, desc=f"rank 0/{world}") as bar:
        written = data.encode_shards(
            encode, loader, plan, args.out, hflip=args.hflip, with_labels=labels is not None,
            metadata={"vq_mean": repr(config.vq_mean), "vq_std": repr(config.vq_std)},
            tag=f"{rank}-{os.getpid()}", on_batch=bar.update, on_skip=warn_skipped,
        )
    print(f"rank {rank}: wrote {written} shards, skipped {len(plan.owned(rank, world)) - len(pending)} finished ones")
    if world > 1:
        dist.barrier()
    if rank == 0:
        manifest = data.finish_manifest(args.out, plan, files)
        readable = len(files) - len(manifest["skipped"])
        print(f"{args.out}: {plan.num_shards} shards, {readable} images ({len(manifest['skipped'])} unreadable, "
              f"listed in {data.MANIFEST_NAME}), latent mean {manifest['latent_mean']:.4f} std "
              f"{manifest['latent_std']:.4f} (config vq_mean {config.vq_mean}, vq_std {config.vq_std})")
    if world > 1:
        dist.destroy_process_group()
    return 0
