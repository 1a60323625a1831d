"""`softvq-fast reconstruct`: encode and decode images, print PSNR and SSIM, save side-by-side PNGs."""
from __future__ import annotations

import argparse
from pathlib import Path

import torch

from softvq_fast import data, metrics


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "reconstruct",
        help="reconstruct images with a tokenizer and report PSNR / SSIM",
        description="Centre-crop and resize each image to the tokenizer's size, encode and decode it, and "
        "write original|reconstruction PNGs to --out. PSNR (dB) and SSIM (Gaussian 11x11, sigma 1.5) "
        "are computed on the clamped float images in [0, 1].",
    )
    parser.add_argument("--model", required=True, type=Path, help="tokenizer folder (config.json + model.safetensors)")
    parser.add_argument("images", nargs="+", type=Path, metavar="IMAGE")
    parser.add_argument("--out", type=Path, default=Path("reconstructions"), help="folder for the PNGs")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch-size", type=int, default=16, help="images encoded at a time")
    parser.add_argument("--bf16", action="store_true", help="run the ViTs under bf16 autocast")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from softvq_fast.models import SoftVQVAE

    missing = [str(p) for p in args.images if not p.is_file()]
    if missing:
        raise SystemExit(f"IMAGE: not found: {', '.join(missing)}")
    model = SoftVQVAE.from_pretrained(args.model, device=args.device)
    if model.load_report.ignored:
        print(f"ignored {len(model.load_report.ignored)} training-only checkpoint keys")
    size = model.config.image_size
    originals = torch.stack([data.load_image(p, size) for p in args.images]).to(args.device)
    autocast = torch.bfloat16 if args.bf16 else None
    with torch.inference_mode():
        latents = model.encode(originals, max_batch=args.batch_size, autocast_dtype=autocast)
        reconstructions = model.decode(latents, max_batch=args.batch_size, autocast_dtype=autocast).clamp(-1, 1)
    a, b = (originals + 1) / 2, (reconstructions + 1) / 2
    psnr, ssim = metrics.psnr(a, b).tolist(), metrics.ssim(a, b).tolist()
    args.out.mkdir(parents=True, exist_ok=True)
    width = max(len(p.name) for p in args.images)
    print(f"{'image':<{width}}  {'PSNR dB':>8}  {'SSIM':>6}  side by side")
    for path, original, reconstruction, p, s in zip(args.images, originals, reconstructions, psnr, ssim):
        target = args.out / f"{path.stem}_reconstruction.png"
        data.tensor_to_image(torch.cat([original, reconstruction], dim=-1)).save(target)
        print(f"{path.name:<{width}}  {p:8.2f}  {s:6.4f}  {target}")
    print(f"{'average':<{width}}  {sum(psnr) / len(psnr):8.2f}  {sum(ssim) / len(ssim):6.4f}")
    return 0
