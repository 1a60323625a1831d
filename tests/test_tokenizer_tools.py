"""Reconstruction metrics (against scikit-image), preprocessing (16-bit and float images included)
and `softvq-fast reconstruct` (output names, unreadable images, bad arguments)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from skimage.metrics import peak_signal_noise_ratio, structural_similarity
from support.cli import cli_error
from support.tokenizer_files import save_tiny_tokenizer, write_png16, write_sample_images

from softvq_fast import cli, data, metrics
from softvq_fast.commands.reconstruct import output_names


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


def test_ssim_rejects_small_images():
    with pytest.raises(ValueError, match="at least 11x11"):
        metrics.ssim(torch.zeros(1, 3, 10, 20), torch.zeros(1, 3, 10, 20))


@pytest.mark.parametrize("function", [metrics.psnr, metrics.ssim])
@pytest.mark.parametrize("a,b,expected", [
    (torch.zeros(1, 3, 20, 20), torch.zeros(1, 3, 20, 1), "needs a and b of the same shape, got (1, 3, 20, 20) and (1, 3, 20, 1)"),
    (torch.zeros(3, 20, 20), torch.zeros(3, 20, 20), "a must be a floating (B, C, H, W) tensor in [0, 1], got a torch.float32 tensor of shape (3, 20, 20)"),
    (torch.zeros(1, 3, 20, 20), torch.zeros(1, 3, 20, 20, dtype=torch.uint8), "b must be a floating (B, C, H, W) tensor in [0, 1], got a torch.uint8 tensor"),
    (np.zeros((1, 3, 20, 20)), torch.zeros(1, 3, 20, 20), "a must be a floating (B, C, H, W) tensor in [0, 1], got a ndarray"),
])
def test_metrics_name_the_bad_argument(function, a, b, expected):
    with pytest.raises(ValueError) as failure:
        function(a, b)
    assert str(failure.value).removeprefix(function.__name__).lstrip(": ").startswith(expected)


def test_center_crop_resize_takes_the_middle_square():
    image = np.zeros((20, 60, 3), dtype=np.uint8)
    image[:, 20:40] = 255  # only the central 20x20 square is white
    out = data.center_crop_resize(Image.fromarray(image), 8)
    assert out.size == (8, 8)
    assert np.asarray(out).min() == 255
    x = data.image_to_tensor(out)
    assert x.shape == (3, 8, 8) and x.min() == 1.0
    assert np.array_equal(np.asarray(data.tensor_to_image(x)), np.asarray(out))
    with pytest.raises(ValueError, match="size must be at least 1, got 0"):
        data.center_crop_resize(Image.fromarray(image), 0)


def _gradient16(height=48, width=64) -> np.ndarray:
    """uint16 values over the whole 0..65535 range, no two rows alike."""
    ramp = np.linspace(0, 65535, height * width).reshape(height, width)
    return np.round(ramp).astype(np.uint16)


def test_16_bit_grayscale_files_are_scaled_not_clipped(tmp_path):
    pixels = _gradient16()
    as_8_bit = np.round(pixels / 257).astype(np.uint8)
    Image.fromarray(as_8_bit).save(tmp_path / "8.png")
    Image.fromarray(pixels).save(tmp_path / "pillow16.png")  # Pillow writes mode I;16 as a 16-bit PNG
    write_png16(tmp_path / "hand16.png", pixels)
    with Image.open(tmp_path / "pillow16.png") as image:
        assert image.mode in ("I;16", "I")  # by Pillow version
    expected = data.load_image(tmp_path / "8.png", 32)
    for name in ("pillow16.png", "hand16.png"):
        assert torch.equal(data.load_image(tmp_path / name, 32), expected), name


def test_16_bit_rgb_png_reads_as_its_8_bit_image(tmp_path):
    pixels = np.stack([_gradient16(), _gradient16()[::-1], _gradient16()[:, ::-1]], axis=-1)
    write_png16(tmp_path / "rgb16.png", pixels)
    Image.fromarray(np.round(pixels / 257).astype(np.uint8)).save(tmp_path / "rgb8.png")
    difference = data.load_image(tmp_path / "rgb16.png", 32) - data.load_image(tmp_path / "rgb8.png", 32)
    assert difference.abs().max() <= 2 / 127.5  # Pillow keeps the high byte; rounding differs by one level


@pytest.mark.parametrize("mode,white", [("I;16B", 65535), ("I", 65535), ("F", 1.0)])
def test_deep_one_channel_modes_are_scaled(mode, white):
    pixels = _gradient16().astype(np.float64) / 65535
    expected = data.center_crop_resize(Image.fromarray(np.round(pixels * 255).astype(np.uint8)), 16)
    deep = np.round(pixels * white) if white > 1 else pixels
    image = Image.fromarray(deep.astype({"I;16B": ">u2", "I": np.int32, "F": np.float32}[mode]))
    assert image.mode == mode
    assert np.array_equal(np.asarray(data.center_crop_resize(image, 16)), np.asarray(expected))


@pytest.mark.parametrize("values,mode", [(np.array([[0, 70000]], np.int32), "I"), (np.array([[-1, 0.5]], np.float32), "F"),
                                         (np.array([[np.nan, 0.5]], np.float32), "F")])
def test_deep_images_out_of_range_are_refused(values, mode):
    image = Image.fromarray(values)
    assert image.mode == mode
    with pytest.raises(ValueError, match=f"mode {mode} image with values in \\[.*\\], expected \\[0, "):
        data.to_rgb(image)


def test_output_names_are_distinct_and_keep_plain_stems():
    paths = [Path("a.png"), Path("x/a.jpg"), Path("y/A.png"), Path("a-1.png"), Path("b.png")]
    assert output_names(paths) == ["a-2_reconstruction.png", "a-3_reconstruction.png", "A-4_reconstruction.png",
                                   "a-1_reconstruction.png", "b_reconstruction.png"]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    root = tmp_path_factory.mktemp("reconstruct")
    model = save_tiny_tokenizer(root / "model")
    return root, model, write_sample_images(root / "images")


def _reconstruct(root, paths, out, *extra) -> list[str]:
    argv = ["reconstruct", "--model", str(root / "model"), *map(str, paths), "--out", str(out), "--device", "cpu",
            "--batch-size", "1", *extra]
    assert cli.main(argv) == 0
    return argv


def test_reconstruct_command(tokenizer, tmp_path, capsys):
    root, model, images = tokenizer
    paths = images[:2]
    _reconstruct(root, paths, tmp_path)
    lines = capsys.readouterr().out.strip().splitlines()
    rows = {line.split()[0]: [float(v) for v in line.split()[1:3]] for line in lines[1:]}
    originals = torch.stack([data.load_image(p, 32) for p in paths])
    with torch.no_grad():
        recon = model.decode(model.encode(originals)).clamp(-1, 1)
    expected_psnr = metrics.psnr((originals + 1) / 2, (recon + 1) / 2)
    for path, value in zip(paths, expected_psnr):
        assert rows[str(path)][0] == pytest.approx(value.item(), abs=0.01)
        side_by_side = Image.open(tmp_path / f"{path.stem}_reconstruction.png")
        assert side_by_side.size == (64, 32)
    assert rows["average"][0] == pytest.approx(expected_psnr.mean().item(), abs=0.01)


def test_reconstruct_keeps_every_output_when_stems_repeat(tokenizer, tmp_path):
    root, _, images = tokenizer
    (tmp_path / "x").mkdir()
    sources = {"a.png": images[0], "a.jpg": images[2], "x/a.png": images[1]}
    for name, source in sources.items():
        Image.open(source).save(tmp_path / name)
    paths = [tmp_path / name for name in sources]
    _reconstruct(root, paths, tmp_path / "out")
    outputs = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert outputs == ["a-1_reconstruction.png", "a-2_reconstruction.png", "a-3_reconstruction.png"]
    for path, name in zip(paths, output_names(paths)):
        left = np.asarray(Image.open(tmp_path / "out" / name))[:, :32]
        assert np.array_equal(left, np.asarray(data.tensor_to_image(data.load_image(path, 32))))


@pytest.fixture
def bad_inputs(tokenizer, tmp_path):
    root, _, images = tokenizer
    (tmp_path / "broken.png").write_bytes(b"not an image")
    (tmp_path / "a_file").write_bytes(b"x")
    (tmp_path / "folder.png").mkdir()
    return root, images[0], tmp_path


BAD_RECONSTRUCT = [
    (["{tmp}/nope.png"], [], "IMAGE: not found: {tmp}/nope.png"),
    (["{tmp}/folder.png"], [], "IMAGE: not a file: {tmp}/folder.png"),
    (["{good}", "{good}"], [], "IMAGE: given more than once: {good}"),
    (["{good}", "{tmp}/broken.png"], [], "IMAGE: cannot read {tmp}/broken.png (UnidentifiedImageError: "),
    (["{good}"], ["--out", "{tmp}/a_file"], "--out: {tmp}/a_file exists and is not a folder"),
    (["{good}"], ["--model", "{tmp}"], "--model: {tmp}/config.json: not found"),
    (["{good}"], ["--batch-size", "0"], "argument --batch-size: expected an integer >= 1, got '0'"),
    (["{good}"], ["--device", "cuda:99"], "--device: cuda:99 is not usable here ("),
    (["{good}"], ["--device", "nonsense"], "argument --device: expected a torch device"),
]


@pytest.mark.parametrize("images,extra,expected", BAD_RECONSTRUCT, ids=range(len(BAD_RECONSTRUCT)))
def test_reconstruct_bad_input_fails_before_writing_naming_it(bad_inputs, capsys, images, extra, expected):
    root, good, tmp = bad_inputs
    fill = {"tmp": tmp, "good": good}
    argv = ["reconstruct", "--model", str(root / "model"), "--out", str(tmp / "out"), "--device", "cpu",
            *[a.format(**fill) for a in extra], *[i.format(**fill) for i in images]]
    assert cli_error(argv, capsys).startswith(expected.format(**fill))
    assert not (tmp / "out").exists()
