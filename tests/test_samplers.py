"""Sampler properties: exactness on fields with known solutions, convergence order, the reverse
SDE reaching the data distribution, DDPM/DDIM on a point mass, seeds, respacing, guidance."""
from __future__ import annotations

import copy
import math

import pytest
import torch
from support.numerics import rel_err
from support.sharp_models import (BF16_TOL, DEVICES, MUTANTS, device_backends, float64_copy, float64_evaluation,
                                  inject_mutant, report, skip_if_backend_cannot_run, tiny_generator, tolerance)

from softvq_fast.models import DiT, SiT
from softvq_fast.models.adaln_transformer import AdaLNTransformer
from softvq_fast.sampling import (
    ConditionalModel,
    GaussianDiffusion,
    path_coefficients,
    respaced_timesteps,
    sample_diffusion,
    sample_flow,
)


def test_euler_is_exact_on_a_constant_velocity_field():
    noise = torch.randn(3, 5, 4, dtype=torch.float64)
    velocity = torch.randn(5, 4, dtype=torch.float64)
    out = sample_flow(lambda x, t: velocity.expand_as(x), noise, steps=7, sampler="euler")
    torch.testing.assert_close(out, noise - velocity, rtol=0, atol=1e-12)


def test_heun_converges_at_second_order_on_a_linear_field():
    # dx/dt = a x from t = 1 to 0: x(0) = x(1) * exp(-a).
    a, noise = 1.3, torch.randn(4, 3, dtype=torch.float64)
    exact = noise * math.exp(-a)

    def error(steps: int, sampler: str) -> float:
        return float((sample_flow(lambda x, t: a * x, noise, steps=steps, sampler=sampler) - exact).abs().max())

    heun_ratio = error(16, "heun") / error(32, "heun")
    euler_ratio = error(16, "euler") / error(32, "euler")
    assert 3.5 < heun_ratio < 4.5, heun_ratio
    assert 1.8 < euler_ratio < 2.2, euler_ratio


def _gaussian_velocity(path: str, data_std: float):
    """Exact velocity E[v | x_t] when the data are N(0, data_std^2)."""

    def velocity(x: torch.Tensor, t: float) -> torch.Tensor:
        alpha, sigma, d_alpha, d_sigma = (float(c) for c in path_coefficients(path, torch.tensor(t, dtype=torch.float64)))
        variance = alpha**2 * data_std**2 + sigma**2
        return (d_alpha * alpha * data_std**2 + d_sigma * sigma) / variance * x

    return velocity


@pytest.mark.parametrize("path", ["linear", "cosine"])
@pytest.mark.parametrize("sampler", ["euler", "heun", "sde"])
def test_samplers_reach_the_data_distribution(path, sampler):
    data_std = 0.5
    generator = torch.Generator().manual_seed(1)
    noise = torch.randn(40000, 1, generator=generator, dtype=torch.float64)
    out = sample_flow(_gaussian_velocity(path, data_std), noise, steps=60, sampler=sampler, path=path, generator=generator)
    assert abs(float(out.std()) - data_std) < 0.03, float(out.std())


def test_flow_sde_is_deterministic_given_a_seed():
    noise = torch.randn(2, 6, 3)
    field = _gaussian_velocity("linear", 1.0)

    def run(seed: int) -> torch.Tensor:
        return sample_flow(field, noise, steps=5, sampler="sde", generator=torch.Generator().manual_seed(seed))

    torch.testing.assert_close(run(3), run(3), rtol=0, atol=0)
    assert not torch.equal(run(3), run(4))


def test_respaced_timesteps_are_even_and_keep_both_ends():
    assert respaced_timesteps(1000, 1000) == list(range(1000))
    kept = respaced_timesteps(1000, 250)
    assert len(kept) == 250 and kept[0] == 0 and kept[-1] == 999
    gaps = {b - a for a, b in zip(kept, kept[1:])}
    assert gaps <= {4, 5}
    schedule = GaussianDiffusion(250)
    base = torch.cumprod(1 - torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64), 0)
    torch.testing.assert_close(schedule.alphas_cumprod, base[kept])
    torch.testing.assert_close(torch.cumprod(1 - schedule.betas, 0), base[kept])


def _point_mass_noise_model(target: torch.Tensor, learn_sigma: bool):
    """The exact noise prediction when all data equal `target`, plus variance logits."""
    base = torch.cumprod(1 - torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64), 0)

    def model(x: torch.Tensor, timestep: float) -> torch.Tensor:
        cumprod = float(base[int(timestep)])
        eps = (x - cumprod**0.5 * target) / (1 - cumprod) ** 0.5
        return torch.cat([eps, torch.zeros_like(eps)], dim=-1) if learn_sigma else eps

    return model


@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
@pytest.mark.parametrize("learn_sigma", [True, False])
def test_diffusion_recovers_a_point_mass(sampler, learn_sigma):
    target = torch.randn(4, 3, dtype=torch.float64)
    noise = torch.randn(2, 4, 3, dtype=torch.float64)
    out = sample_diffusion(
        _point_mass_noise_model(target, learn_sigma), noise, steps=25, sampler=sampler, learn_sigma=learn_sigma,
        generator=torch.Generator().manual_seed(0),
    )
    torch.testing.assert_close(out, target.expand_as(out), rtol=0, atol=1e-8)


def test_ddim_eta0_is_deterministic_and_ddpm_is_not():
    model = _point_mass_noise_model(torch.zeros(4, 3, dtype=torch.float64), learn_sigma=True)

    def noisy(x, t):  # a model whose prediction is not exact, so the sampler's noise would show
        out = model(x, t)
        return out + 0.1 * torch.sin(3 * x).repeat(1, 1, 2)

    noise = torch.randn(2, 4, 3, dtype=torch.float64)

    def run(sampler: str, seed: int) -> torch.Tensor:
        return sample_diffusion(noisy, noise, steps=10, sampler=sampler, generator=torch.Generator().manual_seed(seed))

    torch.testing.assert_close(run("ddim", 0), run("ddim", 1), rtol=0, atol=0)
    generator = torch.Generator().manual_seed(0)
    state = generator.get_state()
    sample_diffusion(noisy, noise, steps=10, sampler="ddim", generator=generator)
    assert torch.equal(generator.get_state(), state), "eta = 0 draws no noise"
    assert not torch.equal(run("ddpm", 0), run("ddpm", 1))
    torch.testing.assert_close(run("ddpm", 5), run("ddpm", 5), rtol=0, atol=0)


def test_learned_sigma_interpolates_between_posterior_variance_and_beta():
    schedule = GaussianDiffusion(50)
    i = 20
    low, high = schedule.posterior_log_variance_clipped[i], torch.log(schedule.betas[i])
    logits = torch.tensor([-1.0, 1.0, 0.0], dtype=torch.float64)
    torch.testing.assert_close(schedule.log_variance(logits, i), torch.stack([low, high, (low + high) / 2]))


def _tiny_sit() -> SiT:
    torch.manual_seed(0)
    model = SiT(input_size=6, in_channels=4, hidden_size=64, depth=2, num_heads=2, num_classes=5, vae_1d=True)
    for p in model.parameters():  # adaLN-Zero starts at zero output: randomise to make outputs differ
        torch.nn.init.normal_(p, std=0.1)
    return model.double().eval()


def test_guidance_runs_inside_the_interval_only_and_mixes_the_halves():
    model = _tiny_sit()
    labels = torch.tensor([1, 3])
    x = torch.randn(2, 6, 4, dtype=torch.float64)
    fn = ConditionalModel(model, labels, cfg_scale=2.5, guidance_interval=(0.2, 0.6))
    t = torch.full((2,), 0.4, dtype=torch.float64)
    with torch.no_grad():
        cond, uncond = model(x, t, labels), model(x, t, torch.full_like(labels, model.null_class))
        assert rel_err(fn(x, 0.4), uncond + 2.5 * (cond - uncond)) < 1e-6
        assert rel_err(fn(x, 0.8), model(x, t + 0.4, labels)) < 1e-6
    assert [fn.is_guided(t) for t in (0.0, 0.2, 0.6, 0.61)] == [False, True, True, False]
    with pytest.raises(ValueError, match="guidance_interval"):
        ConditionalModel(model, labels, cfg_scale=2.0, guidance_interval=(0.7, 0.2))


# Sampling through the models in bf16 and on CUDA, on sharp attention (support.sharp_models):
# the reference vectors' attention is nearly flat, so at bf16 tolerances they cannot tell
# attention from its mutants. (sampler, path) per family; every run guided on part of the way.
SAMPLERS = [("sit", "euler", "linear"), ("sit", "heun", "cosine"), ("sit", "sde", "linear"),
            ("dit", "ddpm", None), ("dit", "ddim", None)]
STEPS, CFG_SCALE, GUIDANCE_INTERVAL = 3, 2.5, (0.0, 0.7)


@pytest.fixture(scope="module")
def sharp():
    """{family: the tiny sharp generator}."""
    return {"sit": tiny_generator(SiT), "dit": tiny_generator(DiT)}


def sampling_error(model: AdaLNTransformer, model64: AdaLNTransformer, labels: torch.Tensor, sampler: str,
                   path: str | None, seed: int) -> float:
    """Relative error of the samples drawn through `model` (its device and dtype) against those
    drawn through its float64 copy (on the same device, so that the noise draws match: the
    sampler's state is float32 in both runs)."""

    def run(generator: AdaLNTransformer) -> torch.Tensor:
        diffusion = isinstance(generator, DiT)
        device = next(generator.parameters()).device
        fn = ConditionalModel(generator, labels.to(device), cfg_scale=CFG_SCALE, guidance_interval=GUIDANCE_INTERVAL,
                              time_scale=1000.0 if diffusion else 1.0)
        noise = torch.randn((len(labels), *generator.latent_shape), generator=torch.Generator(device).manual_seed(seed),
                            device=device)
        rng = torch.Generator(device).manual_seed(seed + 1)
        with torch.no_grad():
            if diffusion:
                return sample_diffusion(fn, noise, steps=STEPS, sampler=sampler, channel_dim=generator.channel_dim,
                                        learn_sigma=generator.learn_sigma, generator=rng)
            return sample_flow(fn, noise, steps=STEPS, sampler=sampler, path=path, generator=rng)

    with float64_evaluation():
        expected = run(model64)
    return rel_err(run(model), expected)


def _sampling_under_test(sharp, family: str, dtype: torch.dtype, device: str = "cpu", backend: str = "auto"):
    """(a copy of the sharp generator in `dtype` on `device`, a float64 copy there, 3 random labels)."""
    model = copy.deepcopy(sharp[family]).to(device=device, dtype=dtype).set_backends(attention=backend)
    labels = torch.randint(0, model.y_embedder.num_classes, (3,))
    return model, float64_copy(sharp[family], device), labels


@pytest.mark.parametrize("device, backend", device_backends(cpu=("auto",)))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("family, sampler, path", SAMPLERS)
def test_sampling_matches_float64_on_sharp_attention(sharp, family, sampler, path, dtype, device, backend, seed):
    with skip_if_backend_cannot_run(backend):
        error = sampling_error(*_sampling_under_test(sharp, family, dtype, device, backend), sampler, path, seed)
    report(f"{sampler} {device} {dtype} {backend}", {"samples": error})
    assert error <= tolerance(dtype)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mutant", list(MUTANTS))
@pytest.mark.parametrize("family, sampler, path", SAMPLERS)
def test_bf16_sampling_check_fails_on_attention_mutants(sharp, family, sampler, path, mutant, device, seed, monkeypatch):
    inject_mutant(monkeypatch, mutant)
    error = sampling_error(*_sampling_under_test(sharp, family, torch.bfloat16, device), sampler, path, seed)
    report(f"{sampler} {device} bf16 mutant {mutant}", {"samples": error})
    assert error > BF16_TOL


def test_unknown_sampler_and_path_are_named():
    with pytest.raises(ValueError, match="flow sampler 'rk4'"):
        sample_flow(lambda x, t: x, torch.zeros(1, 2), steps=2, sampler="rk4")
    with pytest.raises(ValueError, match="path 'edm'"):
        sample_flow(lambda x, t: x, torch.zeros(1, 2), steps=2, path="edm")
    with pytest.raises(ValueError, match="diffusion sampler 'euler'"):
        sample_diffusion(lambda x, t: x, torch.zeros(1, 2), steps=2, sampler="euler")
