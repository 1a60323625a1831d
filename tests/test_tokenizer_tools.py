"""Reconstruction metrics (against scikit-image), preprocessing and `softvq-fast reconstruct`."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from skimage.metrics import peak_signal_noise_ratio, structural_similarity
from support.tokenizer_files import save_tiny_tokenizer, write_sample_images

from softvq_fast import cli, data, metrics


@pytest.mark.parametrize("shape", [(3, 40, 57), (1, 23, 31), (3, 11, 11)])
def test_ssim_and_psnr_match_skimage(shape):
    rng = np.random.default_rng(sum(shape))
    a = rng.random(shape)
    b = np.clip(a + rng.normal(0, 0.15, shape), 0, 1)
    expected_ssim = structural_similarity(a, b, gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
                                          data_range=1.0, channel_axis=0)
    ta, tb = torch.from_numpy(a)[None], torch.from_numpy(b)[None]
    assert metrics.ssim(ta, tb).item() == pytest.approx(expected_ssim, rel=1e-9)
    assert metrics.psnr(ta, tb).item() == pytest.approx(peak_signal_noise_ratio(a, b, data_range=1.0), rel=1e-9)
    assert metrics.ssim(ta, ta).item() == pytest.approx(1.0)


def test_ssim_rejects_small_or_mismatched_images():
    with pytest.raises(ValueError, match="at least 11x11"):
        metrics.ssim(torch.zeros(1, 3, 10, 20), torch.zeros(1, 3, 10, 20))
    with pytest.raises(ValueError, match="same shape"):
        metrics.ssim(torch.zeros(1, 3, 20, 20), torch.zeros(1, 3, 20, 21))


def test_center_crop_resize_takes_the_middle_square():
    image = np.zeros((20, 60, 3), dtype=np.uint8)
    image[:, 20:40] = 255  # only the central 20x20 square is white
    out = data.center_crop_resize(Image.fromarray(image), 8)
    assert out.size == (8, 8)
    assert np.asarray(out).min() == 255
    x = data.image_to_tensor(out)
    assert x.shape == (3, 8, 8) and x.min() == 1.0
    assert np.array_equal(np.asarray(data.tensor_to_image(x)), np.asarray(out))


def test_reconstruct_command(tmp_path, capsys):
    model = save_tiny_tokenizer(tmp_path / "model")
    paths = write_sample_images(tmp_path / "images")[:2]
    out = tmp_path / "out"
    assert cli.main(["reconstruct", "--model", str(tmp_path / "model"), *map(str, paths), "--out", str(out),
                     "--device", "cpu", "--batch-size", "1"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    rows = {line.split()[0]: [float(v) for v in line.split()[1:3]] for line in lines[1:]}
    originals = torch.stack([data.load_image(p, 32) for p in paths])
    with torch.no_grad():
        recon = model.decode(model.encode(originals)).clamp(-1, 1)
    expected_psnr = metrics.psnr((originals + 1) / 2, (recon + 1) / 2)
    for path, value in zip(paths, expected_psnr):
        assert rows[path.name][0] == pytest.approx(value.item(), abs=0.01)
        side_by_side = Image.open(out / f"{path.stem}_reconstruction.png")
        assert side_by_side.size == (64, 32)
    assert rows["average"][0] == pytest.approx(expected_psnr.mean().item(), abs=0.01)


def test_reconstruct_names_missing_image(tmp_path):
    save_tiny_tokenizer(tmp_path / "model")
    with pytest.raises(SystemExit, match="IMAGE: not found: .*nope.png"):
        cli.main(["reconstruct", "--model", str(tmp_path / "model"), str(tmp_path / "nope.png")])
