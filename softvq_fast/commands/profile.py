"""`softvq-fast profile`: torch.profiler trace (Chrome trace JSON) of generator sampling steps, the top kernels, and GPU telemetry."""
from __future__ import annotations

import argparse

import torch

from softvq_fast.commands import arguments
from softvq_fast.commands.generate import DTYPES, finite_float, model_source, output_file
from softvq_fast.models.adaln_transformer import parse_preset


def _build(args: argparse.Namespace, device: torch.device, dtype: torch.dtype):
    from softvq_fast.generation import load_generator
    from softvq_fast.models import DiT, SiT
    from softvq_fast.models.checkpoint import CheckpointError

    if args.generator:
        try:
            return load_generator(args.generator, device=device, dtype=dtype)
        except CheckpointError as exc:
            args.error(f"argument --generator: {exc}")
    family = DiT if args.preset.startswith("DiT") else SiT
    with torch.device(device):
        model = family.from_preset(args.preset, input_size=args.tokens, in_channels=args.channels, vae_1d=True)
    return model.to(dtype=dtype).eval()


def run(args: argparse.Namespace) -> int:
    from torch.profiler import ProfilerActivity, profile, record_function

    from softvq_fast.models import DiT
    from softvq_fast.sampling import ConditionalModel
    from softvq_fast.telemetry import GpuTelemetry

    device = args.device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    arguments.check_device_usable(device)
    dtype = DTYPES[args.dtype]
    batch = args.batch or (64 if device.type == "cuda" else 2)
    model = _build(args, device, dtype)
    is_dit = isinstance(model, DiT)
    labels = torch.randint(0, model.y_embedder.num_classes, (batch,), device=device)
    step = ConditionalModel(
        model, labels, cfg_scale=args.cfg_scale, time_scale=1000.0 if is_dit else 1.0, cuda_graph=args.cuda_graph
    )
    x = torch.randn(batch, *model.latent_shape, device=device)
    t = 500.0 if is_dit else 0.5
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with torch.inference_mode():
        step(x, t)  # warm-up (kernel selection, Triton compilation, graph capture)
        # Telemetry inside the profiler: its seconds and energy cover the steps, not the profiler's
        # start-up and final flush.
        with profile(activities=activities) as prof, GpuTelemetry(device) as telemetry:
            for _ in range(args.steps):
                with record_function("sampling_step"):
                    step(x, t)
    prof.export_chrome_trace(str(args.out))
    sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    name = args.generator or args.preset
    print(
        f"{name}: {model.num_tokens} tokens, batch {batch}, {args.dtype}, cfg {args.cfg_scale}, "
        f"cuda graph {args.cuda_graph}, {args.steps} steps on {device}"
    )
    print(prof.key_averages().table(sort_by=sort, row_limit=args.top))
    print(f"seconds per step (with profiler overhead): {telemetry.seconds / args.steps:.4f}")
    for key, value in telemetry.summary().items():
        print(f"  {key}: {value:.4g}" if isinstance(value, float) else f"  {key}: {value}")
    print(f"wrote {args.out} (open in chrome://tracing or https://ui.perfetto.dev)")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("profile", help=__doc__.split(":", 1)[1].strip(), description=__doc__)
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--generator", type=model_source, default=None,
                        help="SiT or DiT release folder or Hugging Face Hub repo id")
    source.add_argument("--preset", type=arguments.checked_by(parse_preset), default="SiT-XL/1",
                        help="random-weight preset, e.g. SiT-XL/1, DiT-B/1 (default SiT-XL/1)")
    parser.add_argument("--tokens", type=arguments.positive_int, default=64, help="latent tokens of the preset (default 64)")
    parser.add_argument("--channels", type=arguments.positive_int, default=32,
                        help="channels per token of the preset (default 32)")
    parser.add_argument("--batch", type=arguments.positive_int, default=None,
                        help="batch size (default 64 on CUDA, 2 on the CPU)")
    parser.add_argument("--cfg-scale", type=finite_float, default=1.0, help="classifier-free guidance (doubles the batch)")
    parser.add_argument("--dtype", choices=tuple(DTYPES), default="bfloat16" if torch.cuda.is_available() else "float32")
    parser.add_argument("--cuda-graph", action="store_true", help="replay the step as a CUDA graph")
    parser.add_argument("--steps", type=arguments.positive_int, default=3, help="profiled steps (default 3)")
    parser.add_argument("--device", type=arguments.device, default=None, help="torch device (default: cuda if available)")
    parser.add_argument("--top", type=arguments.positive_int, default=15, help="rows of the kernel table (default 15)")
    parser.add_argument("--out", type=output_file((".json",)), default="profile_trace.json",
                        help="Chrome trace file in an existing folder (default profile_trace.json)")
    parser.set_defaults(func=run)
