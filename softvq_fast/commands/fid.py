"""`softvq-fast fid`: FID, Inception Score and precision/recall of a sample .npz against a reference
.npz, in the ADM evaluation suite's formats, through torch-fidelity's Inception-v3."""
from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

from softvq_fast.commands import arguments
from softvq_fast.commands.generate import output_file

EPILOG = """\
files: SAMPLES holds arr_0, N x H x W x 3 uint8 images (N >= 2), as `softvq-fast sample` and the
  ADM suite's samplers write it. REFERENCE holds images the same way and/or Inception pool
  statistics mu (2048,) and sigma (2048, 2048), as the ADM suite's reference batches do (e.g.
  VIRTUAL_imagenet256_labeled.npz from
  https://openaipublic.blob.core.windows.net/diffusion/jul-2021/ref_batches/imagenet/256/).
  Given statistics are used for FID as they are; images give precision and recall.
metrics: FID on the 2048-d pool features (float64 Frechet distance); Inception Score over one
  split per 5,000 samples (10 for 50,000); precision and recall with k = 3 neighbours on the
  pool features (only for a reference of images). sFID is not computed (torch-fidelity has no
  spatial features). Numbers agree with the ADM suite's TensorFlow graph up to the port's small
  differences; compare runs of one tool with each other.
weights: torch-fidelity's Inception file weights-inception-2015-12-05-6726825d.pth (a
  PyTorch state dict converted from TensorFlow's inception-2015-12-05), from
  https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/weights-inception-2015-12-05-6726825d.pth
  Without --inception it is read from torch's hub cache (~/.cache/torch/hub/checkpoints/),
  downloaded there the first time when there is a network.
needs: pip install 'softvq-fast[eval]' (torch-fidelity).
"""


def existing_file(text: str) -> Path:
    """argparse type: a file that exists."""
    path = Path(text)
    if not path.is_file():
        raise argparse.ArgumentTypeError(f"{text!r} {'is a folder' if path.is_dir() else 'does not exist'}")
    return path


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "fid", help="FID, Inception Score, precision/recall of a sample .npz against a reference .npz",
        description=__doc__, epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("samples", type=existing_file, metavar="SAMPLES", help="sample .npz (arr_0 images)")
    parser.add_argument("reference", type=existing_file, metavar="REFERENCE",
                        help="reference .npz (arr_0 images and/or mu, sigma)")
    parser.add_argument("--inception", type=existing_file, default=None, metavar="FILE",
                        help="torch-fidelity's Inception weights file weights-inception-2015-12-05-6726825d.pth "
                             "(see below); default: torch's hub cache, downloaded when missing")
    parser.add_argument("--device", type=arguments.device, default=None, help="torch device (default: a GPU if any)")
    parser.add_argument("--batch", type=arguments.positive_int, default=64,
                        help="images per Inception batch (default 64)")
    parser.add_argument("--json", type=output_file((".json",)), default=None, metavar="FILE",
                        help="also write the scores to this JSON file")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from softvq_fast.evaluation.fid import InceptionError, evaluate, read_reference, read_samples
    from softvq_fast.evaluation.npz import NpzError

    for option, read in (("SAMPLES", read_samples), ("REFERENCE", read_reference)):
        try:
            read(getattr(args, option.lower()))
        except NpzError as exc:
            args.error(f"argument {option}: {exc}")
    if args.device is not None:
        arguments.check_device_usable(args.device)
    try:
        scores = evaluate(args.samples, args.reference, inception=args.inception, device=args.device,
                          batch_size=args.batch, progress=True)
    except InceptionError as exc:
        raise arguments.UsageError(f"--inception: {exc}") from None
    reference = "its mu, sigma" if scores.reference_statistics == "precomputed" else "statistics of its images"
    print(f"samples: {scores.num_samples} images of {args.samples}; reference: {args.reference} ({reference})")
    print(f"FID: {scores.fid:.4f}")
    print(f"Inception Score: {scores.inception_score:.4f} +- {scores.inception_score_std:.4f} "
          f"({scores.inception_score_splits} splits)")
    if scores.precision is not None:
        print(f"Precision: {scores.precision:.4f}")
        print(f"Recall: {scores.recall:.4f}")
    if args.json is not None:
        args.json.write_text(json.dumps(dataclasses.asdict(scores), indent=1) + "\n")
    return 0
