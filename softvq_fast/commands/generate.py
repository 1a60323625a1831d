"""`softvq-fast generate`: class-conditional images from a tokenizer and a generator (folders or
Hub repo ids), saved as one grid image."""
from __future__ import annotations

import argparse
import math
from pathlib import Path
from typing import Callable

import torch

from softvq_fast.commands import arguments
from softvq_fast.sampling import DIFFUSION_SAMPLERS, FLOW_SAMPLERS, PATHS

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")


def parse_classes(text: str) -> list[int]:
    """argparse type: "1,2,3", "1 2 3" or ranges "0-7" -> [labels], each >= 0."""
    labels: list[int] = []
    for part in text.replace(",", " ").split():
        first, dash, last = part.partition("-")
        try:
            values = range(int(first), int(last) + 1) if dash else [int(first)]
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected class labels such as \"1,2,3\", \"1 2 3\" or \"0-7\" (integers >= 0), got {part!r}"
            ) from None
        if not values:
            raise argparse.ArgumentTypeError(f"the range {part!r} is empty (write low-high with low <= high)")
        labels.extend(values)
    if not labels:
        raise argparse.ArgumentTypeError(f"no class labels in {text!r}")
    return labels


def finite_float(text: str) -> float:
    """argparse type: a finite number (not nan or inf)."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


def unit_float(text: str) -> float:
    """argparse type: a number in [0, 1]."""
    value = finite_float(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1], got {text!r}")
    return value


def output_file(extensions: tuple[str, ...]) -> Callable[[str], Path]:
    """argparse type: a file to write, in an existing folder, its name ending in one of `extensions`."""

    def parse(text: str) -> Path:
        path = Path(text)
        if path.suffix.lower() not in extensions:
            raise argparse.ArgumentTypeError(f"expected a file name ending in {', '.join(extensions)}, got {text!r}")
        if not path.parent.is_dir():
            raise argparse.ArgumentTypeError(f"the folder {str(path.parent)!r} does not exist")
        if path.is_dir():
            raise argparse.ArgumentTypeError(f"{text!r} is a folder")
        return path

    return parse


def model_source(text: str) -> str:
    """argparse type: an existing folder or a Hugging Face Hub repo id "owner/name"."""
    from softvq_fast import hub

    if not (Path(text).is_dir() or hub.is_repo_id(text)):
        raise argparse.ArgumentTypeError(f"{text!r} is neither a folder nor a Hugging Face Hub repo id 'owner/name'")
    return text


def save_grid(images: torch.Tensor, path: str | Path, nrow: int | None = None) -> tuple[int, int]:
    """images (B, 3, H, W) in [-1, 1] -> one image file with the images in rows of `nrow`
    (a positive integer; default about sqrt(B)). Returns (rows, columns)."""
    from PIL import Image

    from softvq_fast.models import fields

    count, _, height, width = images.shape
    columns = fields.optional_integer("nrow", nrow) or math.ceil(math.sqrt(count))
    rows = math.ceil(count / columns)
    pixels = ((images.float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1)
    grid = torch.zeros(rows * height, columns * width, 3, dtype=torch.uint8)
    for index in range(count):
        row, column = divmod(index, columns)
        grid[row * height : (row + 1) * height, column * width : (column + 1) * width] = pixels[index]
    Image.fromarray(grid.numpy()).save(path)
    return rows, columns


def check_before_loading(args: argparse.Namespace, device: torch.device):
    """Resolve both models and check the arguments of `add_model_arguments` (and --classes, where
    the command has it) against their configs (nothing loaded yet); returns (tokenizer folder,
    generator folder, generator family, the generator on the meta device)."""
    from softvq_fast import hub
    from softvq_fast.generation import check_class_labels, check_pair, check_sampling_arguments, generator_family
    from softvq_fast.models.checkpoint import CheckpointError, read_config
    from softvq_fast.models.fields import FieldError

    if args.guidance_low > args.guidance_high:
        args.error(f"argument --guidance-low: {args.guidance_low} is above --guidance-high {args.guidance_high}")
    arguments.check_device_usable(device)
    folders = {}
    for option in ("tokenizer", "generator"):
        try:
            folders[option] = hub.resolve(getattr(args, option))
        except CheckpointError as exc:
            args.error(f"argument --{option}: {exc}")
    try:
        tokenizer_config = read_config(folders["tokenizer"])
    except CheckpointError as exc:
        args.error(f"argument --tokenizer: {exc}")
    try:
        family = generator_family(folders["generator"])
        skeleton = family.from_config(folders["generator"])
        check_pair(tokenizer_config, skeleton)
    except ValueError as exc:  # CheckpointError included
        args.error(f"argument --generator: {exc}")
    try:
        if "classes" in args:
            check_class_labels(args.classes, skeleton.y_embedder.num_classes)
    except ValueError as exc:
        args.error(f"argument --classes: {exc}")
    try:
        check_sampling_arguments(skeleton, sampler=args.sampler, steps=args.steps, cfg_scale=args.cfg_scale,
                                 guidance_interval=(args.guidance_low, args.guidance_high), path=args.path,
                                 seed=args.seed, cuda_graph=None)
    except FieldError as exc:  # what remains after parsing: the choices that depend on the generator
        args.error(f"argument --{exc.name.replace('_', '-')}: {exc}")
    return folders["tokenizer"], folders["generator"], family, skeleton


def load_models(args: argparse.Namespace, device: torch.device, tokenizer_folder: Path, generator_folder: Path,
                family: type) -> tuple:
    """(tokenizer, generator) on `device`; a checkpoint that does not load (keys, shapes, dtypes,
    a damaged file) is an argparse error naming --tokenizer or --generator."""
    from softvq_fast.models import SoftVQVAE
    from softvq_fast.models.checkpoint import CheckpointError

    def load(option: str, loader, folder):
        try:
            return loader(folder, device=device)
        except CheckpointError as exc:
            args.error(f"argument --{option}: {exc}")

    return load("tokenizer", SoftVQVAE.from_pretrained, tokenizer_folder), load("generator", family.from_pretrained,
                                                                                 generator_folder)


def run(args: argparse.Namespace) -> int:
    from softvq_fast.generation import generate

    device = args.device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    tokenizer_folder, generator_folder, family, _ = check_before_loading(args, device)
    tokenizer, generator = load_models(args, device, tokenizer_folder, generator_folder, family)
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
    parser = subparsers.add_parser(
        "generate", help=__doc__.split(":", 1)[1].strip(), description=__doc__,
        epilog="Every argument is checked, against both models' config.json too, before any weights load.",
    )
    add_model_arguments(parser)
    parser.add_argument("--classes", required=True, type=parse_classes, help='class labels: "1,2,3", "1 2 3" or "0-7"')
    parser.add_argument("--out", type=output_file(IMAGE_EXTENSIONS), default=Path("grid.png"),
                        help=f"output image in an existing folder, {'/'.join(IMAGE_EXTENSIONS)} (default grid.png)")
    parser.add_argument("--nrow", type=arguments.positive_int, default=None, help="images per grid row (default about sqrt(B))")
    parser.set_defaults(func=run)


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """The tokenizer, the generator and the sampling options (checked by `check_before_loading`)."""
    source = "folder (config.json + model.safetensors) or Hugging Face Hub repo id"
    parser.add_argument("--tokenizer", required=True, type=model_source,
                        help=f"SoftVQ tokenizer {source}, e.g. SoftVQVAE/softvq-b-64")
    parser.add_argument("--generator", required=True, type=model_source,
                        help=f"SiT or DiT {source}, e.g. SoftVQVAE/sit-xl_softvq-b-64")
    parser.add_argument("--sampler", choices=FLOW_SAMPLERS + DIFFUSION_SAMPLERS, default=None,
                        help="SiT: euler (default), heun, sde; DiT: ddpm (default), ddim")
    parser.add_argument("--steps", type=arguments.positive_int, default=50, help="sampling steps (default 50)")
    parser.add_argument("--cfg-scale", type=finite_float, default=1.0, help="classifier-free guidance scale (1 = off)")
    parser.add_argument("--guidance-low", type=unit_float, default=0.0, help="guidance interval start in t in [0, 1]")
    parser.add_argument("--guidance-high", type=unit_float, default=1.0, help="guidance interval end in t in [0, 1]")
    parser.add_argument("--path", choices=PATHS, default=None, help="SiT interpolation path")
    parser.add_argument("--seed", type=arguments.non_negative_int, default=0)
    parser.add_argument("--device", type=arguments.device, default=None, help="torch device (default: a GPU if any)")
    parser.add_argument("--dtype", choices=tuple(DTYPES), default="float32", help="generator precision")
    parser.add_argument("--no-cuda-graph", action="store_true", help="do not replay the sampling step as a CUDA graph")
