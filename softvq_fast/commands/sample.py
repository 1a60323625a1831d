"""`softvq-fast sample`: N class-balanced images from a tokenizer and a generator, written to one
.npz for the ADM evaluation suite or `softvq-fast fid` (resumable; many GPUs under torchrun)."""
from __future__ import annotations

import argparse

import torch.distributed as dist

from softvq_fast.commands import arguments
from softvq_fast.commands.encode_dataset import command_device, join_ranks
from softvq_fast.commands.generate import DTYPES, add_model_arguments, check_before_loading, load_models, output_file

EPILOG = """\
output: --out holds arr_0, N x H x W x 3 uint8 images (255 * (x + 1) / 2, truncated, as the
  authors' sampling scripts write them), and arr_1, their N int64 class labels; image i sits at
  row i whatever the number of processes.
labels: balanced gives image i the class i mod C (C = the generator's classes), so every class
  appears floor(N / C) or ceil(N / C) times (exactly --per-class times with --per-class); uniform
  draws each image's class at random, as the authors' sampling script does.
seeds: image i's class and starting noise depend only on --seed and i; batch k (images
  [k * B, (k + 1) * B)) seeds the per-step noise of the sde and ddpm samplers with --seed and k.
  So 1 process and 8 write the same file (bit for bit on the CPU at equal thread counts).
resuming: each finished batch is kept in OUT.parts/ (renamed into place when complete). A rerun
  with the same settings samples only the missing batches; one with other settings (any option
  above but --device index and --no-cuda-graph, or other model weights) is refused, naming them.
  OUT.parts/ is deleted once OUT is written; an existing OUT is never overwritten.
torchrun: torchrun --nproc_per_node 8 -m softvq_fast.cli sample --num-samples 50000 ... : every
  process takes every 8th batch on the GPU of its LOCAL_RANK; rank 0 writes OUT and shows the
  progress bar.
"""


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "sample", help="sample N class-balanced images into one .npz for FID (resumable, torchrun)",
        description=__doc__,
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_model_arguments(parser)
    count = parser.add_mutually_exclusive_group(required=True)
    count.add_argument("--num-samples", "--num", dest="num", type=arguments.positive_int,
                       help="images in all, e.g. 50000 (write --num-samples under torchrun: its own parser takes "
                            "--num for an abbreviation of its --numa-binding)")
    count.add_argument("--per-class", type=arguments.positive_int,
                       help="images of each class (N = this x the generator's classes; balanced labels)")
    parser.add_argument("--out", required=True, type=output_file((".npz",)),
                        help=".npz to write, in an existing folder")
    parser.add_argument("--batch", type=arguments.positive_int, default=64,
                        help="images sampled at a time by each process; the unit kept for resuming (default 64)")
    parser.add_argument("--labels", choices=("balanced", "uniform"), default="balanced",
                        help="class of each image (default balanced)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from softvq_fast.evaluation.sampling import SamplingError, check_started_run, sample_to_npz, sampling_settings
    from softvq_fast.models.checkpoint import read_config

    if args.per_class is not None and args.labels != "balanced":
        args.error("argument --per-class: needs --labels balanced (uniform labels have no fixed count per class)")
    device = command_device(args.device)
    tokenizer_folder, generator_folder, family, skeleton = check_before_loading(args, device)
    num = args.num or args.per_class * skeleton.y_embedder.num_classes
    sampling = dict(sampler=args.sampler, steps=args.steps, cfg_scale=args.cfg_scale, path=args.path,
                    guidance_interval=(args.guidance_low, args.guidance_high), seed=args.seed)
    options = dict(num=num, batch=args.batch, labels=args.labels, dtype=DTYPES[args.dtype], **sampling)
    try:  # the settings known before loading; the weights are compared once loaded
        settings = sampling_settings(read_config(tokenizer_folder), skeleton, device=device, **options)
        check_started_run(args.out, settings)
    except SamplingError as exc:
        args.error(f"argument --out: {exc}")
    rank, world = join_ranks()
    tokenizer, generator = load_models(args, device, tokenizer_folder, generator_folder, family)
    try:
        result = sample_to_npz(tokenizer, generator, args.out, device=device, progress=True,
                               cuda_graph=False if args.no_cuda_graph else None, **options)
    except SamplingError as exc:
        raise arguments.UsageError(f"--out: {exc}") from None
    if rank == 0:
        size = tokenizer.config.image_size
        print(f"wrote {result.out}: {num} images of {size} x {size} in {result.parts} batches (rank 0 found "
              f"{result.resumed} of its batches finished by an earlier run)")
    if world > 1:
        dist.destroy_process_group()
    return 0
