"""Class labels -> images: sample a generator's latent tokens, de-normalise them with the
tokenizer's vq_mean / vq_std, decode, clamp."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import torch

from softvq_fast.models.adaln_transformer import AdaLNTransformer
from softvq_fast.models.checkpoint import CONFIG_NAME, CheckpointError
from softvq_fast.models.dit import DiT
from softvq_fast.models.sit import SiT
from softvq_fast.sampling import DIFFUSION_SAMPLERS, FLOW_SAMPLERS, PATHS, ConditionalModel, sample_diffusion, sample_flow

DIT_TIME_SCALE = 1000.0


def load_generator(directory: str | Path, *, device: str | torch.device = "cpu", dtype: torch.dtype | None = None) -> AdaLNTransformer:
    """A release-format SiT or DiT folder (config.json + model.safetensors). The family comes
    from the config's tags, else from its fields (`learn_sigma` is DiT's)."""
    config_path = Path(directory) / CONFIG_NAME
    if not config_path.is_file():
        raise CheckpointError(f"{config_path}: not found (a generator folder holds config.json and model.safetensors)")
    config = json.loads(config_path.read_text())
    tags = set(config.get("tags", []))
    is_dit = "DiT" in tags or ("SiT" not in tags and "learn_sigma" in config)
    return (DiT if is_dit else SiT).from_pretrained(directory, device=device, dtype=dtype)


def _labels(class_labels: Sequence[int] | torch.Tensor, generator: AdaLNTransformer, device: torch.device) -> torch.Tensor:
    labels = torch.as_tensor(class_labels, dtype=torch.long, device=device).reshape(-1)
    if labels.numel() == 0:
        raise ValueError("class_labels is empty")
    num_classes = generator.y_embedder.num_classes
    if labels.min() < 0 or labels.max() >= num_classes:
        raise ValueError(f"class_labels must lie in [0, {num_classes}), got {labels.tolist()}")
    return labels


def _check_pair(tokenizer, generator: AdaLNTransformer) -> None:
    config = tokenizer.config
    expected = (config.num_latent_tokens, config.codebook_embed_dim)
    if not generator.vae_1d or generator.latent_shape != expected:
        raise ValueError(
            f"the generator takes samples of shape {generator.latent_shape} but the tokenizer's latents are "
            f"(num_latent_tokens, codebook_embed_dim) = {expected}"
        )


@torch.inference_mode()
def sample_latents(
    generator: AdaLNTransformer,
    labels: torch.Tensor,
    *,
    sampler: str | None = None,
    steps: int = 50,
    cfg_scale: float = 1.0,
    guidance_interval: tuple[float, float] = (0.0, 1.0),
    path: str | None = None,
    seed: int = 0,
    cuda_graph: bool | None = None,
    progress: bool = False,
) -> torch.Tensor:
    """Samples (B, *generator.latent_shape) float32 for labels (B,) on the generator's device.
    SiT: sampler euler (default), heun or sde on `path` (default: the model's path_type if it
    is linear or cosine, else linear). DiT: ddpm (default) or ddim (eta 0).
    `cuda_graph` (default: on CUDA) replays the sampling step as a CUDA graph."""
    device = labels.device
    cuda_graph = device.type == "cuda" if cuda_graph is None else cuda_graph
    rng = torch.Generator(device=device).manual_seed(seed)
    noise = torch.randn((labels.shape[0], *generator.latent_shape), generator=rng, device=device)
    is_dit = isinstance(generator, DiT)
    fn = ConditionalModel(
        generator, labels, cfg_scale=cfg_scale, guidance_interval=guidance_interval,
        time_scale=DIT_TIME_SCALE if is_dit else 1.0, cuda_graph=cuda_graph,
    )
    if is_dit:
        sampler = sampler or "ddpm"
        if sampler not in DIFFUSION_SAMPLERS:
            raise ValueError(f"a DiT samples with one of {DIFFUSION_SAMPLERS}, got {sampler!r}")
        return sample_diffusion(
            fn, noise, steps=steps, sampler=sampler, channel_dim=generator.channel_dim,
            learn_sigma=generator.learn_sigma, generator=rng, progress=progress,
        )
    sampler = sampler or "euler"
    if sampler not in FLOW_SAMPLERS:
        raise ValueError(f"a SiT samples with one of {FLOW_SAMPLERS}, got {sampler!r}")
    path = path or (generator.path_type if generator.path_type in PATHS else "linear")
    return sample_flow(fn, noise, steps=steps, sampler=sampler, path=path, generator=rng, progress=progress)


def generate(
    tokenizer,
    generator: AdaLNTransformer,
    class_labels: Sequence[int] | torch.Tensor,
    *,
    sampler: str | None = None,
    steps: int = 50,
    cfg_scale: float = 1.0,
    guidance_interval: tuple[float, float] = (0.0, 1.0),
    path: str | None = None,
    seed: int = 0,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    cuda_graph: bool | None = None,
    progress: bool = False,
) -> torch.Tensor:
    """Images (B, 3, H, W) float32 in [-1, 1] for B class labels.

    `tokenizer` is a SoftVQVAE, `generator` a SiT or DiT on its latent tokens
    (input_size = num_latent_tokens, in_channels = codebook_embed_dim). Both are moved (in
    place) to `device` (default: the generator's) and the generator to `dtype` (default: its
    own; bf16 is the fast choice on GPUs); the tokenizer decodes under autocast to that dtype.
    Sampling arguments as in `sample_latents`; the same seed gives the same images on the same
    device and dtype."""
    _check_pair(tokenizer, generator)
    parameter = next(generator.parameters())
    device = torch.device(device) if device is not None else parameter.device
    dtype = dtype or parameter.dtype
    generator.to(device=device, dtype=dtype).eval()
    tokenizer.to(device).eval()
    labels = _labels(class_labels, generator, device)
    latents = sample_latents(
        generator, labels, sampler=sampler, steps=steps, cfg_scale=cfg_scale, guidance_interval=guidance_interval,
        path=path, seed=seed, cuda_graph=cuda_graph, progress=progress,
    )
    with torch.inference_mode():
        autocast = None if dtype == torch.float32 else dtype
        images = tokenizer.decode(tokenizer.denormalize_latents(latents), autocast_dtype=autocast)
    return images.float().clamp(-1.0, 1.0)
