"""generate(): class labels to images through the tokenizer; the generate and profile commands;
the CUDA-graph sampling path against the plain one."""
from __future__ import annotations

import copy
import json
import subprocess
import sys

import pytest
import torch
from support.numerics import rel_err
from support.sharp_models import (BF16_TOL, DEVICES, MUTANTS, device_backends, float64_copy, float64_evaluation,
                                  inject_mutant, report, skip_if_backend_cannot_run, tiny_generator, tiny_tokenizer,
                                  tolerance)

import softvq_fast
from softvq_fast.generation import load_generator, sample_latents
from softvq_fast.models import DiT, SiT, SoftVQVAE
from softvq_fast.models.adaln_transformer import AdaLNTransformer


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


# bf16 and CUDA accuracy, on sharp attention (support.sharp_models): the reference vectors'
# attention is nearly flat, so at bf16 tolerances they cannot tell attention from its mutants.
# One guided flow sampler and one diffusion sampler; tests/test_samplers.py runs every sampler.
SAMPLING = {
    "sit": dict(sampler="heun", steps=3, cfg_scale=2.5, guidance_interval=(0.0, 0.7), seed=5),
    "dit": dict(sampler="ddpm", steps=3, cfg_scale=2.5, seed=5),
}


@pytest.fixture(scope="module")
def sharp():
    """{"tokenizer" / "sit" / "dit": the tiny sharp model}."""
    return {"tokenizer": tiny_tokenizer(), "sit": tiny_generator(SiT), "dit": tiny_generator(DiT)}


def generate_error(tokenizer: SoftVQVAE, generator: AdaLNTransformer, tokenizer64: SoftVQVAE,
                   generator64: AdaLNTransformer, labels: list[int], dtype: torch.dtype, **sampling) -> float:
    """Relative error of generate(tokenizer, generator, labels, **sampling) in `dtype` (with its
    default CUDA-graph replay on CUDA) against the same sampling and decoding through the float64
    copies. Everything runs on the float64 copies' device, whose random generator then draws the
    same noise for both (the sampler's state is float32 in both: generate's always is)."""
    device = next(generator64.parameters()).device
    with float64_evaluation():
        latents = sample_latents(generator64, torch.tensor(labels, device=device), cuda_graph=False, **sampling)
        with torch.no_grad():
            expected = tokenizer64.decode(tokenizer64.denormalize_latents(latents.double())).clamp(-1, 1)
    images = softvq_fast.generate(tokenizer, generator, labels, device=device, dtype=dtype, **sampling)
    assert images.dtype == torch.float32 and next(generator.parameters()).dtype == dtype
    return rel_err(images, expected)


def _generate_under_test(sharp, family: str, device: str = "cpu", backend: str = "auto"):
    """Copies of the sharp tokenizer and generator (generate moves them in place), float64 copies
    on `device`, three random labels."""
    tokenizer, generator = copy.deepcopy(sharp["tokenizer"]), copy.deepcopy(sharp[family])
    tokenizer.set_backends(attention=backend)
    generator.set_backends(attention=backend)
    labels = torch.randint(0, generator.y_embedder.num_classes, (3,)).tolist()
    return tokenizer, generator, float64_copy(tokenizer, device), float64_copy(generator, device), labels


@pytest.mark.parametrize("device, backend", device_backends(cpu=("auto",)))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("family", list(SAMPLING))
def test_generation_matches_float64_on_sharp_attention(sharp, family, dtype, device, backend):
    with skip_if_backend_cannot_run(backend):
        error = generate_error(*_generate_under_test(sharp, family, device, backend), dtype, **SAMPLING[family])
    report(f"generate {family} {device} {dtype} {backend}", {"images": error})
    assert error <= tolerance(dtype)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mutant", list(MUTANTS))
@pytest.mark.parametrize("family", list(SAMPLING))
def test_bf16_generation_check_fails_on_attention_mutants(sharp, family, mutant, device, monkeypatch):
    inject_mutant(monkeypatch, mutant)
    error = generate_error(*_generate_under_test(sharp, family, device), torch.bfloat16, **SAMPLING[family])
    report(f"generate {family} {device} bf16 mutant {mutant}", {"images": error})
    assert error > BF16_TOL


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
