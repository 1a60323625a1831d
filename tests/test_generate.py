"""generate(): class labels to images through the tokenizer; the generate and profile commands;
the CUDA-graph sampling path against the plain one."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from support.numerics import rel_err

import softvq_fast
from softvq_fast.generation import load_generator, sample_latents
from softvq_fast.models import DiT, SiT, SoftVQVAE


@pytest.fixture(scope="module")
def tiny(reference_dir):
    vectors = reference_dir / "vectors"
    return (
        SoftVQVAE.from_pretrained(vectors / "tokenizer_tiny"),
        load_generator(vectors / "sit_tiny"),
        load_generator(vectors / "dit_tiny"),
    )


def test_loader_picks_the_family(tiny):
    _, sit, dit = tiny
    assert type(sit) is SiT and type(dit) is DiT


@pytest.mark.parametrize("family, sampler", [("sit", "euler"), ("sit", "sde"), ("dit", "ddim"), ("dit", "ddpm")])
def test_images_have_the_right_shape_range_and_seed(tiny, family, sampler):
    tokenizer, sit, dit = tiny
    generator = sit if family == "sit" else dit
    kwargs = dict(sampler=sampler, steps=3, cfg_scale=2.0, guidance_interval=(0.0, 0.7))
    images = softvq_fast.generate(tokenizer, generator, [0, 4, 9], seed=1, **kwargs)
    assert images.shape == (3, 3, 64, 64) and images.dtype == torch.float32
    assert torch.isfinite(images).all() and images.min() >= -1 and images.max() <= 1
    torch.testing.assert_close(softvq_fast.generate(tokenizer, generator, [0, 4, 9], seed=1, **kwargs), images, rtol=0, atol=0)
    assert not torch.equal(softvq_fast.generate(tokenizer, generator, [0, 4, 9], seed=2, **kwargs), images)


def test_latents_are_denormalised_then_decoded_and_clamped(tiny):
    tokenizer, sit, _ = tiny
    labels = torch.tensor([2, 5])
    latents = sample_latents(sit, labels, steps=2, seed=7)
    with torch.no_grad():
        decoded = tokenizer.decode(latents * tokenizer.config.vq_std + tokenizer.config.vq_mean)
    images = softvq_fast.generate(tokenizer, sit, labels, steps=2, seed=7)
    assert rel_err(images, decoded.clamp(-1, 1)) <= 1e-6


def test_bf16_generation_runs_close_to_float32(tiny, reference_dir):
    tokenizer, sit, _ = tiny
    reference = softvq_fast.generate(tokenizer, sit, [1, 2], steps=2, seed=3)
    fresh = load_generator(reference_dir / "vectors" / "sit_tiny")
    half = softvq_fast.generate(tokenizer, fresh, [1, 2], steps=2, seed=3, dtype=torch.bfloat16)
    assert next(fresh.parameters()).dtype == torch.bfloat16
    assert half.dtype == torch.float32 and rel_err(half, reference) <= 5e-2


def test_mismatched_pair_and_labels_are_named(tiny):
    tokenizer, sit, _ = tiny
    other = SiT(input_size=5, in_channels=16, hidden_size=32, depth=1, num_heads=2, num_classes=10, vae_1d=True)
    with pytest.raises(ValueError, match=r"generator takes samples of shape \(5, 16\).*\(8, 16\)"):
        softvq_fast.generate(tokenizer, other, [1])
    with pytest.raises(ValueError, match=r"class_labels must lie in \[0, 10\)"):
        softvq_fast.generate(tokenizer, sit, [3, 10])
    with pytest.raises(ValueError, match="a SiT samples with one of"):
        softvq_fast.generate(tokenizer, sit, [3], sampler="ddim")


def test_generate_command_writes_a_grid(reference_dir, tmp_path):
    from PIL import Image

    vectors = reference_dir / "vectors"
    out = tmp_path / "grid.png"
    result = subprocess.run(
        [sys.executable, "-m", "softvq_fast.cli", "generate", "--tokenizer", str(vectors / "tokenizer_tiny"),
         "--generator", str(vectors / "sit_tiny"), "--classes", "0-3", "--steps", "2", "--cfg-scale", "1.5",
         "--out", str(out), "--device", "cpu"],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert Image.open(out).size == (128, 128)
    assert "2 x 2 grid" in result.stdout


def test_profile_command_writes_a_chrome_trace(reference_dir, tmp_path):
    out = tmp_path / "trace.json"
    result = subprocess.run(
        [sys.executable, "-m", "softvq_fast.cli", "profile", "--generator", str(reference_dir / "vectors" / "dit_tiny"),
         "--steps", "1", "--batch", "2", "--cfg-scale", "2", "--device", "cpu", "--dtype", "float32", "--out", str(out)],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert "traceEvents" in json.loads(out.read_text())
    assert "sampling_step" in result.stdout and "no GPU telemetry on cpu" in result.stdout


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_graph_sampling_matches_the_plain_path(reference_dir, dtype):
    tokenizer = SoftVQVAE.from_pretrained(reference_dir / "vectors" / "tokenizer_tiny")
    sit = load_generator(reference_dir / "vectors" / "sit_tiny")
    kwargs = dict(steps=4, sampler="heun", cfg_scale=2.0, guidance_interval=(0.0, 0.6), seed=5, device="cuda", dtype=dtype)
    plain = softvq_fast.generate(tokenizer, sit, [1, 2, 3], cuda_graph=False, **kwargs)
    graphed = softvq_fast.generate(tokenizer, sit, [1, 2, 3], cuda_graph=True, **kwargs)
    assert rel_err(graphed, plain) <= 1e-6


@pytest.mark.cuda
def test_cuda_graph_diffusion_sampling_matches_the_plain_path(reference_dir):
    tokenizer = SoftVQVAE.from_pretrained(reference_dir / "vectors" / "tokenizer_tiny")
    dit = load_generator(reference_dir / "vectors" / "dit_tiny")
    kwargs = dict(steps=5, sampler="ddpm", cfg_scale=1.5, seed=5, device="cuda", dtype=torch.bfloat16)
    plain = softvq_fast.generate(tokenizer, dit, [1, 2], cuda_graph=False, **kwargs)
    graphed = softvq_fast.generate(tokenizer, dit, [1, 2], cuda_graph=True, **kwargs)
    assert rel_err(graphed, plain) <= 1e-6
