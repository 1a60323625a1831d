"""`softvq-fast reconstruct`: encode and decode images, print PSNR and SSIM, save side-by-side PNGs."""
from __future__ import annotations

import argparse
from collections import Counter
from pathlib import Path

import torch

from softvq_fast import data, metrics
from softvq_fast.commands import arguments


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "reconstruct",
        help="reconstruct images with a tokenizer and report PSNR / SSIM",
        description="Centre-crop and resize each image to the tokenizer's size, encode and decode it, and "
        "write original|reconstruction PNGs to --out as <stem>_reconstruction.png; images that share a "
        "stem (a.png and a.jpg, or x/a.png and y/a.png) get <stem>-1, <stem>-2, ... in the order given, "
        "so no output overwrites another. PSNR (dB) and SSIM (Gaussian 11x11, sigma 1.5) are computed "
        "on the clamped float images in [0, 1]. An image that cannot be read stops the command before "
        "anything is written, naming the file; 16-bit and float grayscale images are scaled to 8 bits.",
    )
    parser.add_argument("--model", required=True, type=Path,
                        help="tokenizer: a release folder (config.json + model.safetensors) or a Hugging Face Hub repo id")
    parser.add_argument("images", nargs="+", type=Path, metavar="IMAGE")
    parser.add_argument("--out", type=Path, default=Path("reconstructions"), help="folder for the PNGs")
    parser.add_argument("--device", type=arguments.device,
                        default=torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    parser.add_argument("--batch-size", type=arguments.positive_int, default=16, help="images encoded at a time")
    parser.add_argument("--bf16", action="store_true", help="run the ViTs under bf16 autocast")
    parser.set_defaults(func=run)


def output_names(paths: list[Path]) -> list[str]:
    """`<stem>_reconstruction.png` for each input. Inputs whose stems coincide (compared without
    case, as a case-insensitive file system would) get `<stem>-<n>`, n = 1, 2, ... in the order
    given, skipping any stem that another input has, so every name is distinct."""
    counts = Counter(p.stem.casefold() for p in paths)
    taken = set(counts)
    numbers: Counter = Counter()
    stems = []
    for path in paths:
        stem = path.stem
        if counts[stem.casefold()] > 1:
            while True:
                numbers[stem.casefold()] += 1
                candidate = f"{stem}-{numbers[stem.casefold()]}"
                if candidate.casefold() not in taken:
                    break
            taken.add(candidate.casefold())
            stem = candidate
        stems.append(stem)
    return [f"{stem}_reconstruction.png" for stem in stems]


def _check_paths(images: list[Path], out: Path) -> None:
    missing = [str(p) for p in images if not p.exists()]
    if missing:
        raise arguments.UsageError(f"IMAGE: not found: {', '.join(missing)}")
    folders = [str(p) for p in images if not p.is_file()]
    if folders:
        raise arguments.UsageError(f"IMAGE: not a file: {', '.join(folders)}")
    repeated = [path for path, n in Counter(str(p.resolve()) for p in images).items() if n > 1]
    if repeated:
        raise arguments.UsageError(f"IMAGE: given more than once: {', '.join(repeated)}")
    if out.exists() and not out.is_dir():
        raise arguments.UsageError(f"--out: {out} exists and is not a folder")


def run(args: argparse.Namespace) -> int:
    from softvq_fast.models import SoftVQVAE
    from softvq_fast.models.checkpoint import CheckpointError

    _check_paths(args.images, args.out)
    arguments.check_device_usable(args.device)
    try:
        model = SoftVQVAE.from_pretrained(args.model, device=args.device)
    except CheckpointError as exc:
        raise arguments.UsageError(f"--model: {exc}") from None
    if model.load_report.ignored:
        print(f"ignored {len(model.load_report.ignored)} training-only checkpoint keys")
    size = model.config.image_size
    loaded = [data.try_load_image(p, size) for p in args.images]
    unreadable = [f"{p} ({reason})" for p, (_, reason) in zip(args.images, loaded) if reason]
    if unreadable:
        raise arguments.UsageError(f"IMAGE: cannot read {'; '.join(unreadable)}")
    try:
        args.out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise arguments.UsageError(f"--out: cannot create the folder {args.out} ({exc.strerror or exc})") from None
    originals = torch.stack([image for image, _ in loaded]).to(args.device)
    autocast = torch.bfloat16 if args.bf16 else None
    with torch.inference_mode():
        latents = model.encode(originals, max_batch=args.batch_size, autocast_dtype=autocast)
        reconstructions = model.decode(latents, max_batch=args.batch_size, autocast_dtype=autocast).clamp(-1, 1)
    a, b = (originals + 1) / 2, (reconstructions + 1) / 2
    psnr, ssim = metrics.psnr(a, b).tolist(), metrics.ssim(a, b).tolist()
    width = max(len(str(p)) for p in args.images)
    print(f"{'image':<{width}}  {'PSNR dB':>8}  {'SSIM':>6}  side by side")
    rows = zip(args.images, output_names(args.images), originals, reconstructions, psnr, ssim)
    for path, name, original, reconstruction, p, s in rows:
        target = args.out / name
        data.tensor_to_image(torch.cat([original, reconstruction], dim=-1)).save(target)
        print(f"{str(path):<{width}}  {p:8.2f}  {s:6.4f}  {target}")
    print(f"{'average':<{width}}  {sum(psnr) / len(psnr):8.2f}  {sum(ssim) / len(ssim):6.4f}")
    return 0
