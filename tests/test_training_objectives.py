"""Training objectives: the authors' conformance vectors (SiT flow matching, DiT DDPM with the
learned-variance bound), a float64 evaluation of the formulas written here from the math,
gradients through our ops, the classifier-free-guidance label drop and the draws' RNG use."""
from __future__ import annotations

import math

import pytest
import torch
from safetensors.torch import load_file
from support.numerics import rel_err

from softvq_fast._extension import extension_available
from softvq_fast.generation import load_generator
from softvq_fast.models import DiT, SiT
from softvq_fast.sampling import GaussianDiffusion, sample_diffusion
from softvq_fast.training import (
    diffusion_loss,
    flow_matching_loss,
    flow_matching_times,
    label_drop_mask,
    variational_bound_bits,
)

needs_extension = pytest.mark.skipif(not extension_available(), reason="softvq_fast._C not built")
# With gradients the linear layers run on torch (our oneDNN path is forward-only).
BACKENDS = [pytest.param({}, id="auto"), pytest.param(dict(attention="softvq"), marks=needs_extension, id="softvq-attention")]
T_STEPS = 1000


@pytest.fixture(scope="module")
def generators(reference_dir):
    vectors = reference_dir / "vectors"
    return {"sit": vectors / "sit_tiny", "dit": vectors / "dit_tiny"}


def _vectors(reference_dir, name: str) -> dict[str, torch.Tensor]:
    return load_file(str(reference_dir / "vectors" / "training" / f"{name}.safetensors"))


# ---- float64 references written from the math (independent of softvq_fast's schedule code) ----


def _reference_flow_loss(model, x, y, path, t, noise) -> torch.Tensor:
    s = t.reshape(-1, *([1] * (x.ndim - 1)))
    if path == "linear":
        x_t, target = (1 - s) * x + s * noise, noise - x
    else:
        angle = math.pi * s / 2
        x_t = torch.cos(angle) * x + torch.sin(angle) * noise
        target = math.pi / 2 * (torch.cos(angle) * noise - torch.sin(angle) * x)
    return ((model(x_t, t, y) - target) ** 2).flatten(1).mean(1)


def _reference_betas(schedule: str) -> torch.Tensor:
    if schedule == "linear":
        return torch.tensor([1e-4 + (0.02 - 1e-4) * i / (T_STEPS - 1) for i in range(T_STEPS)], dtype=torch.float64)

    def alpha_bar(s):
        return math.cos(math.pi / 2 * (s + 0.008) / 1.008) ** 2

    return torch.tensor(
        [min(1 - alpha_bar((i + 1) / T_STEPS) / alpha_bar(i / T_STEPS), 0.999) for i in range(T_STEPS)],
        dtype=torch.float64,
    )


def _phi(u):
    """The tanh approximation of the standard normal CDF that the objective uses."""
    return 0.5 * (1 + torch.tanh(math.sqrt(2 / math.pi) * (u + 0.044715 * u**3)))


def _reference_diffusion_terms(model, x, y, schedule, t, noise) -> tuple[torch.Tensor, torch.Tensor]:
    """(mse, vb in bits) per sample for a learned-sigma DiT on (B, T, C) tokens, in float64."""
    betas = _reference_betas(schedule)
    abar_all = torch.cumprod(1 - betas, 0)

    def per_sample(values):
        return values[t].reshape(-1, 1, 1)

    beta, abar = per_sample(betas), per_sample(abar_all)
    abar_prev = per_sample(torch.cat([torch.ones(1, dtype=torch.float64), abar_all[:-1]]))
    x_t = abar.sqrt() * x + (1 - abar).sqrt() * noise
    eps, v = model(x_t, t, y).chunk(2, dim=-1)
    mse = ((eps - noise) ** 2).flatten(1).mean(1)

    def posterior_mean(x0):
        return (abar_prev.sqrt() * beta * x0 + (1 - beta).sqrt() * (1 - abar_prev) * x_t) / (1 - abar)

    posterior_var_all = betas * torch.cat([torch.ones(1, dtype=torch.float64), 1 - abar_all[:-1]]) / (1 - abar_all)
    posterior_var_all[0] = posterior_var_all[1]  # the first posterior variance (0) is replaced by the second
    q_log_var = per_sample(posterior_var_all.log())
    q_mean = posterior_mean(x)
    p_mean = posterior_mean((x_t - (1 - abar).sqrt() * eps) / abar.sqrt())
    p_log_var = (v + 1) / 2 * beta.log() + (1 - v) / 2 * q_log_var
    kl = 0.5 * (p_log_var - q_log_var) + ((q_log_var.exp() + (q_mean - p_mean) ** 2) / (2 * p_log_var.exp())) - 0.5
    std = (0.5 * p_log_var).exp()
    upper, lower = _phi((x - p_mean + 1 / 255) / std), _phi((x - p_mean - 1 / 255) / std)
    probability = torch.where(x < -0.999, upper, torch.where(x > 0.999, 1 - lower, upper - lower))
    nll = -probability.clamp(min=1e-12).log()
    first = (t == 0).reshape(-1, 1, 1)
    vb = torch.where(first, nll, kl).flatten(1).mean(1) / math.log(2)
    return mse, vb


def _inputs(model, batch: int):
    x = torch.randn(batch, *model.latent_shape)
    y = torch.randint(0, model.y_embedder.num_classes + 1, (batch,))
    return x, y, torch.randn_like(x)


# ---- the authors' vectors ----


@pytest.mark.parametrize("path", ["linear", "cosine"])
def test_flow_matching_matches_the_authors(reference_dir, generators, path):
    vectors = _vectors(reference_dir, "flow_matching_sit_tiny")
    model = SiT.from_pretrained(generators["sit"])
    with torch.no_grad():
        loss = flow_matching_loss(
            model, vectors["x"], vectors["y"], path=path, t=vectors[f"{path}.t"], noise=vectors[f"{path}.noise"]
        )
    assert loss.shape == (6,)
    assert rel_err(loss, vectors[f"{path}.loss"]) <= 1e-5


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_diffusion_matches_the_authors(reference_dir, generators, schedule):
    vectors = _vectors(reference_dir, "diffusion_dit_tiny")
    model = DiT.from_pretrained(generators["dit"])
    x, y, t, noise = (vectors[k] for k in ("x", "y", "t", "noise"))
    with torch.no_grad():
        loss = diffusion_loss(model, x, y, noise_schedule=schedule, t=t, noise=noise)
        # The two terms on their own: the bound through its public function.
        diffusion = GaussianDiffusion(noise_schedule=schedule)
        x_t = diffusion.q_sample(x, noise, t)
        eps, logits = model(x_t, t, y).chunk(2, dim=-1)
        vb = variational_bound_bits(diffusion, x, x_t, t, eps, logits)
    assert rel_err(loss, vectors[f"{schedule}.loss"]) <= 1e-5
    assert rel_err(vb, vectors[f"{schedule}.vb"]) <= 1e-5
    assert rel_err(((eps - noise) ** 2).mean((1, 2)), vectors[f"{schedule}.mse"]) <= 1e-5


# ---- float64 formulas, float32 against them, gradients ----


@pytest.mark.parametrize("path", ["linear", "cosine"])
def test_flow_matching_follows_the_formulas_in_float64(generators, path):
    model = SiT.from_pretrained(generators["sit"], dtype=torch.float64)
    x, y, noise = (v.double() for v in _inputs(model, 7))
    y = y.long()
    t = torch.cat([torch.tensor([0.0, 1.0]), torch.rand(5)]).double()
    with torch.no_grad():
        ours = flow_matching_loss(model, x, y, path=path, t=t, noise=noise)
        reference = _reference_flow_loss(model, x, y, path, t, noise)
        fp32 = flow_matching_loss(
            SiT.from_pretrained(generators["sit"]), x.float(), y, path=path, t=t.float(), noise=noise.float()
        )
    assert rel_err(ours, reference) <= 1e-12
    assert rel_err(fp32, reference) <= 1e-5


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_diffusion_follows_the_formulas_in_float64(generators, schedule):
    model = DiT.from_pretrained(generators["dit"], dtype=torch.float64)
    x, y, noise = (v.double() for v in _inputs(model, 8))
    y = y.long()
    t = torch.cat([torch.tensor([0, 1, 2, 998, 999]), torch.randint(0, T_STEPS, (3,))])
    with torch.no_grad():
        ours = diffusion_loss(model, x, y, noise_schedule=schedule, t=t, noise=noise)
        mse, vb = _reference_diffusion_terms(model, x, y, schedule, t, noise)
        fp32 = diffusion_loss(
            DiT.from_pretrained(generators["dit"]), x.float(), y, noise_schedule=schedule, t=t, noise=noise.float()
        )
    assert rel_err(ours, mse + vb) <= 1e-10
    assert rel_err(fp32, mse + vb) <= 1e-5


def _gradients(model, loss_fn) -> dict[str, torch.Tensor]:
    model.zero_grad()
    loss_fn(model).mean().backward()
    return {name: p.grad for name, p in model.named_parameters() if p.requires_grad}


# DiT's bound at t = 0 is a log of a difference of nearby normal CDFs (the decoder NLL): float32
# cancels there, so its gradient agrees with float64 only to about 1e-4 (as in the authors' code).
@pytest.mark.parametrize("backends", BACKENDS)
@pytest.mark.parametrize("family, steps, tolerance", [
    ("sit", None, 1e-5), ("dit", (1, 3, 250, 700, 999), 1e-5), ("dit", (0, 0, 0, 9, 0), 1e-3),
])
def test_one_step_gradient_matches_float64(generators, family, steps, tolerance, backends):
    cls = SiT if family == "sit" else DiT
    model = cls.from_pretrained(generators[family]).set_backends(**backends).train()
    model64 = cls.from_pretrained(generators[family], dtype=torch.float64).train()
    x, y, noise = _inputs(model, 5)
    drop = torch.tensor([False, True, False, False, True])
    t = torch.rand(5) if family == "sit" else torch.tensor(steps)

    def loss_fn(m):
        dtype = next(m.parameters()).dtype
        if family == "sit":
            return flow_matching_loss(m, x.to(dtype), y, path="cosine", t=t.to(dtype), noise=noise.to(dtype), label_drop=drop)
        return diffusion_loss(m, x.to(dtype), y, noise_schedule="cosine", t=t, noise=noise.to(dtype), label_drop=drop)

    grads, grads64 = _gradients(model, loss_fn), _gradients(model64, loss_fn)
    assert grads.keys() == grads64.keys()
    for name, grad in grads.items():
        assert grad is not None and torch.isfinite(grad).all(), name
    flat = torch.cat([g.flatten() for g in grads.values()])
    flat64 = torch.cat([g.flatten() for g in grads64.values()])
    assert flat64.abs().max() > 0
    assert rel_err(flat, flat64) <= tolerance


def test_the_bound_trains_the_variance_only(generators):
    """The gradient reaching the predicted noise is the MSE's alone: the bound sees eps detached."""
    model = DiT.from_pretrained(generators["dit"])
    x, y, noise = _inputs(model, 4)
    t = torch.tensor([0, 10, 500, 999])
    with torch.no_grad():
        diffusion = GaussianDiffusion()
        output = model(diffusion.q_sample(x, noise, t), t, y)
    output.requires_grad_(True)
    loss = diffusion_loss(lambda *args: output, x, y, t=t, noise=noise)
    loss.sum().backward()
    eps_grad, logits_grad = output.grad.chunk(2, dim=-1)
    per_sample = x[0].numel()
    torch.testing.assert_close(eps_grad, 2 * (output[..., :16].detach() - noise) / per_sample, rtol=1e-6, atol=1e-9)
    assert logits_grad.abs().max() > 0


# ---- draws: times, noise, label drop ----


def test_lognormal_and_uniform_times():
    def draws(**kwargs):
        return flow_matching_times(4096, generator=torch.Generator().manual_seed(5), **kwargs)

    normal = torch.randn(4096, generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(draws(path="linear"), torch.sigmoid(normal))
    torch.testing.assert_close(draws(path="cosine"), torch.atan(normal.exp()) / (math.pi / 2))
    # Uniform: exactly rand, no clamp at either end (enough draws that some lie within 1e-5 of 0 and 1).
    many = 1 << 20
    uniform = torch.rand(many, generator=torch.Generator().manual_seed(5))
    assert uniform.min() < 1e-5 and uniform.max() > 1 - 1e-5
    for path in ("linear", "cosine"):
        times = flow_matching_times(many, path=path, weighting="uniform", generator=torch.Generator().manual_seed(5))
        assert torch.equal(times, uniform)


def test_eval_mode_never_drops_labels_and_draws_nothing(generators):
    model = SiT.from_pretrained(generators["sit"])
    x, y, noise = _inputs(model, 6)
    t = torch.rand(6)
    state = torch.get_rng_state()
    with torch.no_grad():
        first = flow_matching_loss(model, x, y, t=t, noise=noise)
        assert torch.equal(torch.get_rng_state(), state)
        assert torch.equal(first, flow_matching_loss(model, x, y, t=t, noise=noise))


@pytest.mark.parametrize("prob", [0.1, 0.3])
def test_train_mode_drops_labels_with_the_configured_probability(prob):
    model = SiT(input_size=4, in_channels=3, hidden_size=32, depth=1, num_heads=2, num_classes=7,
                class_dropout_prob=prob, vae_1d=True).train()
    embedder = model.y_embedder
    labels = torch.randint(0, 7, (2000,))
    torch.manual_seed(11)
    embedded = embedder(labels)
    torch.manual_seed(11)
    expected_drop = torch.rand(2000) < prob  # the documented draw: one rand(N) on labels' device
    table = embedder.embedding_table.weight
    torch.testing.assert_close(embedded, table[torch.where(expected_drop, 7, labels)], rtol=0, atol=0)
    dropped = (embedded == table[7]).all(dim=1)
    assert torch.equal(dropped, expected_drop)
    assert abs(float(dropped.float().mean()) - prob) < 5 * math.sqrt(prob * (1 - prob) / 2000)


def test_an_explicit_label_drop_applies_in_any_mode(generators):
    model = SiT.from_pretrained(generators["sit"])
    x, _, _ = _inputs(model, 4)
    y, t = torch.tensor([1, 2, 3, 4]), torch.rand(4)
    drop = torch.tensor([True, False, True, False])
    with torch.no_grad():
        torch.testing.assert_close(model(x, t, y, label_drop=drop), model(x, t, torch.tensor([10, 2, 10, 4])), rtol=0, atol=0)
    with pytest.raises(ValueError, match="label_drop must be a bool tensor of shape"):
        model(x, t, y, label_drop=drop.long())
    no_null = SiT(input_size=4, in_channels=3, hidden_size=32, depth=1, num_heads=2, num_classes=7,
                  class_dropout_prob=0.0, vae_1d=True)
    with pytest.raises(ValueError, match="class_dropout_prob=0"):
        no_null(torch.zeros(2, 4, 3), torch.zeros(2), torch.zeros(2, dtype=torch.long), label_drop=torch.ones(2, dtype=torch.bool))


@pytest.mark.parametrize("family", ["sit", "dit"])
def test_a_generator_drives_every_draw(generators, family):
    """With a generator: times, noise, then the label drop, all from it; the global RNG untouched."""
    cls = SiT if family == "sit" else DiT
    model = cls.from_pretrained(generators[family]).train()
    x, y, _ = _inputs(model, 64)

    def loss(seed, **kwargs):
        if family == "sit":
            return flow_matching_loss(model, x, y, weighting="lognormal", generator=torch.Generator().manual_seed(seed), **kwargs)
        return diffusion_loss(model, x, y, noise_schedule="cosine", generator=torch.Generator().manual_seed(seed), **kwargs)

    state = torch.get_rng_state()
    with torch.no_grad():
        first = loss(3)
        assert torch.equal(torch.get_rng_state(), state)
        assert torch.equal(loss(3), first)
        assert not torch.equal(loss(4), first)
        g = torch.Generator().manual_seed(3)
        if family == "sit":
            t = flow_matching_times(64, weighting="lognormal", generator=g)
        else:
            t = torch.randint(0, T_STEPS, (64,), generator=g)
        noise = torch.randn(x.shape, generator=g)
        drop = label_drop_mask(64, 0.1, generator=g)
        assert drop.any()
        explicit = (flow_matching_loss(model, x, y, t=t, noise=noise, label_drop=drop) if family == "sit"
                    else diffusion_loss(model, x, y, noise_schedule="cosine", t=t, noise=noise, label_drop=drop))
    torch.testing.assert_close(first, explicit, rtol=0, atol=0)


@pytest.mark.parametrize("family", ["sit", "dit"])
def test_without_a_generator_the_draws_follow_the_authors_scripts(generators, family):
    """SiT: t = rand(B) on the CPU, noise = randn_like(x), then the model's label drop; DiT:
    t = randint(0, 1000, (B,)) on x's device, then the same."""
    cls = SiT if family == "sit" else DiT
    model = cls.from_pretrained(generators[family]).train()
    x, y, _ = _inputs(model, 64)
    call = (lambda **kw: flow_matching_loss(model, x, y, weighting="uniform", **kw)) if family == "sit" else (
        lambda **kw: diffusion_loss(model, x, y, **kw))
    with torch.no_grad():
        torch.manual_seed(21)
        drawn = call()
        torch.manual_seed(21)
        t = torch.rand(64) if family == "sit" else torch.randint(0, T_STEPS, (64,))
        noise = torch.randn_like(x)
        drop = torch.rand(64) < 0.1
        assert drop.any()
        explicit = call(t=t, noise=noise, label_drop=drop)
    torch.testing.assert_close(drawn, explicit, rtol=0, atol=0)


# ---- the schedule shared with sampling ----


def test_the_cosine_schedule_is_shared_with_sampling():
    diffusion = GaussianDiffusion(noise_schedule="cosine")
    torch.testing.assert_close(torch.cumprod(1 - diffusion.betas, 0), torch.cumprod(1 - _reference_betas("cosine"), 0),
                               rtol=1e-12, atol=0)
    assert float(diffusion.betas[-1]) == pytest.approx(0.999)  # the clip
    target = torch.randn(4, 3, dtype=torch.float64)
    abar = torch.cumprod(1 - _reference_betas("cosine"), 0)

    def exact_noise(x, timestep):  # the exact noise prediction when every sample equals target
        a = float(abar[int(timestep)])
        return (x - a**0.5 * target) / (1 - a) ** 0.5

    out = sample_diffusion(exact_noise, torch.randn(2, 4, 3, dtype=torch.float64), steps=20, sampler="ddim",
                           learn_sigma=False, noise_schedule="cosine")
    torch.testing.assert_close(out, target.expand_as(out), rtol=0, atol=1e-8)


def test_per_sample_lookups_are_at_least_float32_and_follow_the_tables_device():
    """bf16 outputs (autocast) meet float32 schedule values, as in the authors' code."""
    diffusion = GaussianDiffusion(noise_schedule="cosine")
    t = torch.tensor([0, 5, 999])
    for dtype, expected in [(torch.bfloat16, torch.float32), (torch.float32, torch.float32), (torch.float64, torch.float64)]:
        values = diffusion.at(diffusion.sqrt_alphas_cumprod, t, torch.zeros(3, 2, 4, dtype=dtype))
        assert values.dtype == expected and values.shape == (3, 1, 1)
        torch.testing.assert_close(values.flatten(), diffusion.sqrt_alphas_cumprod[t].to(expected))
    moved = diffusion.to("meta")
    tables = [name for name, value in vars(diffusion).items() if isinstance(value, torch.Tensor)]
    assert {getattr(moved, name).device.type for name in tables} == {"meta"}
    assert {getattr(diffusion, name).device.type for name in tables} == {"cpu"}


def test_bf16_autocast_losses_are_close_to_float32(generators):
    sit, dit = SiT.from_pretrained(generators["sit"]), DiT.from_pretrained(generators["dit"])
    x, y, noise = _inputs(sit, 8)
    t_flow, t_steps = torch.rand(8), torch.tensor([0, 1, 2, 100, 500, 900, 998, 999])
    with torch.no_grad():
        exact = (flow_matching_loss(sit, x, y, t=t_flow, noise=noise),
                 diffusion_loss(dit, x, y, noise_schedule="cosine", t=t_steps, noise=noise))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            mixed = (flow_matching_loss(sit, x, y, t=t_flow, noise=noise),
                     diffusion_loss(dit, x, y, noise_schedule="cosine", t=t_steps, noise=noise))
    for loss, reference in zip(mixed, exact):
        assert loss.dtype == torch.float32
        assert rel_err(loss, reference) <= 1e-2


# ---- bad input ----


def test_bad_arguments_are_named(generators):
    sit, dit = SiT.from_pretrained(generators["sit"]), DiT.from_pretrained(generators["dit"])
    x, y, noise = _inputs(sit, 3)
    with pytest.raises(ValueError, match="unknown path 'edm'"):
        flow_matching_loss(sit, x, y, path="edm")
    with pytest.raises(ValueError, match="unknown weighting 'sigmoid'"):
        flow_matching_loss(sit, x, y, weighting="sigmoid")
    with pytest.raises(ValueError, match=r"t must have shape \(3,\)"):
        flow_matching_loss(sit, x, y, t=torch.rand(3, 1))
    with pytest.raises(ValueError, match="t must hold floating-point times"):
        flow_matching_loss(sit, x, y, t=torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match=r"noise must have x's shape \(3, 8, 16\)"):
        flow_matching_loss(sit, x, y, noise=noise[:, :4])
    with pytest.raises(ValueError, match="a velocity must have x's shape"):
        flow_matching_loss(dit, x, y)
    with pytest.raises(ValueError, match="unknown noise_schedule 'quad'"):
        diffusion_loss(dit, x, y, noise_schedule="quad")
    with pytest.raises(ValueError, match=r"t must hold steps in \[0, 1000\)"):
        diffusion_loss(dit, x, y, t=torch.tensor([0, 1000, 3]))
    with pytest.raises(ValueError, match="t must hold integer steps"):
        diffusion_loss(dit, x, y, t=torch.rand(3))
    with pytest.raises(ValueError, match=r"expected x's shape \(3, 8, 16\) \(noise\) or \(3, 8, 32\)"):
        diffusion_loss(lambda *args: torch.zeros(3, 8, 24), x, y)
