"""FID, Inception Score and precision/recall of sampled images against a reference batch, in the
ADM evaluation suite's file formats, on torch-fidelity's port of the TensorFlow Inception-v3
that FID is defined with (the optional extra `eval`).

- Features: the 2048-d pool features and the 1008 unbiased logits of torch-fidelity's
  "inception-v3-compat" extractor (uint8 images resized to 299 px inside it, as the TF graph
  does).
- FID: the Fréchet distance between Gaussians fitted to the pool features, in float64. A
  reference .npz holding `mu` and `sigma` (as the ADM suite's VIRTUAL_imagenet256_labeled.npz
  does) is used as it is, as the ADM suite uses it; else they are fitted to its `arr_0` images.
- Inception Score: torch-fidelity's, over one split per 5,000 samples (10 for 50,000, the
  usual protocol), at least one.
- Precision / recall (Kynkäänniemi et al., k = 3 nearest neighbours on the pool features, as in
  the ADM suite): torch-fidelity's, when the reference holds images.
- sFID is not computed: torch-fidelity exposes no spatial Inception features.
"""
from __future__ import annotations

import math
import pickle
import urllib.error
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from softvq_fast.evaluation.npz import IMAGES_KEY, NpzError, NpzImages, npz_keys

FEATURE_DIM = 2048
# torch-fidelity's Inception weights: this file, in its own format (a state dict of the extractor).
INCEPTION_WEIGHTS_URL = (
    "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/weights-inception-2015-12-05-6726825d.pth"
)
INCEPTION_FEATURES = ("2048", "logits_unbiased")
STATISTICS_KEYS = ("mu", "sigma")
IS_SPLIT_SIZE = 5000
IS_MAX_SPLITS = 10
PR_NEIGHBORHOOD = 3
PR_BATCH = 10000
IS_SHUFFLE_SEED = 2020  # torch-fidelity's default


class InceptionError(RuntimeError):
    """The Inception network cannot be built: torch-fidelity missing, weights absent or wrong."""


def _drop_rounding(eigenvalues: np.ndarray) -> np.ndarray:
    """Symmetric PSD eigenvalues with those within rounding of zero (or below it) set to zero."""
    floor = len(eigenvalues) * np.finfo(np.float64).eps * max(float(eigenvalues.max(initial=0.0)), 0.0)
    return np.where(eigenvalues > floor, eigenvalues, 0.0)


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """||mu1 - mu2||² + tr(sigma1) + tr(sigma2) - 2 tr((sigma1 sigma2)^½) for means (D,) and
    covariances (D, D), in float64. tr((S1 S2)^½) is the sum of the square roots of the
    eigenvalues of S1^½ S2 S1^½, which is symmetric positive semi-definite: its eigenvalues are
    real. Covariances of fewer than D samples are singular; eigenvalues within rounding of zero
    (below D·eps times the largest) are taken as zero, not as the rounding's square roots."""
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    sigma1, sigma2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
    values, vectors = np.linalg.eigh(sigma1)
    root1 = (vectors * np.sqrt(_drop_rounding(values))) @ vectors.T
    middle = root1 @ sigma2 @ root1
    trace_root = np.sqrt(_drop_rounding(np.linalg.eigvalsh((middle + middle.T) / 2))).sum()
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * trace_root)


@dataclass(frozen=True)
class Statistics:
    """Mean (D,) and covariance (D, D) float64 of features."""

    mu: np.ndarray
    sigma: np.ndarray

    @classmethod
    def of(cls, features: torch.Tensor) -> "Statistics":
        """Of features (N, D), N >= 2: the mean and the unbiased covariance."""
        x = features.double().cpu().numpy()
        return cls(x.mean(axis=0), np.cov(x, rowvar=False))


@dataclass(frozen=True)
class Reference:
    """A reference batch: its images (`arr_0`) and/or precomputed statistics (`mu`, `sigma`)."""

    path: Path
    images: NpzImages | None
    statistics: Statistics | None


def _read_statistics(path: Path) -> Statistics:
    try:
        with np.load(path, allow_pickle=False) as arrays:
            mu, sigma = (np.asarray(arrays[key]) for key in STATISTICS_KEYS)
    except (OSError, ValueError, zipfile.BadZipFile) as exc:
        raise NpzError(f"{path}: mu / sigma cannot be read ({exc})") from exc
    if mu.shape != (FEATURE_DIM,) or sigma.shape != (FEATURE_DIM, FEATURE_DIM):
        raise NpzError(f"{path}: mu must be ({FEATURE_DIM},) and sigma ({FEATURE_DIM}, {FEATURE_DIM}) (Inception "
                       f"pool statistics as in the ADM suite's reference batches), got {mu.shape} and {sigma.shape}")
    if not (np.issubdtype(mu.dtype, np.floating) and np.issubdtype(sigma.dtype, np.floating)):
        raise NpzError(f"{path}: mu and sigma must be floating point, got {mu.dtype} and {sigma.dtype}")
    if not (np.isfinite(mu).all() and np.isfinite(sigma).all()):
        raise NpzError(f"{path}: mu or sigma holds non-finite values")
    return Statistics(mu.astype(np.float64), sigma.astype(np.float64))


def read_reference(path: str | Path) -> Reference:
    """A reference .npz of images (`arr_0`, at least 2) and/or statistics (`mu`, `sigma`), checked
    (NpzError naming the file)."""
    path = Path(path)
    keys = npz_keys(path)
    present = [key for key in STATISTICS_KEYS if key in keys]
    if len(present) == 1:
        missing = next(key for key in STATISTICS_KEYS if key not in keys)
        raise NpzError(f"{path}: holds {present[0]} but no {missing} (statistics need both)")
    if not present and IMAGES_KEY not in keys:
        raise NpzError(f"{path}: neither images ({IMAGES_KEY}) nor statistics (mu, sigma); it holds "
                       f"{', '.join(keys) or 'no arrays'}")
    images = NpzImages(path, min_count=2) if IMAGES_KEY in keys else None
    return Reference(path, images, _read_statistics(path) if present else None)


def read_samples(path: str | Path) -> NpzImages:
    """The sample images (`arr_0`, at least 2), checked (NpzError naming the file)."""
    return NpzImages(path, min_count=2)


def _check_weights_file(path: Path) -> None:
    """Load the file as plain tensors first: torch-fidelity unpickles it in full."""
    if not path.is_file():
        raise InceptionError(f"{path}: {'is a folder' if path.is_dir() else 'not found'}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, ValueError) as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise InceptionError(f"{path}: not torch-fidelity's Inception weights (a state dict of tensors): "
                             f"{reason}") from exc
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise InceptionError(f"{path}: not torch-fidelity's Inception weights (a state dict of tensors)")


def load_inception(weights: str | Path | None = None, device: str | torch.device = "cpu") -> torch.nn.Module:
    """torch-fidelity's Inception-v3 feature extractor, returning (pool (B, 2048), logits (B, 1008))
    for uint8 images (B, 3, H, W). `weights`: its weights file (see INCEPTION_WEIGHTS_URL); None
    takes them from torch's hub cache or downloads them there."""
    try:
        from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
    except ImportError as exc:
        raise InceptionError("torch-fidelity is not installed: pip install 'softvq-fast[eval]' "
                             "(or pip install torch-fidelity)") from exc
    if weights is not None:
        _check_weights_file(Path(weights))
    try:
        model = FeatureExtractorInceptionV3("inception-v3-compat", list(INCEPTION_FEATURES),
                                            feature_extractor_weights_path=None if weights is None else str(weights))
    except (urllib.error.URLError, OSError) as exc:
        if weights is not None:
            raise InceptionError(f"{weights}: cannot be read ({exc})") from exc
        raise InceptionError(f"the Inception weights are not in torch's hub cache and cannot be downloaded ({exc}); "
                             f"fetch {INCEPTION_WEIGHTS_URL} and pass the file") from exc
    except RuntimeError as exc:  # load_state_dict: the missing and unexpected keys, misshaped tensors
        source = weights if weights is not None else "the Inception weights in torch's hub cache"
        raise InceptionError(f"{source}: not torch-fidelity's Inception weights: {' '.join(str(exc).split())}") from exc
    return model.to(device)


@torch.inference_mode()
def inception_features(images: NpzImages, model: torch.nn.Module, *, batch_size: int = 64,
                       progress: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(pool (N, 2048), logits (N, 1008)) float32 on the model's device, for the images in file order."""
    device = next(model.parameters()).device
    pools, logits = [], []
    batches = images.batches(batch_size)
    for batch in tqdm(batches, total=math.ceil(len(images) / batch_size), disable=not progress, unit="batch",
                      desc=f"Inception features of {images.path.name}"):
        pool, logit = model(torch.from_numpy(batch).to(device).permute(0, 3, 1, 2))
        pools.append(pool)
        logits.append(logit)
    return torch.cat(pools), torch.cat(logits)


def inception_score(logits: torch.Tensor) -> tuple[float, float, int]:
    """(mean, std, splits) of torch-fidelity's Inception Score over one split per IS_SPLIT_SIZE
    images (at most IS_MAX_SPLITS, at least one)."""
    from torch_fidelity.metric_isc import isc_features_to_metric

    splits = max(1, min(IS_MAX_SPLITS, len(logits) // IS_SPLIT_SIZE))
    score = isc_features_to_metric(logits.cpu(), splits=splits, shuffle=True, rng_seed=IS_SHUFFLE_SEED)
    return score["inception_score_mean"], score["inception_score_std"], splits


def precision_recall(samples: torch.Tensor, reference: torch.Tensor) -> tuple[float, float]:
    """torch-fidelity's improved precision (samples inside the reference manifold) and recall
    (reference inside the samples' manifold), k = PR_NEIGHBORHOOD, computed in row blocks."""
    from torch_fidelity.metric_prc import prc_features_to_metric

    result = prc_features_to_metric(samples, reference, prc_neighborhood=PR_NEIGHBORHOOD, prc_batch_size=PR_BATCH,
                                    save_cpu_ram=True, verbose=False)
    return result["precision"], result["recall"]


@dataclass(frozen=True)
class Scores:
    """What `evaluate` measured; precision and recall are None for a statistics-only reference."""

    fid: float
    inception_score: float
    inception_score_std: float
    inception_score_splits: int
    precision: float | None
    recall: float | None
    num_samples: int
    num_reference: int | None
    reference_statistics: str  # "precomputed" (the file's mu, sigma) or "images"


def evaluate(samples: str | Path, reference: str | Path, *, inception: str | Path | None = None,
             device: str | torch.device | None = None, batch_size: int = 64, progress: bool = False) -> Scores:
    """FID, Inception Score and (for a reference of images) precision/recall of the sample .npz
    against the reference .npz. Both files are checked before the network loads (NpzError naming
    the file); `inception` is torch-fidelity's weights file (see `load_inception`)."""
    sample_images = read_samples(samples)
    ref = read_reference(reference)
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model = load_inception(inception, device)
    sample_pool, sample_logits = inception_features(sample_images, model, batch_size=batch_size, progress=progress)
    ref_pool = None
    if ref.images is not None:
        ref_pool, _ = inception_features(ref.images, model, batch_size=batch_size, progress=progress)
    ref_statistics = ref.statistics or Statistics.of(ref_pool)
    sample_statistics = Statistics.of(sample_pool)
    fid = frechet_distance(sample_statistics.mu, sample_statistics.sigma, ref_statistics.mu, ref_statistics.sigma)
    score, score_std, splits = inception_score(sample_logits)
    precision, recall = precision_recall(sample_pool, ref_pool) if ref_pool is not None else (None, None)
    return Scores(fid, score, score_std, splits, precision, recall, len(sample_images),
                  None if ref.images is None else len(ref.images),
                  "precomputed" if ref.statistics is not None else "images")
