"""`softvq-fast train-generator`: train SiT or DiT on the latents of `encode-dataset` (one process,
or many under torchrun), resumable; the EMA is exported in the release layout."""
from __future__ import annotations

import argparse
from pathlib import Path

from softvq_fast.commands import arguments
from softvq_fast.commands.generate import finite_float, parse_classes

EPILOG = """\
model: a preset (SiT-S/1 .. SiT-XL/1, DiT-S/1 .. DiT-XL/1: random weights sized to the latents, with
  --num-classes classes, default the latents' class folders) or a release folder (config.json +
  model.safetensors: its weights are the start).

batches: --global-batch samples per step over all processes; each process takes global/WORLD_SIZE
  in micro-batches of --micro-batch (gradient accumulation) when they do not fit at once. The
  data order and every random draw depend on the seed, the step and the micro-batch size only:
  2 processes of 4 samples each train like 1 process with 2 micro-batches of 4.

processes: `torchrun --nproc_per_node N -m softvq_fast.cli train-generator ...` runs
  DistributedDataParallel (NCCL on GPUs, gloo on the CPU), each process on its LOCAL_RANK's GPU;
  rank 0 writes. --fsdp shards weights, gradients and AdamW state instead (torch's fully_shard,
  one unit per transformer block): for a model whose float32 training state (about 20 bytes a
  parameter: weights, gradients, two AdamW moments, EMA) and activations do not fit one GPU;
  a model that fits trains faster replicated.

run folder (--out): config.json, log.jsonl (JSON lines per --log-every steps), checkpoints/
  (atomic, the newest --keep-checkpoints kept), samples/ (EMA samples every --sample-every steps,
  decoded with --tokenizer when given), export/ (the EMA in the release layout, at the end;
  `softvq-fast generate --generator RUN/export` reads it), tensorboard/ when installed.
  --resume continues from the newest checkpoint exactly as the run would have gone on; a folder
  holding another configuration is refused, naming what differs (the number of steps, intervals,
  micro-batch, precision, workers and sampling options may change).

A non-finite loss stops the run naming the step, before any later checkpoint is written. A
checkpoint that cannot be written is reported and the previous one kept; training goes on.
"""


def _model(text: str) -> str:
    """argparse type: an existing folder or a generator preset name."""
    from softvq_fast.models.adaln_transformer import parse_preset

    if Path(text).is_dir():
        return text
    try:
        parse_preset(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"{text!r} is not a folder, and {exc}") from None
    return text


def register(subparsers: argparse._SubParsersAction) -> None:
    from softvq_fast.sampling.diffusion import NOISE_SCHEDULES
    from softvq_fast.sampling.flow import PATHS
    from softvq_fast.training.loop import PRECISIONS
    from softvq_fast.training.objectives import FLOW_WEIGHTINGS

    parser = subparsers.add_parser(
        "train-generator", help="train SiT or DiT on encoded latents", description=__doc__, epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--latents", required=True, type=Path, help="an encode-dataset output folder")
    parser.add_argument("--model", required=True, type=_model, help="a SiT/DiT preset or a release folder")
    parser.add_argument("--out", required=True, type=Path, help="the run folder")
    parser.add_argument("--resume", action="store_true", help="continue the run in --out from its newest checkpoint")
    parser.add_argument("--steps", type=arguments.positive_int, default=400_000, help="optimiser steps (default 400000)")
    parser.add_argument("--global-batch", type=arguments.positive_int, default=256, help="samples per step, all processes")
    parser.add_argument("--micro-batch", type=arguments.positive_int, default=None,
                        help="samples per forward pass (default: the per-process batch)")
    parser.add_argument("--lr", type=arguments.positive_float, default=1e-4, help="AdamW learning rate (default 1e-4)")
    parser.add_argument("--betas", type=arguments.unit_interval, nargs=2, default=(0.9, 0.999), metavar=("BETA1", "BETA2"))
    parser.add_argument("--weight-decay", type=arguments.non_negative_float, default=0.0)
    parser.add_argument("--grad-clip", type=arguments.positive_float, default=1.0, help="gradient norm clip (default 1)")
    parser.add_argument("--ema-decay", type=arguments.unit_interval, default=0.9999)
    parser.add_argument("--path", choices=PATHS, default="linear", help="SiT: flow-matching path")
    parser.add_argument("--weighting", choices=FLOW_WEIGHTINGS, default="lognormal", help="SiT: time sampling")
    parser.add_argument("--noise-schedule", choices=NOISE_SCHEDULES, default=None,
                        help="DiT: beta schedule (default: the release's, else cosine, as the authors train on 1-D tokens)")
    parser.add_argument("--num-classes", type=arguments.positive_int, default=None,
                        help="preset: classes (default: the latents' class folders)")
    parser.add_argument("--class-dropout", type=arguments.unit_interval, default=0.1, help="preset: label dropout for guidance")
    parser.add_argument("--no-flip", action="store_true", help="never read the flipped images' latents")
    parser.add_argument("--seed", type=arguments.non_negative_int, default=0)
    parser.add_argument("--precision", choices=PRECISIONS, default="auto", help="auto: bf16 autocast on GPUs, fp32 on CPUs")
    parser.add_argument("--compile", action="store_true", help="torch.compile the model")
    parser.add_argument("--fsdp", action="store_true", help="shard the model over the processes (see below)")
    parser.add_argument("--checkpoint-every", type=arguments.positive_int, default=5000)
    parser.add_argument("--keep-checkpoints", type=arguments.positive_int, default=2)
    parser.add_argument("--log-every", type=arguments.positive_int, default=100)
    parser.add_argument("--sample-every", type=arguments.non_negative_int, default=10_000, help="0: no samples")
    parser.add_argument("--sample-classes", type=parse_classes, default=None, help='e.g. "0-7" (default: 16 spread)')
    parser.add_argument("--sample-steps", type=arguments.positive_int, default=50)
    parser.add_argument("--sample-cfg-scale", type=finite_float, default=1.0)
    parser.add_argument("--tokenizer", type=Path, default=None, help="SoftVQ release folder: decode the samples")
    parser.add_argument("--export", type=Path, default=None, help="where the EMA goes (default OUT/export)")
    parser.add_argument("--num-workers", type=arguments.non_negative_int, default=4, help="DataLoader workers")
    parser.add_argument("--device", type=arguments.device, default=None,
                        help="default: this process's GPU (LOCAL_RANK) if there is one, else cpu")
    parser.set_defaults(func=run)


def config_from_args(args: argparse.Namespace):
    from softvq_fast.training.generator import GeneratorTrainingConfig

    return GeneratorTrainingConfig(
        latents=args.latents, model=args.model, out=args.out, steps=args.steps, global_batch=args.global_batch,
        micro_batch=args.micro_batch, lr=args.lr, betas=tuple(args.betas), weight_decay=args.weight_decay,
        grad_clip=args.grad_clip, ema_decay=args.ema_decay, path=args.path, weighting=args.weighting,
        noise_schedule=args.noise_schedule, num_classes=args.num_classes, class_dropout_prob=args.class_dropout,
        flip=not args.no_flip, seed=args.seed, precision=args.precision, compile=args.compile, fsdp=args.fsdp,
        checkpoint_every=args.checkpoint_every, keep_checkpoints=args.keep_checkpoints, log_every=args.log_every,
        sample_every=args.sample_every, sample_classes=args.sample_classes, sample_steps=args.sample_steps,
        sample_cfg_scale=args.sample_cfg_scale, tokenizer=args.tokenizer, num_workers=args.num_workers,
        resume=args.resume, export=args.export, device=str(args.device) if args.device is not None else None,
    )


def run(args: argparse.Namespace) -> int:
    from softvq_fast.training.generator import train_generator

    config = config_from_args(args)
    if args.device is not None:
        arguments.check_device_usable(args.device)
    with arguments.training_errors():
        export = train_generator(config)
    print(f"exported the EMA to {export}")
    return 0
