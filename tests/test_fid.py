"""`softvq-fast fid` and softvq_fast.evaluation.fid: the Fréchet distance against scipy and in closed
form; the whole path on a random-weight Inception saved in torch-fidelity's own file format,
against torch-fidelity's own pipeline; reference batches of precomputed statistics; bad input."""
from __future__ import annotations

import json
import math
import urllib.error
from pathlib import Path

import numpy as np
import pytest
import scipy.linalg
import torch
from support.cli import cli_error

from softvq_fast import cli
from softvq_fast.evaluation import fid

torch_fidelity = pytest.importorskip("torch_fidelity")
from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3  # noqa: E402


# ------------------------------------------------------------------------------ Fréchet distance
def _scipy_frechet(mu1, sigma1, mu2, sigma2) -> float:
    """The textbook formula with scipy's matrix square root, its rounding's imaginary part dropped."""
    covmean = scipy.linalg.sqrtm(sigma1 @ sigma2).real
    return float((mu1 - mu2) @ (mu1 - mu2) + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


def _spd(rng: np.random.Generator, dim: int, rank: int | None = None) -> np.ndarray:
    factor = rng.standard_normal((dim, rank or 2 * dim))
    return factor @ factor.T / factor.shape[1]


def test_frechet_distance_matches_scipy_on_full_rank_gaussians(seed):
    rng = np.random.default_rng(seed)
    for dim in (3, 24, 97):
        mu1, mu2 = rng.standard_normal(dim), rng.standard_normal(dim)
        sigma1, sigma2 = _spd(rng, dim), 2.0 * _spd(rng, dim)
        expected = _scipy_frechet(mu1, sigma1, mu2, sigma2)
        assert fid.frechet_distance(mu1, sigma1, mu2, sigma2) == pytest.approx(expected, rel=1e-9)
        assert fid.frechet_distance(mu1.astype(np.float32), sigma1.astype(np.float32), mu2, sigma2) == pytest.approx(
            expected, rel=1e-5)


def test_frechet_distance_in_closed_form(seed):
    rng = np.random.default_rng(seed)
    dim = 64
    mu1, mu2 = rng.standard_normal(dim), rng.standard_normal(dim)
    # Equal covariances (full rank, then of fewer samples than dimensions, singular): ||mu1 - mu2||².
    for sigma in (_spd(rng, dim), _spd(rng, dim, rank=10)):
        assert fid.frechet_distance(mu1, sigma, mu2, sigma) == pytest.approx(np.sum((mu1 - mu2) ** 2), rel=1e-9)
    # Commuting (diagonal) covariances, half their variances zero: sum (sqrt(a) - sqrt(b))² + ||mu1 - mu2||².
    a, b = rng.uniform(0.5, 2.0, dim), rng.uniform(0.5, 2.0, dim)
    a[::2] = 0.0
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    assert fid.frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(expected, rel=1e-9)
    assert fid.frechet_distance(mu1, np.diag(a), mu1, np.diag(a)) == pytest.approx(0.0, abs=1e-9)


# ------------------------------------------------------------------------------ files and Inception
def _images(rng: np.random.Generator, count: int, height: int, width: int) -> np.ndarray:
    """Smooth random colour fields plus noise: images that differ in structure, not only in pixels."""
    base = rng.uniform(0, 255, (count, 1, 1, 3))
    ramp = np.linspace(-60, 60, width)[None, None, :, None] * rng.uniform(-1, 1, (count, 1, 1, 3))
    rows = np.linspace(-60, 60, height)[None, :, None, None] * rng.uniform(-1, 1, (count, 1, 1, 3))
    noise = rng.normal(0, 20, (count, height, width, 3))
    return np.clip(base + ramp + rows + noise, 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def inception_file(tmp_path_factory) -> Path:
    """Random Inception weights in torch-fidelity's file format: a plain state dict of tensors with
    the keys of its converted TensorFlow weights (no BatchNorm num_batches_tracked). He-scaled
    convolutions keep the features image-dependent; a wide classifier spreads the logits."""
    from unittest import mock

    import torch_fidelity.feature_extractor_inceptionv3 as module

    with mock.patch.object(module, "load_state_dict_from_url", lambda *a, **k: {}), \
         mock.patch.object(FeatureExtractorInceptionV3, "load_state_dict", lambda self, state: None):
        network = FeatureExtractorInceptionV3("inception-v3-compat", ["2048"])
    generator = torch.Generator().manual_seed(0)
    state = {}
    for name, tensor in network.state_dict().items():
        if name.endswith("num_batches_tracked"):
            continue
        if tensor.dim() == 4:
            tensor = torch.randn(tensor.shape, generator=generator) * math.sqrt(2.0 / tensor[0].numel())
        elif name == "fc.weight":
            tensor = torch.randn(tensor.shape, generator=generator) * 3.0
        state[name] = tensor.clone()
    path = tmp_path_factory.mktemp("inception") / "weights-inception-2015-12-05-6726825d.pth"
    torch.save(state, path)
    return path


class _ImageDataset(torch.utils.data.Dataset):
    """What torch-fidelity takes: uint8 (3, H, W) tensors."""

    def __init__(self, images: np.ndarray) -> None:
        self.images = images

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> torch.Tensor:
        return torch.from_numpy(self.images[index]).permute(2, 0, 1).contiguous()


def _frechet_from_features(a: torch.Tensor, b: torch.Tensor) -> float:
    """FID of two feature sets by another road than eigenvalues of covariances: with S = BᵀB for
    the centred features B / sqrt(n - 1), tr((S1 S2)^½) is the sum of the singular values of
    B1 B2ᵀ (n1 x n2), exact however few the samples."""
    b1, b2 = ((x.double() - x.double().mean(0)) / math.sqrt(len(x) - 1) for x in (a, b))
    diff = a.double().mean(0) - b.double().mean(0)
    nuclear = torch.linalg.svdvals(b1 @ b2.T).sum()
    return float(diff @ diff + b1.square().sum() + b2.square().sum() - 2 * nuclear)


def test_fid_command_matches_torch_fidelity_on_its_own_weights_file(inception_file, tmp_path, seed, capsys,
                                                                   monkeypatch):
    # The network resizes its input to 75 px instead of 299 (its smallest), in both pipelines
    # alike: 16 times less work, and none of our code in between changes.
    monkeypatch.setattr(FeatureExtractorInceptionV3, "INPUT_IMAGE_SIZE", 75)
    rng = np.random.default_rng(seed)
    samples, reference = _images(rng, 4, 24, 20), _images(rng, 5, 32, 32)  # not square: H and W stay apart
    np.savez(tmp_path / "samples.npz", samples)
    np.savez(tmp_path / "reference.npz", reference)
    out = tmp_path / "scores.json"
    assert cli.main(["fid", str(tmp_path / "samples.npz"), str(tmp_path / "reference.npz"), "--inception",
                     str(inception_file), "--device", "cpu", "--batch", "3", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    scores = json.loads(out.read_text())
    # Inception Score and precision/recall: torch-fidelity's own pipeline from the images.
    expected = torch_fidelity.calculate_metrics(
        input1=_ImageDataset(samples), input2=_ImageDataset(reference), cuda=False, isc=True, prc=True,
        feature_extractor="inception-v3-compat", feature_layer_prc="2048",
        feature_extractor_weights_path=str(inception_file), isc_splits=1, cache=False, verbose=False,
        save_cpu_ram=True,  # no DataLoader worker processes
    )
    assert scores["inception_score"] > 1.01  # the logits differ between images: the check below can fail
    assert scores["inception_score"] == pytest.approx(expected["inception_score_mean"], rel=1e-6)
    assert (scores["precision"], scores["recall"]) == (expected["precision"], expected["recall"])
    # FID: the library's network on the (3, H, W) images, then the distance by singular values.
    network = FeatureExtractorInceptionV3("inception-v3-compat", ["2048"],
                                          feature_extractor_weights_path=str(inception_file))
    with torch.no_grad():
        features = [network(torch.stack([item for item in _ImageDataset(x)]))[0] for x in (samples, reference)]
    assert scores["fid"] == pytest.approx(_frechet_from_features(*features), rel=1e-6)
    assert scores["num_samples"] == 4 and scores["num_reference"] == 5 and scores["reference_statistics"] == "images"
    assert f"FID: {scores['fid']:.4f}" in printed and "Precision:" in printed


COLOUR_FEATURES = 16


class _ColourFeatures(torch.nn.Module):
    """A cheap stand-in for the Inception: 16 pool features, a fixed random map of each image's
    mean colour, and 10 logits, a fixed map of those."""

    def __init__(self) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(1)
        self.pool = torch.nn.Parameter(torch.randn(3, COLOUR_FEATURES, generator=generator) / 50)
        self.head = torch.nn.Parameter(torch.randn(COLOUR_FEATURES, 10, generator=generator))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        assert x.dtype == torch.uint8 and x.shape[1] == 3
        pool = x.float().mean((2, 3)) @ self.pool
        return pool, pool @ self.head


@pytest.fixture
def colour_sets(tmp_path, monkeypatch):
    """Samples of nearly one colour and a reference spread over many, so that precision (1) and
    recall (below 1) differ; the stand-in network replaces the Inception."""
    monkeypatch.setattr(fid, "load_inception", lambda weights=None, device="cpu": _ColourFeatures())
    monkeypatch.setattr(fid, "FEATURE_DIM", COLOUR_FEATURES)  # what reference statistics must match
    rng = np.random.default_rng(3)
    samples = np.clip(rng.normal(128, 4, (12, 1, 1, 3)) + np.zeros((12, 8, 8, 3)), 0, 255).astype(np.uint8)
    reference = rng.uniform(0, 255, (10, 1, 1, 3)).astype(np.uint8) + np.zeros((10, 8, 8, 3), np.uint8)
    features = {name: _ColourFeatures()(torch.from_numpy(x).permute(0, 3, 1, 2))[0].detach()
                for name, x in (("samples", samples), ("reference", reference))}
    np.savez(tmp_path / "samples.npz", samples)
    return tmp_path, reference, features


def test_a_reference_of_statistics_is_used_as_given(colour_sets):
    folder, reference, features = colour_sets
    ref_stats = fid.Statistics.of(features["reference"])
    mu, sigma = ref_stats.mu + 0.5, 2.0 * ref_stats.sigma  # not the images' statistics
    np.savez(folder / "both.npz", reference, mu=mu, sigma=sigma)  # as the ADM suite's reference batches
    np.savez(folder / "stats.npz", mu=mu, sigma=sigma)
    sample_stats = fid.Statistics.of(features["samples"])
    expected_fid = fid.frechet_distance(sample_stats.mu, sample_stats.sigma, mu, sigma)
    from torch_fidelity.metric_prc import prc_features_to_metric

    expected_pr = prc_features_to_metric(features["samples"], features["reference"], prc_neighborhood=3)
    assert expected_pr["precision"] == 1.0 and expected_pr["recall"] < 1.0  # tells the two apart
    both = fid.evaluate(folder / "samples.npz", folder / "both.npz", device="cpu")
    assert both.fid == pytest.approx(expected_fid, rel=1e-6) and both.reference_statistics == "precomputed"
    assert (both.precision, both.recall) == (expected_pr["precision"], expected_pr["recall"])
    stats_only = fid.evaluate(folder / "samples.npz", folder / "stats.npz", device="cpu")
    assert stats_only.fid == pytest.approx(expected_fid, rel=1e-6)
    assert stats_only.precision is None and stats_only.recall is None and stats_only.num_reference is None


def test_inception_score_splits_follow_the_sample_count():
    logits = torch.randn(12000, 10)
    assert fid.inception_score(logits)[2] == 2
    assert fid.inception_score(logits[:4999])[2] == 1
    assert fid.inception_score(torch.randn(50000, 2))[2] == 10


# ------------------------------------------------------------------------------ bad input
def _write_bad_files(folder: Path) -> None:
    rng = np.random.default_rng(0)
    np.savez(folder / "good.npz", rng.integers(0, 255, (3, 8, 8, 3), dtype=np.uint8))
    np.savez(folder / "float.npz", rng.uniform(0, 1, (3, 8, 8, 3)))
    np.savez(folder / "chw.npz", rng.integers(0, 255, (3, 3, 8, 8), dtype=np.uint8))
    np.savez(folder / "one.npz", rng.integers(0, 255, (1, 8, 8, 3), dtype=np.uint8))
    np.savez(folder / "mu_only.npz", mu=np.zeros(2048))
    np.savez(folder / "other.npz", labels=np.zeros(3))
    np.savez(folder / "small_mu.npz", mu=np.zeros(64), sigma=np.eye(64))
    np.savez(folder / "swapped.npz", mu=np.eye(2048), sigma=np.zeros(2048))
    np.savez(folder / "nan_sigma.npz", mu=np.zeros(2048), sigma=np.full((2048, 2048), np.nan))
    (folder / "text.npz").write_text("not a zip")
    (folder / "folder").mkdir()
    (folder / "garbage.pth").write_bytes(b"\x80\x04not a pickle of tensors")


@pytest.mark.parametrize("samples, reference, message", [
    ("missing.npz", "good.npz", "argument SAMPLES: '{tmp}/missing.npz' does not exist"),
    ("good.npz", "folder", "argument REFERENCE: '{tmp}/folder' is a folder"),
    ("text.npz", "good.npz", "argument SAMPLES: {tmp}/text.npz: not an .npz file"),
    ("float.npz", "good.npz", "argument SAMPLES: {tmp}/float.npz: arr_0 must be images (N, H, W, 3) uint8 as the ADM "
                              "suite reads them, got (3, 8, 8, 3) float64"),
    ("chw.npz", "good.npz", "argument SAMPLES: {tmp}/chw.npz: arr_0 must be images (N, H, W, 3) uint8 as the ADM "
                            "suite reads them, got (3, 3, 8, 8) uint8"),
    ("one.npz", "good.npz", "argument SAMPLES: {tmp}/one.npz: arr_0 holds 1 images of 8 x 8; at least 2"),
    ("mu_only.npz", "good.npz", "argument SAMPLES: {tmp}/mu_only.npz: no arr_0 image array (it holds mu)"),
    ("good.npz", "one.npz", "argument REFERENCE: {tmp}/one.npz: arr_0 holds 1 images"),
    ("good.npz", "mu_only.npz", "argument REFERENCE: {tmp}/mu_only.npz: holds mu but no sigma"),
    ("good.npz", "other.npz", "argument REFERENCE: {tmp}/other.npz: neither images (arr_0) nor statistics (mu, "
                              "sigma); it holds labels"),
    ("good.npz", "small_mu.npz", "argument REFERENCE: {tmp}/small_mu.npz: mu must be (2048,) and sigma (2048, 2048)"),
    ("good.npz", "swapped.npz", "argument REFERENCE: {tmp}/swapped.npz: mu must be (2048,) and sigma (2048, 2048) "
                                "(Inception pool statistics as in the ADM suite's reference batches), got (2048, 2048) "
                                "and (2048,)"),
    ("good.npz", "nan_sigma.npz", "argument REFERENCE: {tmp}/nan_sigma.npz: mu or sigma holds non-finite values"),
])
def test_bad_files_are_named_before_the_network_loads(tmp_path, monkeypatch, capsys, samples, reference, message):
    _write_bad_files(tmp_path)
    monkeypatch.setattr(fid, "load_inception", lambda *a, **k: pytest.fail("the network was loaded"))
    error = cli_error(["fid", str(tmp_path / samples), str(tmp_path / reference)], capsys)
    assert error.startswith(message.format(tmp=tmp_path)), error


def test_bad_inception_weights_are_named(tmp_path, inception_file, monkeypatch, capsys):
    _write_bad_files(tmp_path)
    files = [str(tmp_path / "good.npz")] * 2
    assert cli_error(["fid", *files, "--inception", str(tmp_path / "none.pth")], capsys) == (
        f"argument --inception: '{tmp_path}/none.pth' does not exist")
    error = cli_error(["fid", *files, "--inception", str(tmp_path / "garbage.pth")], capsys)
    assert error.startswith(f"--inception: {tmp_path}/garbage.pth: not torch-fidelity's Inception weights"), error
    state = torch.load(inception_file, weights_only=True)
    state.pop("fc.bias")
    torch.save({**state, "fc.extra": torch.zeros(1)}, tmp_path / "keys.pth")
    error = cli_error(["fid", *files, "--inception", str(tmp_path / "keys.pth")], capsys)
    assert 'Missing key(s) in state_dict: "fc.bias"' in error and 'Unexpected key(s) in state_dict: "fc.extra"' in error

    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr("torch_fidelity.feature_extractor_inceptionv3.load_state_dict_from_url", offline)
    error = cli_error(["fid", *files], capsys)
    assert error == (f"--inception: the Inception weights are not in torch's hub cache and cannot be downloaded "
                     f"(<urlopen error no network>); fetch {fid.INCEPTION_WEIGHTS_URL} and pass the file")
