"""The DINO discriminator against the authors' logits (random weights, 3 DINO blocks, a tap after
block 2), and its parts (spectral norm, synchronised batch norm) against float64 evaluations."""
from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file
from torch.nn import functional as F

from softvq_fast.training.discriminator import DinoDiscriminator, SpectralNormConv1d, SyncBatchNorm1d
from softvq_fast.training.frozen import load_dino_vits16
from softvq_fast.training.tokenizer_losses import LeCAMEMA
from support.numerics import rel_err

FP32 = 1e-5
FOLDER = "vectors/training/dino_discriminator"


@pytest.fixture(scope="module")
def vectors(reference_dir) -> dict:
    folder = reference_dir / FOLDER
    return {
        "dino": folder / "dino_vits16_random.safetensors",
        "heads": {k: v.float() if v.is_floating_point() else v for k, v in load_file(folder / "heads.safetensors").items()},
        **load_file(folder / "expected.safetensors"),
    }


def _authors_discriminator(vectors: dict) -> DinoDiscriminator:
    discriminator = DinoDiscriminator.from_file(vectors["dino"], taps=(2,))
    discriminator.load_state_dict(vectors["heads"])
    return discriminator


def test_eval_logits_match_the_authors(vectors):
    discriminator = _authors_discriminator(vectors).eval()
    with torch.no_grad():
        assert rel_err(discriminator(vectors["images_224"]), vectors["logits_224"]) <= FP32
        discriminator.crop_probability = 0.0  # 256 px: the resize ("area") branch
        assert rel_err(discriminator(vectors["images_256_area"]), vectors["logits_256_area"]) <= FP32
    assert torch.equal(discriminator.heads[0][0][0].weight_u, vectors["heads"]["heads.0.0.0.weight_u"])


def test_train_logits_use_batch_statistics_and_one_power_iteration(vectors):
    discriminator = _authors_discriminator(vectors).train()
    with torch.no_grad():
        logits = discriminator(vectors["images_224"])
    assert rel_err(logits, vectors["logits_224_train"]) <= FP32
    state = discriminator.state_dict()
    assert not torch.equal(state["heads.1.1.fn.0.weight_v"], vectors["heads"]["heads.1.1.fn.0.weight_v"])
    assert int(state["heads.0.0.1.num_batches_tracked"]) == int(vectors["heads"]["heads.0.0.1.num_batches_tracked"]) + 1


def test_key_bias_is_zeroed_when_the_dino_weights_load(vectors):
    stored = load_dino_vits16(vectors["dino"], depth=3)
    discriminator = DinoDiscriminator.from_file(vectors["dino"], taps=(2,))
    for block, original in zip(discriminator.dino.blocks, stored.blocks):
        q, k, v = block.attn.qkv.bias.chunk(3)
        q0, k0, v0 = original.attn.qkv.bias.chunk(3)
        assert torch.equal(q, q0) and torch.equal(v, v0) and k0.abs().sum() > 0
        assert not k.any()


def test_only_the_heads_are_trainable_state(vectors):
    discriminator = _authors_discriminator(vectors)
    assert set(discriminator.state_dict()) == set(vectors["heads"])
    names = {name for name, _ in discriminator.named_parameters()}
    assert all(name.startswith("heads.") for name in names) and len(names) == 2 * (4 + 4 + 2)
    discriminator.train()
    dino = discriminator.dino
    assert not dino.training and not any(p.requires_grad for p in dino.parameters())
    images = vectors["images_224"][:1].clone().requires_grad_(True)
    discriminator(images).mean().backward()
    assert images.grad.abs().sum() > 0
    assert all(p.grad is not None for p in discriminator.parameters())
    assert all(p.grad is None for p in dino.parameters())


def test_random_crop_is_drawn_from_the_generator(vectors):
    discriminator = _authors_discriminator(vectors).eval()
    discriminator.crop_probability = 1.0
    images = torch.rand(1, 3, 240, 236) * 2 - 1
    draws = torch.Generator().manual_seed(5)
    torch.rand((), generator=draws)  # the crop decision
    top, left = int(torch.randint(0, 17, (), generator=draws)), int(torch.randint(0, 13, (), generator=draws))
    with torch.no_grad():
        cropped = discriminator(images, torch.Generator().manual_seed(5))
        expected = discriminator(images[..., top:top + 224, left:left + 224])
    assert torch.equal(cropped, expected)
    with pytest.raises(ValueError, match="taps"):
        DinoDiscriminator(discriminator.dino, taps=(3,))


def _circular_conv_reference(x, weight, bias):
    """float64 conv1d with circular padding of kernel // 2, by explicit shifts."""
    k = weight.shape[-1]
    out = bias[None, :, None].expand(x.shape[0], -1, x.shape[-1]).clone()
    for tap in range(k):
        shifted = torch.roll(x, shifts=k // 2 - tap, dims=-1)  # shifted[..., i] = x[..., i + tap - k // 2]
        out = out + torch.einsum("oc,bcl->bol", weight[:, :, tap], shifted)
    return out


@pytest.mark.parametrize("training", [True, False])
def test_spectral_norm_conv_matches_the_power_iteration(training):
    conv = SpectralNormConv1d(5, 4, 3).train(training)
    u0, v0 = conv.weight_u.double().clone(), conv.weight_v.double().clone()
    weight = conv.weight_orig.detach().double().requires_grad_(True)
    x = torch.randn(2, 5, 7, dtype=torch.float64)
    matrix = weight.detach().flatten(1)
    u, v = u0, v0
    if training:
        v = F.normalize(matrix.T @ u0, dim=0)
        u = F.normalize(matrix @ v, dim=0)
    expected = _circular_conv_reference(x, weight / (u @ weight.flatten(1) @ v), conv.bias.detach().double())
    out = conv(x.float())
    assert rel_err(out, expected) <= FP32
    assert rel_err(conv.weight_u, u) <= FP32 and rel_err(conv.weight_v, v) <= FP32
    grad_out = torch.randn_like(expected)
    (grad,) = torch.autograd.grad(out, conv.weight_orig, grad_out.float())
    (grad_ref,) = torch.autograd.grad(expected, weight, grad_out)
    assert rel_err(grad, grad_ref) <= FP32


def _batch_norm_case(rank: int, world: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The whole batch (same on every process) and this rank's rows."""
    generator = torch.Generator().manual_seed(11)
    x = torch.randn(4, 6, 10, generator=generator) * 3 + 1
    grad_out = torch.randn(4, 6, 10, generator=generator)
    rows = slice(rank * 4 // world, (rank + 1) * 4 // world)
    return x, grad_out, x[rows].clone().requires_grad_(True), grad_out[rows]


def _sync_results(norm: SyncBatchNorm1d, x: torch.Tensor, grad_out: torch.Tensor) -> dict[str, torch.Tensor]:
    y = norm(x)
    y.backward(grad_out)
    return {"y": y.detach(), "grad_x": x.grad, "grad_weight": norm.weight.grad, "grad_bias": norm.bias.grad,
            "running_mean": norm.running_mean.clone(), "running_var": norm.running_var.clone()}


def _batch_norm_reference() -> dict[str, torch.Tensor]:
    x, grad_out, _, _ = _batch_norm_case(0, 1)
    x = x.requires_grad_(True)
    norm = torch.nn.BatchNorm1d(6, eps=1e-6)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5, generator=torch.Generator().manual_seed(1))
    return _sync_results(norm, x, grad_out)


def _synced_norm() -> SyncBatchNorm1d:
    norm = SyncBatchNorm1d(6, eps=1e-6)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5, generator=torch.Generator().manual_seed(1))
    return norm


def test_sync_batch_norm_statistics_path_equals_batch_norm(monkeypatch):
    """The all-reduce path on a one-rank group (forced past the single-process shortcut)."""
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        monkeypatch.setattr(SyncBatchNorm1d, "_world_size", lambda self: 2)
        _, _, x, grad_out = _batch_norm_case(0, 1)
        results = _sync_results(_synced_norm(), x, grad_out)
    finally:
        dist.destroy_process_group()
    for name, expected in _batch_norm_reference().items():
        assert rel_err(results[name], expected) <= FP32, name


def _two_rank_worker(rank: int, store_path: str, out_path: str) -> None:
    torch.set_num_threads(1)  # a forked child: no OpenMP pool of the parent
    dist.init_process_group("gloo", init_method=f"file://{store_path}", rank=rank, world_size=2)
    try:
        x, grad_out, local_x, local_grad = _batch_norm_case(rank, 2)
        results = _sync_results(_synced_norm(), local_x, local_grad)
        for name in ("grad_weight", "grad_bias"):
            dist.all_reduce(results[name])  # what DDP sums (before its division by the world size)
        ema = LeCAMEMA(decay=0.9)
        ema.update(local_x.detach(), -local_x.detach())
        results["ema"] = torch.stack([ema.real, ema.fake])
        gathered = [None, None]
        dist.all_gather_object(gathered, results)
        if rank == 0:
            torch.save(gathered, out_path)
    finally:
        dist.destroy_process_group()


def test_sync_batch_norm_and_lecam_on_two_gloo_ranks_equal_one_process(tmp_path):
    out_path = tmp_path / "results.pt"
    # Forked, not spawned: the children need not import torch and the package again.
    mp.start_processes(_two_rank_worker, args=(str(tmp_path / "store"), str(out_path)), nprocs=2, start_method="fork")
    ranks = torch.load(out_path, weights_only=False)
    reference = _batch_norm_reference()
    for name in ("y", "grad_x"):
        assert rel_err(torch.cat([r[name] for r in ranks]), reference[name]) <= FP32, name
    for name in ("grad_weight", "grad_bias", "running_mean", "running_var"):
        for r in ranks:
            assert rel_err(r[name], reference[name]) <= FP32, name
    x, _, _, _ = _batch_norm_case(0, 1)
    mean = float(x.double().mean())
    for r in ranks:
        assert torch.allclose(r["ema"], torch.tensor([0.1 * mean, -0.1 * mean], dtype=torch.float64), rtol=FP32)
