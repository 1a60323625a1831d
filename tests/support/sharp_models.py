"""Tiny tokenizer and generators whose attention is sharp, their float64 evaluation, and the
attention mutants that the bf16 and CUDA model checks must catch.

Random checkpoints (the authors' conformance vectors among them) have nearly uniform attention
and small residual branches: replacing attention by a uniform average moves their outputs less
than a bf16 tolerance. `sharpen` draws weights with peaked attention rows and O(1) residual
branches, so that every mutant below moves the outputs far more than bf16 rounding does.

The float64 evaluation is the same module in float64 with its attention computed from the math
in float64 (`float64_evaluation`), independent of the attention backends and of any mutant
injected while it runs. (The tokenizer's soft-VQ step always runs in float32.)

Mutants replace `softvq_fast.nn.transformer.attention`, the name every model's `Attention`
module calls.
"""
from __future__ import annotations

import contextlib
import copy
from typing import Callable, Iterator

import pytest
import torch
from torch import nn

import softvq_fast.nn.transformer as transformer
from softvq_fast.dispatch import NoBackendError
from softvq_fast.models import SoftVQConfig, SoftVQVAE

# Gains of the qkv projections: attention logits of standard deviation about gain**2 on
# unit-variance inputs. Sharper rows make bf16 rounding of q and k move the outputs more and
# bring the unscaled mutant (logits times sqrt(D)) closer; flatter ones bring the uniform
# average closer. These gains put BF16_TOL between the real models' bf16 errors and every
# mutant's with room on both sides (the checks print the errors). The tokenizer takes a larger
# gain: its decoder's image tokens all start from the one mask token, so their keys are alike.
TOKENIZER_QK_GAIN = 1.5
GENERATOR_QK_GAIN = 1.25
# Relative error ‖out − ref‖ / ‖ref‖ allowed against the float64 evaluation.
BF16_TOL = 4e-2
FP32_TOL = 1e-5
# Attention backends the checks run on, each where it can (skipped with its reason elsewhere).
CPU_BACKENDS = ("softvq", "sdpa", "math")
CUDA_BACKENDS = ("softvq", "flash_attn", "xformers", "sdpa", "math")
# The devices of the mutant tests (CUDA ones marked: conftest skips them without a GPU).
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]

Attention = Callable[..., torch.Tensor]


def sharpen(model: nn.Module, seed: int, qk_gain: float) -> nn.Module:
    """Redraw `model`'s weights in place (from a generator seeded with `seed`): qkv projections of
    gain `qk_gain` (peaked attention), LayerScale gammas in [0.5, inf) and unit-variance class
    embeddings (O(1) residual branches and adaLN modulation), LayerNorm weights near 1, other
    matrices of unit gain, vectors (biases) of scale 0.1. The soft-VQ codebook and the fixed
    tables (parameters without gradient: the generators' sin-cos positions) keep their values."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=generator)
            if not param.requires_grad or name.endswith("quantize.embedding"):
                continue
            if name.endswith("gamma"):
                param.copy_(0.5 + noise.abs())
            elif "norm" in name and name.endswith("weight"):
                param.copy_(1 + 0.1 * noise)
            elif name.endswith("freqs"):
                param.mul_(1 + 0.2 * noise)
            elif name.endswith("embedding_table.weight"):
                param.copy_(noise)
            elif "qkv.weight" in name:
                param.copy_(noise * qk_gain / param.shape[1] ** 0.5)
            elif param.dim() >= 2:
                param.copy_(noise / param[0].numel() ** 0.5)
            else:
                param.copy_(0.1 * noise)
    return model


def tiny_tokenizer(seed: int = 0) -> SoftVQVAE:
    """ViT-S width (6 heads of 64), 2 blocks each, 48 px in 16 px patches, 8 latent tokens, 2
    codebooks of 32 x 8 at tau 0.5, sharpened. The decoder's pixel head is scaled by 0.3 so that
    generate()'s clamp to [-1, 1] leaves almost every pixel alone."""
    config = SoftVQConfig(image_size=48, base_image_size=48, codebook_size=32, codebook_embed_dim=8, num_codebooks=2,
                          tau=0.5, num_latent_tokens=8, encoder_depth=2, decoder_depth=2, codebook_show_usage=False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = sharpen(SoftVQVAE(config), seed + 1, TOKENIZER_QK_GAIN)
    with torch.no_grad():
        model.decoder.to_pixel.model.weight.mul_(0.3)
    return model.eval()


def tiny_generator(cls: type, seed: int = 0) -> nn.Module:
    """A SiT or DiT on the tiny tokenizer's latents (8 tokens of 8 channels), 2 blocks of width 128
    in 2 heads of 64 (a head dim every CUDA backend takes), 10 classes, sharpened. A DiT's variance
    logits are scaled by 0.25 to stay near [-1, 1] as a trained model's do: they interpolate
    between two log variances, and far outside that range DDPM's noise scale, their exponential,
    would magnify bf16 rounding."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = cls(input_size=8, in_channels=8, hidden_size=128, depth=2, num_heads=2, num_classes=10, vae_1d=True)
        sharpen(model, seed + 1, GENERATOR_QK_GAIN)
    if model.out_channels > model.in_channels:
        with torch.no_grad():
            for param in (model.final_layer.linear.weight, model.final_layer.linear.bias):
                param[model.in_channels :].mul_(0.25)
    return model.eval()


def float64_copy(model: nn.Module, device: str = "cpu") -> nn.Module:
    """A float64 copy on `device` (evaluate it under `float64_evaluation`)."""
    return copy.deepcopy(model).to(device=device, dtype=torch.float64).eval()


def exact_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float | None = None,
                    backend: str | None = None) -> torch.Tensor:
    """softmax(q·kᵀ·scale)·v in float64, from the math; q (B, Sq, H, D), k, v (B, Sk, H, D)."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    scores = torch.einsum("bqhd,bkhd->bhqk", q.double(), k.double()) * scale
    return torch.einsum("bhqk,bkhd->bqhd", scores.softmax(-1), v.double()).to(q.dtype)


@contextlib.contextmanager
def attention_replaced(fn: Attention) -> Iterator[None]:
    """Within the block every model's attention is `fn` (then whatever it was before)."""
    saved = transformer.attention
    transformer.attention = fn
    try:
        yield
    finally:
        transformer.attention = saved


def float64_evaluation() -> contextlib.AbstractContextManager:
    """Run float64 copies of the models with attention from the math (any mutant set aside)."""
    return attention_replaced(exact_attention)


def _uniform(original: Attention) -> Attention:
    def attention(q, k, v, **kwargs):
        return v.float().mean(1, keepdim=True).expand(-1, q.shape[1], -1, -1).to(q.dtype).contiguous()

    return attention


def _swapped_qk(original: Attention) -> Attention:
    return lambda q, k, v, **kwargs: original(k, q, v, **kwargs)


def _zero(original: Attention) -> Attention:
    return lambda q, k, v, **kwargs: torch.zeros_like(q)


def _softmax_over_queries(original: Attention) -> Attention:
    def attention(q, k, v, scale=None, **kwargs):
        scale = q.shape[-1] ** -0.5 if scale is None else scale
        scores = torch.einsum("bqhd,bkhd->bhqk", q.float(), k.float()) * scale
        return torch.einsum("bhqk,bkhd->bqhd", scores.softmax(-2), v.float()).to(q.dtype)

    return attention


def _unscaled(original: Attention) -> Attention:
    return lambda q, k, v, scale=None, **kwargs: original(q, k, v, scale=1.0, **kwargs)


def _keys_of_next_head(original: Attention) -> Attention:
    return lambda q, k, v, **kwargs: original(q, k.roll(1, dims=2), v, **kwargs)


def _keys_of_next_sample(original: Attention) -> Attention:
    return lambda q, k, v, **kwargs: original(q, k.roll(1, dims=0), v.roll(1, dims=0), **kwargs)


# Plausible attention bugs, each a function of the attention it replaces: values averaged
# uniformly, q and k swapped, the output lost, the softmax over the wrong axis, the 1/sqrt(D)
# scale missing, keys read from the neighbouring head (a head stride bug) and keys and values
# read from the neighbouring sample (a batch stride bug).
MUTANTS: dict[str, Callable[[Attention], Attention]] = {
    "uniform": _uniform,
    "swapped_qk": _swapped_qk,
    "zero": _zero,
    "softmax_over_queries": _softmax_over_queries,
    "unscaled": _unscaled,
    "keys_of_next_head": _keys_of_next_head,
    "keys_of_next_sample": _keys_of_next_sample,
}


def inject_mutant(monkeypatch, name: str) -> None:
    """Make every model's attention the mutant `name` for the rest of the test."""
    monkeypatch.setattr(transformer, "attention", MUTANTS[name](transformer.attention))


def device_backends(cpu: tuple[str, ...] = CPU_BACKENDS) -> list:
    """pytest parameters (device, attention backend): `cpu`'s backends, then every CUDA backend
    (marked cuda)."""
    return [pytest.param("cpu", name, id=f"cpu-{name}") for name in cpu] + [
        pytest.param("cuda", name, id=f"cuda-{name}", marks=pytest.mark.cuda) for name in CUDA_BACKENDS
    ]


def tolerance(precision: str | torch.dtype) -> float:
    """FP32_TOL for float32 (the dtype or the name "float32"); BF16_TOL for bf16 weights or autocast."""
    return FP32_TOL if precision in (torch.float32, "float32") else BF16_TOL


@contextlib.contextmanager
def skip_if_backend_cannot_run(backend: str) -> Iterator[None]:
    """Skip the test, with the dispatcher's reasons, where the attention backend cannot run."""
    try:
        yield
    except NoBackendError as exc:
        pytest.skip(f"attention backend {backend} cannot run here: {exc}")


def report(check: str, errors: dict[str, float]) -> None:
    """Print a check's measured errors (shown with pytest -s or -rP; quoted in the commits)."""
    print(f"{check}: " + ", ".join(f"{k} {v:.3g}" for k, v in errors.items()))
