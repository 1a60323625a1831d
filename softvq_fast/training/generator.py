"""`train_generator(config)`: SiT (flow matching) or DiT (DDPM) trained on the latents of an
`encode-dataset` folder (`softvq_fast.data.LatentShards`), on `softvq_fast.training.loop`.

The run folder (`config.out`):
  config.json         the run: model family and arguments, training settings, the data's identity
  log.jsonl           one JSON line per log interval (each term's mean, samples/s, lr) and events
  checkpoints/        step-NNNNNNNNN.pt, the newest keep_checkpoints of them
  samples/            step-N.safetensors (latents, labels) from the EMA model, and step-N.png
                      decoded with the tokenizer when one is given
  export/             the EMA weights in the release layout (config.json + model.safetensors),
                      written at the end: `load_generator` and `softvq-fast generate` read it
  tensorboard/        when tensorboard is installed
"""
from __future__ import annotations

import json
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

import torch
from safetensors.torch import save_file
from torch.utils.data import DataLoader

from softvq_fast.data import DatasetError, LatentShards, StreamSampler
from softvq_fast.models import fields
from softvq_fast.models.adaln_transformer import METADATA_FIELDS, AdaLNTransformer, parse_preset, preset_kwargs
from softvq_fast.models.checkpoint import CONFIG_NAME, SAFETENSORS_NAME, CheckpointError, read_json
from softvq_fast.models.dit import DiT, default_noise_schedule
from softvq_fast.models.sit import SiT
from softvq_fast.sampling.diffusion import NOISE_SCHEDULES
from softvq_fast.sampling.flow import PATHS
from softvq_fast.training.loop import (
    LoopSettings, Runtime, SetupError, TrainingLoop, attention_backend, check_adamw, linear_backend,
    in_runtime, prepare_run_folder, settings_dict, slow_backend_warnings,
)
from softvq_fast.training.objectives import FLOW_WEIGHTINGS, diffusion_loss, flow_matching_loss

FAMILIES = {"SiT": SiT, "DiT": DiT}
# Settings a resumed run may change: how it runs, logs and samples, not what it trains.
OPERATIONAL_SETTINGS = frozenset({
    "out", "latents", "model", "steps", "micro_batch", "precision", "compile", "fsdp", "checkpoint_every",
    "keep_checkpoints", "log_every", "device", "progress", "num_workers", "resume", "export", "tokenizer",
    "sample_every", "sample_classes", "sample_steps", "sample_cfg_scale",
})


@dataclass(kw_only=True)
class GeneratorTrainingConfig(LoopSettings):
    """A generator training run (keyword arguments). `model`: a preset name ("SiT-XL/1",
    "DiT-B/1": random weights, sized to the latents, `num_classes` classes (default: the latents'
    class folders) with label dropout `class_dropout_prob`) or a release folder (config.json +
    model.safetensors: its architecture and weights are the start). SiT trains with
    `flow_matching_loss` on `path` with `weighting`, DiT with `diffusion_loss` on
    `noise_schedule` (default: the release's, else cosine on 1-D tokens as the authors train;
    recorded in the export so that sampling follows it); both with the authors' AdamW defaults (lr 1e-4, betas 0.9/0.999, no weight
    decay), gradient clipping at 1 and an EMA of decay 0.9999. The loop settings (global batch,
    micro-batch, precision, FSDP, checkpoints, logs) are those of `LoopSettings`.
    sample_every: steps between sample grids of the EMA model (0: none), `sample_classes`
    (default: up to 16 spread over the classes), decoded with `tokenizer` (a SoftVQ release
    folder) when given. export: where the EMA goes at the end (default out/export).
    flip: read the flipped images' latents half of the time where the shards hold them."""

    latents: Path
    model: str
    steps: int = 400_000
    global_batch: int = 256
    lr: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 0.0
    path: str = "linear"
    weighting: str = "lognormal"
    noise_schedule: str | None = None
    num_classes: int | None = None
    class_dropout_prob: float = 0.1
    flip: bool = True
    sample_every: int = 10_000
    sample_classes: list[int] | None = None
    sample_steps: int = 50
    sample_cfg_scale: float = 1.0
    tokenizer: Path | None = None
    num_workers: int = 4
    resume: bool = False
    export: Path | None = None

    def check(self) -> None:
        """FieldError (a ValueError) naming the first setting that cannot train, before anything is read."""
        super().check()
        check_adamw(self.lr, self.betas, self.weight_decay)
        fields.text("path", self.path, PATHS)
        fields.text("weighting", self.weighting, FLOW_WEIGHTINGS)
        if self.noise_schedule is not None:
            fields.text("noise_schedule", self.noise_schedule, NOISE_SCHEDULES)
        fields.optional_integer("num_classes", self.num_classes)
        fields.real("class_dropout_prob", self.class_dropout_prob, at_least=0, below=1)
        for name in ("sample_every", "num_workers"):
            fields.integer(name, getattr(self, name), minimum=0)
        fields.integer("sample_steps", self.sample_steps)
        fields.real("sample_cfg_scale", self.sample_cfg_scale)
        for name in ("flip", "resume"):
            fields.boolean(name, getattr(self, name))


# ------------------------------------------------------------------------------------ the model
@dataclass(frozen=True)
class ModelSpec:
    """A generator to build: its family ("SiT" or "DiT"), its constructor's arguments (what the
    release config.json holds besides metadata) and the release folder whose weights start it
    (None: random weights)."""

    family: str
    arguments: dict[str, Any]
    weights: Path | None = None

    def build(self) -> AdaLNTransformer:
        return FAMILIES[self.family](**self.arguments)


def resolve_model(config: GeneratorTrainingConfig, data: LatentShards) -> ModelSpec:
    """The model `config.model` names, sized to `data` for a preset. SetupError("model", ...)
    when it names nothing, or describes a model that cannot take these latents."""
    source = Path(config.model)
    if source.is_dir():
        from softvq_fast.generation import generator_family

        try:
            family = generator_family(source).__name__
            arguments = {k: v for k, v in read_json(source / CONFIG_NAME, f"{family} arguments").items()
                         if k not in METADATA_FIELDS}
            FAMILIES[family].from_config(source)  # checks the arguments, allocates nothing
        except CheckpointError as exc:
            raise SetupError("model", str(exc)) from None
        if family == "SiT":
            arguments["path_type"] = config.path  # what it is trained on, so sampling follows it
        else:
            arguments["noise_schedule"] = config.noise_schedule or arguments.get(
                "noise_schedule") or default_noise_schedule(arguments.get("vae_1d", False))
        spec = ModelSpec(family, arguments, source)
    else:
        try:
            family = parse_preset(config.model)[0]
        except ValueError as exc:
            raise SetupError("model", f"{config.model!r} is neither a folder nor a preset: {exc}") from None
        num_classes = config.num_classes if config.num_classes is not None else data.num_classes
        if num_classes < 1:
            raise SetupError("num_classes", f"the latents in {data.folder} have no class labels; give num_classes")
        arguments = {**preset_kwargs(config.model, family), "input_size": data.latent_shape[0],
                     "in_channels": data.latent_shape[1], "vae_1d": True, "num_classes": num_classes,
                     "class_dropout_prob": config.class_dropout_prob}
        arguments.update({"path_type": config.path} if family == "SiT" else
                         {"learn_sigma": True, "noise_schedule": config.noise_schedule or default_noise_schedule(True)})
        spec = ModelSpec(family, arguments)
    with torch.device("meta"):
        skeleton = spec.build()
    check_data_fits(skeleton, data)
    return spec


def check_data_fits(model: AdaLNTransformer, data: LatentShards) -> None:
    """SetupError unless the model takes the latents' shape and every label is one of its classes."""
    if not model.vae_1d or model.latent_shape != data.latent_shape:
        what = f"(tokens, channels) = {model.latent_shape}" if model.vae_1d else f"2-D latents {model.latent_shape}"
        raise SetupError("model", f"the model takes {what}, but the latents in {data.folder} are "
                                  f"(tokens, channels) = {data.latent_shape}")
    if not data.has_labels:
        raise SetupError("latents", f"{data.folder} holds no class labels (encode an image folder with class "
                                    "subfolders)")
    labels = data.labels()
    classes = model.y_embedder.num_classes
    if len(labels) and (int(labels.min()) < 0 or int(labels.max()) >= classes):
        raise SetupError("latents", f"labels in {data.folder} lie in [{int(labels.min())}, {int(labels.max())}], "
                                    f"outside the model's {classes} classes [0, {classes})")


def load_model(spec: ModelSpec, seed: int) -> AdaLNTransformer:
    """The model with its starting weights: the release folder's, or a random initialisation drawn
    from a generator seeded by `seed` (the caller's global generator is left as it was)."""
    if spec.weights is not None:
        try:
            model = FAMILIES[spec.family].from_pretrained(spec.weights)
        except CheckpointError as exc:
            raise SetupError("model", str(exc)) from None
        if isinstance(model, SiT):
            model.path_type = spec.arguments["path_type"]
        else:
            model.noise_schedule = spec.arguments["noise_schedule"]
        return model
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return spec.build()


def save_release(directory: Path, family: str, arguments: dict[str, Any], state: dict[str, torch.Tensor]) -> None:
    """The release layout `load_generator` reads: config.json (the constructor's arguments and
    tags naming the family) and model.safetensors, written into a temporary folder that then
    replaces `directory`."""
    directory = Path(directory)
    temporary = directory.with_name(f"{directory.name}.tmp-{os.getpid()}")
    shutil.rmtree(temporary, ignore_errors=True)
    temporary.mkdir(parents=True)
    config = {**arguments, "tags": [family, "softvq-fast"]}
    (temporary / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    tensors = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in state.items()}
    save_file(tensors, str(temporary / SAFETENSORS_NAME), metadata={"format": "pt"})
    old = directory.with_name(f"{directory.name}.old-{os.getpid()}")
    if directory.exists():
        os.replace(directory, old)
    os.replace(temporary, directory)
    shutil.rmtree(old, ignore_errors=True)


# ------------------------------------------------------------------------------------ backends
def training_backends(model: AdaLNTransformer, micro_batch: int, device: torch.device,
                      autocast_dtype: torch.dtype | None) -> dict[str, str]:
    """The backend each op picks for this model's training step, forward and backward: attention
    (q, k, v in the autocast dtype), LayerNorm-modulate (the float32 residual stream), linear
    (inputs that need a gradient). Raises the op's NoBackendError when a backend the model was
    set to cannot train."""
    from softvq_fast.ops.layernorm_modulate import BACKENDS as LAYERNORM_MODULATE, LayerNormModulateInputs

    block = model.blocks[0]
    norm = LayerNormModulateInputs(device, torch.float32, True, block.attn.dim)
    return {"attention": attention_backend(block.attn, micro_batch, model.num_tokens, device, autocast_dtype),
            "layernorm_modulate": LAYERNORM_MODULATE.select(norm, block.norm_backend).name,
            "linear": linear_backend(block.attn.qkv, micro_batch * model.num_tokens, device)}


# ------------------------------------------------------------------------------------ run folder
def data_identity(data: LatentShards) -> dict[str, Any]:
    """What makes two latent folders the same data for a resumed run."""
    manifest = data.manifest
    return {"items": len(data), "latent_shape": list(data.latent_shape), "vq_mean": data.vq_mean,
            "vq_std": data.vq_std, "hflip": data.has_flips, "files_sha256": manifest.get("files_sha256"),
            "tokenizer_sha256": manifest.get("model_sha256")}


def run_config(config: GeneratorTrainingConfig, spec: ModelSpec, data: LatentShards) -> dict[str, Any]:
    training = {k: v for k, v in settings_dict(config).items() if k not in OPERATIONAL_SETTINGS}
    return {"family": spec.family, "model": spec.arguments, "training": training, "data": data_identity(data)}


# ------------------------------------------------------------------------------------ samples
def default_sample_classes(num_classes: int, count: int = 16) -> list[int]:
    """Up to `count` labels spread evenly over [0, num_classes)."""
    count = min(count, num_classes)
    return sorted({round(i * (num_classes - 1) / max(count - 1, 1)) for i in range(count)})


class SampleGrids:
    """A hook writing samples of the EMA model every `every` steps to out/samples: the latents
    (normalised, as the generator produces them) and, with a tokenizer, the decoded grid."""

    def __init__(self, loop: TrainingLoop, ema: AdaLNTransformer, config: GeneratorTrainingConfig, tokenizer=None) -> None:
        self.loop, self.ema, self.config, self.tokenizer = loop, ema, config, tokenizer
        self.labels = torch.tensor(config.sample_classes or default_sample_classes(ema.y_embedder.num_classes))
        self.folder = Path(config.out) / "samples"
        # FSDP shards the EMA: every rank runs its forward passes; otherwise rank 0 alone samples.
        self.runs_here = loop.runtime.is_main or loop.settings.fsdp

    def __call__(self, step: int) -> None:
        every = self.config.sample_every
        if not every or not self.runs_here or (step % every and step != self.config.steps):
            return
        from softvq_fast.generation import sample_latents

        device = self.loop.runtime.device
        common = dict(steps=self.config.sample_steps, cfg_scale=self.config.sample_cfg_scale, seed=self.config.seed,
                      cuda_graph=False)
        latents = sample_latents(self.ema, self.labels.to(device), **common)
        images = None
        if self.tokenizer is not None:
            with torch.inference_mode():  # as softvq_fast.generate decodes
                images = self.tokenizer.decode(self.tokenizer.denormalize_latents(latents)).float().clamp(-1, 1)
        if not self.loop.runtime.is_main:
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        save_file({"latents": latents.float().cpu().contiguous(), "labels": self.labels},
                  str(self.folder / f"step-{step}.safetensors"))
        if images is not None:
            from softvq_fast.commands.generate import save_grid

            save_grid(images, self.folder / f"step-{step}.png")
        self.loop.log_event("samples", path=str(self.folder / f"step-{step}.safetensors"))


def load_sampling_tokenizer(config: GeneratorTrainingConfig, data: LatentShards, model: AdaLNTransformer, device):
    """The tokenizer that decodes sample grids, checked against the latents and the model."""
    from softvq_fast.generation import check_pair
    from softvq_fast.models import SoftVQVAE

    try:
        tokenizer = SoftVQVAE.from_pretrained(config.tokenizer, device=device)
        check_pair(tokenizer.config, model)
    except (CheckpointError, ValueError) as exc:
        raise SetupError("tokenizer", str(exc)) from None
    stats = (tokenizer.config.vq_mean, tokenizer.config.vq_std)
    if stats != (data.vq_mean, data.vq_std):
        raise SetupError("tokenizer", f"its (vq_mean, vq_std) = {stats} differ from the latents' "
                                      f"{(data.vq_mean, data.vq_std)}: it would decode them at another scale")
    return tokenizer


# ------------------------------------------------------------------------------------ training
def train_generator(config: GeneratorTrainingConfig, hooks: Iterable[Callable[[int], None]] = ()) -> Path:
    """Train (or with `config.resume`, continue) a generator run; returns the export folder.

    Everything is checked before the first step: the settings (ValueError), the latents (every
    shard, the labels against the model's classes), the model against the latents' shape, the
    run folder against the configuration of the run it holds, the tokenizer (SetupError naming
    the argument). `hooks`: functions called with each finished step number (after logging and
    checkpointing). Under torchrun every process calls this; see softvq_fast.training.loop."""
    return in_runtime(config, lambda runtime: _train(config, runtime, hooks))


def _train(config: GeneratorTrainingConfig, runtime: Runtime, hooks: Iterable[Callable[[int], None]]) -> Path:
    try:
        data = LatentShards(config.latents, flip=config.flip, seed=config.seed)
    except DatasetError as exc:
        raise SetupError("latents", exc.message) from None
    spec = resolve_model(config, data)
    model = load_model(spec, config.seed)
    loop = TrainingLoop(config, runtime, config=run_config(config, spec, data), data_size=len(data))
    tokenizer = None
    if config.tokenizer is not None and config.sample_every and (runtime.is_main or config.fsdp):
        tokenizer = load_sampling_tokenizer(config, data, model, runtime.device)
    backends = training_backends(model, loop.plan.micro_batch, runtime.device, loop.autocast_dtype)
    for warning in slow_backend_warnings(backends, runtime.device):
        if runtime.is_main:
            print(f"warning: {warning}", file=sys.stderr)
    checkpoint = prepare_run_folder(Path(config.out), loop.config, resume=config.resume, runtime=runtime)
    part = loop.add_part("generator", model, lr=config.lr, betas=tuple(config.betas),
                         weight_decay=config.weight_decay, fsdp_units=model.blocks)
    if checkpoint is not None:
        loop.load_checkpoint(checkpoint)
    loop.open_logs(resumed=checkpoint is not None)
    loop.log_event("start", world_size=runtime.world_size, device=str(runtime.device), backends=backends,
                   resumed_from=str(checkpoint) if checkpoint else None, plan=vars(loop.plan))
    sampler = StreamSampler(len(data), global_batch=config.global_batch, rank=runtime.rank,
                            world_size=runtime.world_size, seed=config.seed, start_step=loop.step,
                            stop_step=config.steps)
    loader = DataLoader(data, batch_size=loop.plan.micro_batch, sampler=sampler, num_workers=config.num_workers,
                        pin_memory=runtime.device.type == "cuda")
    objective = _objective(config, spec)

    def step(number: int, micro_batches: list) -> dict[str, torch.Tensor]:
        def loss(runner, batch, index: int) -> dict[str, torch.Tensor]:
            x = batch[0].to(runtime.device, non_blocking=True)
            y = batch[1].to(runtime.device, non_blocking=True)
            with loop.autocast():
                losses = objective(runner, x, y, generator=loop.draw_generator(number, index))
            return {"loss": losses.float().mean()}

        return {**loop.accumulate(part, micro_batches, loss), **loop.update(part)}

    grids = SampleGrids(loop, part.ema, config, tokenizer)
    try:
        loop.run(step, iter(loader), hooks=[grids, *hooks])
        export = Path(config.export or Path(config.out) / "export")
        state = loop.full_state_dict(part.ema)  # every rank: FSDP gathers the shards
        if runtime.is_main:
            save_release(export, spec.family, spec.arguments, state)
            loop.log_event("export", path=str(export))
        runtime.barrier()
    finally:
        loop.close()
    return export


def _objective(config: GeneratorTrainingConfig, spec: ModelSpec) -> Callable[..., torch.Tensor]:
    if spec.family == "SiT":
        return lambda model, x, y, generator: flow_matching_loss(model, x, y, path=config.path,
                                                                 weighting=config.weighting, generator=generator)
    schedule = spec.arguments["noise_schedule"]
    return lambda model, x, y, generator: diffusion_loss(model, x, y, noise_schedule=schedule, generator=generator)
