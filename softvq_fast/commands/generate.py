"""`softvq-fast generate`: class-conditional images from a tokenizer and a generator folder, saved as a grid PNG."""
from __future__ import annotations

import argparse
import math

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def parse_classes(text: str) -> list[int]:
    """"1,2,3", "1 2 3" or ranges "0-7" -> [labels]."""
    labels: list[int] = []
    for part in text.replace(",", " ").split():
        if "-" in part[1:]:
            first, last = part.split("-", 1)
            labels.extend(range(int(first), int(last) + 1))
        else:
            labels.append(int(part))
    if not labels:
        raise argparse.ArgumentTypeError(f"no class labels in {text!r}")
    return labels


def save_grid(images: torch.Tensor, path: str, nrow: int | None = None) -> tuple[int, int]:
    """images (B, 3, H, W) in [-1, 1] -> one PNG with the images in rows of `nrow` (default
    about sqrt(B)). Returns (rows, columns)."""
    from PIL import Image

    count, _, height, width = images.shape
    columns = nrow or math.ceil(math.sqrt(count))
    rows = math.ceil(count / columns)
    pixels = ((images.float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1)
    grid = torch.zeros(rows * height, columns * width, 3, dtype=torch.uint8)
    for index in range(count):
        row, column = divmod(index, columns)
        grid[row * height : (row + 1) * height, column * width : (column + 1) * width] = pixels[index]
    Image.fromarray(grid.numpy()).save(path)
    return rows, columns


def run(args: argparse.Namespace) -> int:
    from softvq_fast.generation import generate, load_generator
    from softvq_fast.models import SoftVQVAE

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    tokenizer = SoftVQVAE.from_pretrained(args.tokenizer, device=device)
    generator = load_generator(args.generator, device=device)
    images = generate(
        tokenizer,
        generator,
        args.classes,
        sampler=args.sampler,
        steps=args.steps,
        cfg_scale=args.cfg_scale,
        guidance_interval=(args.guidance_low, args.guidance_high),
        path=args.path,
        seed=args.seed,
        device=device,
        dtype=DTYPES[args.dtype],
        cuda_graph=False if args.no_cuda_graph else None,
        progress=True,
    )
    rows, columns = save_grid(images, args.out, args.nrow)
    print(f"wrote {args.out}: {len(args.classes)} images of {images.shape[-1]} px in a {rows} x {columns} grid")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("generate", help=__doc__.split(":", 1)[1].strip(), description=__doc__)
    parser.add_argument("--tokenizer", required=True, help="SoftVQ tokenizer folder (config.json + model.safetensors)")
    parser.add_argument("--generator", required=True, help="SiT or DiT folder (config.json + model.safetensors)")
    parser.add_argument("--classes", required=True, type=parse_classes, help='class labels: "1,2,3", "1 2 3" or "0-7"')
    parser.add_argument("--out", default="grid.png", help="output PNG (default grid.png)")
    parser.add_argument("--sampler", default=None, help="SiT: euler (default), heun, sde; DiT: ddpm (default), ddim")
    parser.add_argument("--steps", type=int, default=50, help="sampling steps (default 50)")
    parser.add_argument("--cfg-scale", type=float, default=1.0, help="classifier-free guidance scale (1 = off)")
    parser.add_argument("--guidance-low", type=float, default=0.0, help="guidance interval start in t in [0, 1]")
    parser.add_argument("--guidance-high", type=float, default=1.0, help="guidance interval end in t in [0, 1]")
    parser.add_argument("--path", choices=("linear", "cosine"), default=None, help="SiT interpolation path")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available)")
    parser.add_argument("--dtype", choices=tuple(DTYPES), default="float32", help="generator precision")
    parser.add_argument("--no-cuda-graph", action="store_true", help="do not replay the sampling step as a CUDA graph")
    parser.add_argument("--nrow", type=int, default=None, help="images per grid row (default about sqrt(B))")
    parser.set_defaults(func=run)
