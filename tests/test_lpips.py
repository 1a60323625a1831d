"""LPIPS-VGG against the `lpips` package on the same (random) VGG16 weights, and the loading
of VGG16 and of the linear heads."""
from __future__ import annotations

import importlib.util
import warnings

import pytest
import torch
from safetensors.torch import save_file

from softvq_fast.training.frozen import FrozenWeightsError, load_vgg16
from softvq_fast.training.lpips import LPIPS, load_lpips_heads, lpips_heads_file
from support.numerics import rel_err

lpips = pytest.importorskip("lpips")
torchvision = pytest.importorskip("torchvision")

FP32 = 1e-5


@pytest.fixture(scope="module")
def vgg_state() -> dict[str, torch.Tensor]:
    """torchvision's vgg16 `features` with random weights (torchvision's initialisation, biases
    made random too), in its state-dict layout, plus classifier keys a loader must ignore."""
    with torch.random.fork_rng():
        torch.manual_seed(16)
        features = torchvision.models.vgg.make_layers(torchvision.models.vgg.cfgs["D"])
        for layer in features:
            if isinstance(layer, torch.nn.Conv2d):
                torch.nn.init.kaiming_normal_(layer.weight, mode="fan_out", nonlinearity="relu")
                torch.nn.init.normal_(layer.bias, std=0.1)
    state = {f"features.{k}": v for k, v in features.state_dict().items()}
    state["classifier.0.weight"] = torch.zeros(4, 8)
    return state


@pytest.fixture(scope="module")
def vgg_file(vgg_state, tmp_path_factory):
    path = tmp_path_factory.mktemp("vgg") / "vgg16.pth"
    torch.save(vgg_state, path)
    return path


@pytest.fixture(scope="module")
def package_lpips(vgg_state):
    """The lpips package's LPIPS-VGG (v0.1 heads from its wheel) with the same VGG weights."""
    with warnings.catch_warnings():  # the package passes torchvision its deprecated `pretrained`
        warnings.simplefilter("ignore", UserWarning)
        model = lpips.LPIPS(net="vgg", pretrained=True, pnet_rand=True, verbose=False).eval()
    for index in range(1, 6):
        for name, layer in getattr(model.net, f"slice{index}").named_children():
            if isinstance(layer, torch.nn.Conv2d):
                layer.load_state_dict({"weight": vgg_state[f"features.{name}.weight"], "bias": vgg_state[f"features.{name}.bias"]})
    return model


@pytest.fixture(scope="module")
def ours(vgg_file) -> LPIPS:
    return LPIPS.from_files(vgg_file)


@pytest.mark.parametrize("backend", ["auto", "reference"])
def test_lpips_matches_the_package(ours, package_lpips, backend, monkeypatch):
    monkeypatch.setenv("SOFTVQ_FAST_LPIPS_DISTANCE_BACKEND", backend)
    # Not square, and not a multiple of 16: the pools floor (relu5_3 is 1 x 2).
    x = (torch.rand(2, 3, 23, 34) * 2 - 1).requires_grad_(True)
    y = (x.detach() + 0.3 * torch.randn_like(x)).clamp(-1, 1).requires_grad_(True)
    distance = ours(x, y)
    expected = package_lpips(x, y).flatten()
    assert distance.shape == (2,)
    assert rel_err(distance, expected) <= FP32
    grad_out = torch.rand(2)
    grads = torch.autograd.grad(distance, (x, y), grad_out)
    expected_grads = torch.autograd.grad(expected, (x, y), grad_out)
    for grad, expected_grad in zip(grads, expected_grads):
        assert rel_err(grad, expected_grad) <= FP32


def test_lpips_under_bf16_autocast(ours):
    """The VGG features come out in bfloat16 while the heads stay float32: the distance is the
    float32 one to bf16 accuracy."""
    x = (torch.rand(2, 3, 21, 30) * 2 - 1).requires_grad_(True)
    y = (x.detach() + 0.3 * torch.randn_like(x)).clamp(-1, 1)
    expected = ours(x, y)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        distance = ours(x, y)
    assert distance.dtype == torch.float32 and rel_err(distance, expected) <= 1e-2
    (grad,) = torch.autograd.grad(distance.sum(), x)
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0


def test_lpips_is_frozen(ours):
    model = ours
    assert not any(p.requires_grad for p in model.parameters())
    assert not model.train().training and not model.vgg.training
    x = torch.rand(1, 3, 16, 16, requires_grad=True)
    model(x, torch.zeros(1, 3, 16, 16)).sum().backward()
    assert x.grad.abs().sum() > 0 and all(p.grad is None for p in model.parameters())


def test_heads_come_from_the_package_or_a_given_file(tmp_path):
    heads = load_lpips_heads()
    assert [tuple(h.shape) for h in heads] == [(1, c, 1, 1) for c in (64, 128, 256, 512, 512)]
    state = torch.load(lpips_heads_file(), map_location="cpu", weights_only=True)
    assert all(torch.equal(h, state[f"lin{k}.model.1.weight"]) for k, h in enumerate(heads))
    save_file({f"lin{k}.model.1.weight": h * 2 for k, h in enumerate(heads)}, str(tmp_path / "heads.safetensors"))
    assert all(torch.equal(a, b * 2) for a, b in zip(load_lpips_heads(tmp_path / "heads.safetensors"), heads))


def test_wrong_files_name_the_file_and_the_expected_layout(vgg_state, tmp_path, monkeypatch):
    alex = lpips_heads_file().with_name("alex.pth")
    with pytest.raises(FrozenWeightsError, match=r"alex\.pth: not the lpips v0\.1 VGG linear heads .*lin1\.model\.1\.weight \(1, 192, 1, 1\) \(expected \(1, 128, 1, 1\)\)"):
        load_lpips_heads(alex)
    partial = {k: v for k, v in vgg_state.items() if k != "features.28.bias"}
    torch.save(partial, tmp_path / "partial.pth")
    with pytest.raises(FrozenWeightsError, match=r"partial\.pth: not torchvision's vgg16 .*missing keys \(1\): features\.28\.bias"):
        load_vgg16(tmp_path / "partial.pth")
    (tmp_path / "damaged.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{broken")
    with pytest.raises(FrozenWeightsError, match=r"damaged\.safetensors: cannot be read as a weights file"):
        load_vgg16(tmp_path / "damaged.safetensors")
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FrozenWeightsError, match=r"pip install lpips"):
        load_lpips_heads()
