"""Class labels -> images: sample a generator's latent tokens, de-normalise them with the
tokenizer's vq_mean / vq_std, decode, clamp."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch

from softvq_fast import hub
from softvq_fast.models import fields
from softvq_fast.models.fields import FieldError
from softvq_fast.models.adaln_transformer import AdaLNTransformer
from softvq_fast.models.checkpoint import CONFIG_NAME, CheckpointError, read_json
from softvq_fast.models.config import SoftVQConfig
from softvq_fast.models.dit import DiT
from softvq_fast.models.sit import SiT
from softvq_fast.sampling import DIFFUSION_SAMPLERS, FLOW_SAMPLERS, PATHS, ConditionalModel, sample_diffusion, sample_flow
from softvq_fast.sampling.diffusion import TRAIN_STEPS

DIT_TIME_SCALE = 1000.0
# Generator precisions generate() runs (the tokenizer decodes under autocast to the same dtype).
GENERATION_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def generator_family(directory: Path) -> type[AdaLNTransformer]:
    """SiT or DiT for a release folder: from its config.json's tags, else from its fields
    (`learn_sigma` is DiT's)."""
    config_path = directory / CONFIG_NAME
    config = read_json(config_path, "SiT or DiT arguments")
    tags = config.get("tags", [])
    if not isinstance(tags, list) or not all(isinstance(tag, str) for tag in tags):
        raise CheckpointError(f"{config_path}: tags must be a list of strings, got {tags!r}")
    is_dit = "DiT" in tags or ("SiT" not in tags and "learn_sigma" in config)
    return DiT if is_dit else SiT


def load_generator(
    path: str | Path, *, revision: str | None = None, device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
) -> AdaLNTransformer:
    """A release-format SiT or DiT: a local folder (config.json + model.safetensors) or a Hugging
    Face Hub repo id such as "SoftVQVAE/sit-xl_softvq-b-64" (see `softvq_fast.hub.resolve`).
    The family comes from `generator_family`; loading as in `AdaLNTransformer.from_pretrained`."""
    directory = hub.resolve(path, revision=revision)
    return generator_family(directory).from_pretrained(directory, device=device, dtype=dtype)


def check_class_labels(class_labels: Sequence[int] | torch.Tensor, num_classes: int) -> torch.Tensor:
    """The labels as a flat int64 tensor (on their own device), or ValueError naming class_labels."""
    try:
        labels = torch.as_tensor(class_labels).reshape(-1)
    except (TypeError, ValueError, RuntimeError):
        labels = None
    integer = labels is not None and not (labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool)
    if not integer or labels.numel() == 0 or labels.min() < 0 or labels.max() >= num_classes:
        shown = labels.tolist() if integer else class_labels
        raise FieldError("class_labels", f"class_labels must lie in [0, {num_classes}) (a non-empty sequence of "
                                         f"integers), got {shown!r}")
    return labels.long()


def check_pair(tokenizer_config: SoftVQConfig, generator: AdaLNTransformer) -> None:
    """ValueError unless the generator samples the tokenizer's latents."""
    expected = (tokenizer_config.num_latent_tokens, tokenizer_config.codebook_embed_dim)
    if not generator.vae_1d or generator.latent_shape != expected:
        raise ValueError(
            f"the generator takes samples of shape {generator.latent_shape} but the tokenizer's latents are "
            f"(num_latent_tokens, codebook_embed_dim) = {expected}"
        )


def check_noise(noise: torch.Tensor | None, count: int, generator: AdaLNTransformer) -> None:
    """FieldError naming `noise` unless it is None or a float32/float64 tensor (count, *latent_shape)."""
    shape = (count, *generator.latent_shape)
    if noise is not None and not (isinstance(noise, torch.Tensor) and noise.dtype in (torch.float32, torch.float64)
                                  and tuple(noise.shape) == shape):
        shown = f"{noise.dtype} {tuple(noise.shape)}" if isinstance(noise, torch.Tensor) else repr(noise)
        raise FieldError("noise", f"noise must be a float32 or float64 tensor of shape {shape}, got {shown}")


def check_sampling_arguments(
    generator: AdaLNTransformer, *, sampler: str | None, steps: int, cfg_scale: float,
    guidance_interval: tuple[float, float], path: str | None, seed: int, cuda_graph: bool | None,
) -> None:
    """FieldError (a ValueError) naming the first argument of `sample_latents` that it cannot run."""
    is_dit = isinstance(generator, DiT)
    fields.integer("steps", steps)
    if is_dit and steps > TRAIN_STEPS:
        raise FieldError("steps", f"steps must be at most {TRAIN_STEPS} for a DiT (its training steps), got {steps}")
    family, samplers = ("DiT", DIFFUSION_SAMPLERS) if is_dit else ("SiT", FLOW_SAMPLERS)
    if sampler is not None and sampler not in samplers:
        raise FieldError("sampler", f"sampler={sampler!r}: a {family} samples with one of {samplers}")
    if path is not None:
        if is_dit:
            raise FieldError("path", f"path={path!r} applies to SiT (flow) sampling; a DiT samples on its diffusion schedule")
        fields.text("path", path, PATHS)
    if fields.real("cfg_scale", cfg_scale) != 1.0 and generator.y_embedder.dropout_prob <= 0:
        raise FieldError("cfg_scale", f"cfg_scale={cfg_scale} needs a null class for guidance, but this generator "
                                      "was built with class_dropout_prob=0 (use cfg_scale=1)")
    if not isinstance(guidance_interval, (tuple, list)) or len(guidance_interval) != 2:
        raise FieldError("guidance_interval", f"guidance_interval must be a pair (low, high), got {guidance_interval!r}")
    low = fields.real("guidance_interval low", guidance_interval[0], at_least=0, at_most=1)
    high = fields.real("guidance_interval high", guidance_interval[1], at_least=0, at_most=1)
    if low > high:
        raise FieldError("guidance_interval", f"guidance_interval must have low <= high, got {tuple(guidance_interval)}")
    fields.integer("seed", seed, minimum=0)
    if cuda_graph is not None:
        fields.boolean("cuda_graph", cuda_graph)


def resolve_sampler(generator: AdaLNTransformer, sampler: str | None, path: str | None) -> tuple[str, str | None]:
    """(sampler, path) with the defaults filled in: a DiT samples with ddpm (path None); a SiT with
    euler on its training path_type if that is linear or cosine, else on the linear path."""
    if isinstance(generator, DiT):
        return sampler or "ddpm", None
    return sampler or "euler", path or (generator.path_type if generator.path_type in PATHS else "linear")


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
    noise: torch.Tensor | None = None,
    cuda_graph: bool | None = None,
    progress: bool = False,
) -> torch.Tensor:
    """Samples (B, *generator.latent_shape) float32 for labels (B,) on the generator's device.
    SiT: sampler euler (default), heun or sde on `path` (default: the model's path_type if it
    is linear or cosine, else linear). DiT: ddpm (default) or ddim (eta 0) on the beta schedule it
    was trained with (`generator.noise_schedule`).
    `noise` (B, *generator.latent_shape), when given, is the starting noise instead of a draw
    from `seed`, which then drives only the stochastic samplers' (sde, ddpm) per-step noise.
    `cuda_graph` (default: on CUDA) replays the sampling step as a CUDA graph. Arguments are
    checked first (`check_sampling_arguments`)."""
    check_sampling_arguments(generator, sampler=sampler, steps=steps, cfg_scale=cfg_scale,
                             guidance_interval=guidance_interval, path=path, seed=seed, cuda_graph=cuda_graph)
    labels = check_class_labels(labels, generator.y_embedder.num_classes)
    check_noise(noise, labels.shape[0], generator)
    device = labels.device
    cuda_graph = device.type == "cuda" if cuda_graph is None else cuda_graph
    rng = torch.Generator(device=device).manual_seed(seed)
    if noise is None:
        noise = torch.randn((labels.shape[0], *generator.latent_shape), generator=rng, device=device)
    noise = noise.to(device)
    is_dit = isinstance(generator, DiT)
    fn = ConditionalModel(
        generator, labels, cfg_scale=cfg_scale, guidance_interval=guidance_interval,
        time_scale=DIT_TIME_SCALE if is_dit else 1.0, cuda_graph=cuda_graph,
    )
    sampler, path = resolve_sampler(generator, sampler, path)
    if is_dit:
        return sample_diffusion(
            fn, noise, steps=steps, sampler=sampler, channel_dim=generator.channel_dim,
            learn_sigma=generator.learn_sigma, noise_schedule=generator.noise_schedule, generator=rng,
            progress=progress,
        )
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
    noise: torch.Tensor | None = None,
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
    Sampling arguments (`noise` too) as in `sample_latents`; the same seed gives the same images
    on the same device and dtype. Every argument is checked before any work (ValueError naming it)."""
    check_pair(tokenizer.config, generator)
    check_sampling_arguments(generator, sampler=sampler, steps=steps, cfg_scale=cfg_scale,
                             guidance_interval=guidance_interval, path=path, seed=seed, cuda_graph=cuda_graph)
    labels = check_class_labels(class_labels, generator.y_embedder.num_classes)
    check_noise(noise, labels.shape[0], generator)
    parameter = next(generator.parameters())
    device = _device(device) if device is not None else parameter.device
    dtype = dtype or parameter.dtype
    if dtype not in GENERATION_DTYPES:
        raise FieldError("dtype", f"dtype must be one of {', '.join(map(str, GENERATION_DTYPES))} or None, got {dtype!r}")
    generator.to(device=device, dtype=dtype).eval()
    tokenizer.to(device).eval()
    labels = labels.to(device)
    latents = sample_latents(
        generator, labels, sampler=sampler, steps=steps, cfg_scale=cfg_scale, guidance_interval=guidance_interval,
        path=path, seed=seed, noise=noise, cuda_graph=cuda_graph, progress=progress,
    )
    with torch.inference_mode():
        autocast = None if dtype == torch.float32 else dtype
        images = tokenizer.decode(tokenizer.denormalize_latents(latents), autocast_dtype=autocast)
    return images.float().clamp(-1.0, 1.0)


def _device(device: str | torch.device) -> torch.device:
    """torch.device(device), or ValueError naming `device` (unknown spelling, CUDA unavailable)."""
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise FieldError("device", f"device must be a torch device such as 'cpu' or 'cuda:0', got {device!r}") from exc
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise FieldError("device", f"device={device!r}: CUDA is not available in this torch build or machine")
    return resolved
