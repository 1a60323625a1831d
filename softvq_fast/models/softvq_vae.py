"""SoftVQ-VAE: ViT encoder -> latent tokens -> soft vector quantisation -> ViT decoder.

    images (B, 3, H, W) in [-1, 1]
      encoder            (B, T, width_enc)   latent-token outputs of the encoder ViT
      quant_conv         (B, T, D)           linear to the codebook dimension
      quantize           (B, T, D)           softvq_fast.soft_vq over C codebooks (token segments)
      post_quant_conv    (B, T, width_dec)
      decoder            (B, 3, H, W)

`encode` returns the soft-quantised latents (what generators are trained on); `decode` maps latents
back to images. Generators use `normalize_latents` / `denormalize_latents` with the config's scalar
`vq_mean`, `vq_std`.

Training: `training_forward` (or `forward(images, training_outputs=True)`, the form a
DistributedDataParallel wrapper calls) returns the reconstruction with what the losses need: the
entropy regulariser of the fused soft-VQ op, the soft-quantised latents and, when the model holds
the representation-alignment projector (`projection`, set by softvq_fast.training.tokenizer_model),
the projected latents. Drop path (config `enc_drop_path_rate` / `dec_drop_path_rate`) acts in
training mode only; `encode` / `decode` are the inference path.
"""
from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from softvq_fast import hub
from softvq_fast.models import checkpoint, fields
from softvq_fast.models.config import SoftVQConfig, preset_config, vit_spec
from softvq_fast.models.vit import Block, DropPathDraws, LatentDecoder, LatentEncoder
from softvq_fast.nn.linear import Linear, set_linear_backend
from softvq_fast.nn.soft_vq import SoftVectorQuantizer
from softvq_fast.nn.transformer import Attention
from softvq_fast.ops.soft_vq import soft_vq

logger = logging.getLogger("softvq_fast")


@dataclass
class TrainingOutputs:
    """One training forward of B images (T latent tokens of dimension D, C codebooks of K codes).

    reconstructions: (B, 3, S, S) float32, the decoder's output (not clamped).
    latents: (B, T, D) float32, the soft-quantised latents the decoder read.
    entropy_loss: scalar float32, the soft-VQ entropy regulariser (mean row entropy minus the
        entropy of the mean distribution, at temperature 0.01) before any weight; differentiable.
    projected: (B, T, width) `projection(latents)` (the alignment loss's tokens), None without
        a projector.
    code_counts: (C, K) int64, how many tokens picked each code (argmax), for usage statistics.
    max_prob: scalar, mean largest code probability at temperature tau.
    cos: scalar, mean cosine similarity of the quantiser's input and output tokens.
    entropy_column_sum: (C, K) float32, differentiable: the sum over the B x T tokens of their
        code distributions at temperature 0.01, of which entropy_loss's mean distribution is made.
    """

    reconstructions: torch.Tensor
    latents: torch.Tensor
    entropy_loss: torch.Tensor
    projected: torch.Tensor | None
    code_counts: torch.Tensor
    max_prob: torch.Tensor
    cos: torch.Tensor
    entropy_column_sum: torch.Tensor


class SoftVQVAE(nn.Module):
    """The SoftVQ-VAE tokenizer. Build with `from_pretrained(folder)` (release layout) or
    `from_preset(name)` (random weights of a released size, see `softvq_fast.models.PRESETS`).

    `attention_backend` / `soft_vq_backend` / `linear_backend` are the op backends ("auto" picks
    the fastest that runs the inputs); `set_backends` changes them later.
    """

    def __init__(self, config: SoftVQConfig, *, attention_backend: str = "auto", soft_vq_backend: str = "auto",
                 linear_backend: str = "auto") -> None:
        super().__init__()
        config.validate()
        self.config = config
        enc, dec = vit_spec(config.encoder_model), vit_spec(config.decoder_model)
        rope = dict(use_rope=config.use_rope, rope_mixed=config.rope_mixed, rope_theta=config.rope_theta)
        self.encoder = LatentEncoder(
            enc, config.encoder_depth or enc.depth, config.image_size, config.enc_patch_size,
            config.num_latent_tokens, config.base_image_size, attention_backend=attention_backend,
            drop_path_rate=config.enc_drop_path_rate, **rope,
        )
        self.quant_conv = Linear(enc.width, config.codebook_embed_dim)
        # The usage buffer is training-only (ignored when loading), hence show_usage=False.
        self.quantize = SoftVectorQuantizer(
            config.codebook_size, config.codebook_embed_dim, config.entropy_loss_ratio, config.tau,
            config.num_codebooks, config.codebook_l2_norm, show_usage=False, backend=soft_vq_backend,
        )
        self.post_quant_conv = Linear(config.codebook_embed_dim, dec.width)
        self.decoder = LatentDecoder(
            dec, config.decoder_depth or dec.depth, config.image_size, config.dec_patch_size,
            config.num_latent_tokens, config.base_image_size, config.dec_cls_token, config.use_ape,
            attention_backend=attention_backend, drop_path_rate=config.dec_drop_path_rate, **rope,
        )
        set_linear_backend(self, linear_backend)
        # Training only: the representation-alignment projector, (B, T, D) -> (B, T, width).
        self.projection: nn.Module | None = None
        self.load_report: checkpoint.LoadReport | None = None
        self.eval()

    # ----------------------------------------------------------------------------- construction
    @classmethod
    def from_preset(cls, name: str, **kwargs) -> "SoftVQVAE":
        """Random weights with the architecture of a released tokenizer, e.g. "softvq-b-32",
        "softvq-bl-64-512" (for benchmarks and tests)."""
        return cls(preset_config(name), **kwargs)

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        *,
        revision: str | None = None,
        device: str | torch.device | None = None,
        dtype: torch.dtype = torch.float32,
        attention_backend: str = "auto",
        soft_vq_backend: str = "auto",
        linear_backend: str = "auto",
    ) -> "SoftVQVAE":
        """Load a release folder (`config.json` + `model.safetensors` or `pytorch_model.bin`), or a
        Hugging Face Hub repo id such as "SoftVQVAE/softvq-l-64" (at `revision`, through
        huggingface_hub's cache: `softvq_fast.hub.resolve`; an existing local folder of the same
        name wins).

        The ViT depth comes from the checkpoint's blocks where it differs from the model name.
        Training-only keys are ignored and listed in `model.load_report.ignored`; floating tensors
        stored in another precision are cast to `dtype` and listed in `model.load_report.cast`.
        Any other missing, unexpected, misshaped or non-floating key, and any config field out of
        range, raises `CheckpointError` naming the file and the key or field."""
        dtype = checkpoint.check_dtype(dtype)
        directory = hub.resolve(path, revision=revision)
        config = checkpoint.read_config(directory)
        state, source = checkpoint.read_state_dict(directory)
        model = cls.from_state_dict(config, state, source, dtype=dtype, attention_backend=attention_backend,
                                    soft_vq_backend=soft_vq_backend, linear_backend=linear_backend)
        return model.to(device) if device is not None else model

    @classmethod
    def from_state_dict(
        cls,
        config: SoftVQConfig,
        state: dict[str, torch.Tensor],
        source: Path,
        *,
        dtype: torch.dtype = torch.float32,
        attention_backend: str = "auto",
        soft_vq_backend: str = "auto",
        linear_backend: str = "auto",
    ) -> "SoftVQVAE":
        """The model of a release's validated config and state dict read from the file `source`
        (named in errors): what `from_pretrained` builds once it has read the folder. `config`'s
        depths are set from the state's blocks; training-only keys are ignored and reported."""
        dtype = checkpoint.check_dtype(dtype)
        state, ignored = checkpoint.split_training_only(state)
        config.encoder_depth = checkpoint.block_count(state, "encoder.model.blocks.")
        config.decoder_depth = checkpoint.block_count(state, "decoder.model.blocks.")
        with torch.device("meta"):
            model = cls(config, attention_backend=attention_backend, soft_vq_backend=soft_vq_backend,
                        linear_backend=linear_backend)
        cast = checkpoint.load_weights(model, state, source, dtype)
        model.load_report = checkpoint.LoadReport(ignored=ignored, cast=cast, weights_file=str(source))
        if ignored:
            logger.info("%s: ignored %d training-only keys: %s", source, len(ignored), ", ".join(ignored))
        if cast:
            logger.info("%s: cast %d tensors to %s (stored as %s)", source, len(cast), dtype,
                        ", ".join(sorted(set(cast.values()))))
        return model

    def save_pretrained(self, path: str | Path) -> None:
        """Write `config.json` + `model.safetensors` in the release layout (with the projector's
        `projection.*` keys when the model holds it, as the authors' releases do)."""
        checkpoint.write_release(Path(path), self.config, self.state_dict())

    def set_backends(self, *, attention: str | None = None, soft_vq: str | None = None, linear: str | None = None) -> None:
        """Switch the attention, soft-VQ and/or linear-layer backend of every layer."""
        if attention is not None:
            for module in self.modules():
                if isinstance(module, Attention):
                    module.backend = attention
        if soft_vq is not None:
            self.quantize.backend = soft_vq
        if linear is not None:
            set_linear_backend(self, linear)

    def set_activation_checkpointing(self, enabled: bool) -> None:
        """Recompute each ViT block's activations in the backward instead of keeping them
        (`vit.Block.checkpoint_activations`): training forwards with grad enabled hold about one
        (B, S, width) tensor per block instead of all its intermediates, for one more forward of
        every block; values, gradients and drop path's draws are unchanged, inference untouched."""
        if not isinstance(enabled, bool):
            raise ValueError(f"enabled must be a bool, got {enabled!r}")
        for module in self.modules():
            if isinstance(module, Block):
                module.checkpoint_activations = enabled

    # ------------------------------------------------------------------------------------ API
    def encode(self, images: torch.Tensor, *, max_batch: int | None = None, autocast_dtype: torch.dtype | None = None) -> torch.Tensor:
        """images (B, 3, S, S) float (any precision, computed in the model dtype) in [-1, 1],
        S = config.image_size -> soft-quantised latents
        (B, num_latent_tokens, codebook_embed_dim) float32.

        `max_batch` (a positive integer, None: all at once) runs at most that many images at a
        time (caps activation memory);
        `autocast_dtype` (e.g. torch.bfloat16) runs the ViT under autocast."""
        self._check_images(images)
        return self._sliced(self._encode, images.to(self._dtype), max_batch, autocast_dtype)

    def decode(self, latents: torch.Tensor, *, max_batch: int | None = None, autocast_dtype: torch.dtype | None = None) -> torch.Tensor:
        """latents (B, num_latent_tokens, codebook_embed_dim) -> images (B, 3, S, S) float32,
        roughly in [-1, 1] (not clamped). Arguments as in `encode`."""
        self._check_latents(latents)
        return self._sliced(self._decode, latents.to(self._dtype), max_batch, autocast_dtype)

    def forward(self, images: torch.Tensor, *, training_outputs: bool = False, draws: DropPathDraws | None = None,
                autocast_dtype: torch.dtype | None = None) -> torch.Tensor | TrainingOutputs:
        """Reconstruction: decode(encode(images)); with `training_outputs`, `training_forward`'s
        TrainingOutputs (the call a DistributedDataParallel wrapper makes)."""
        if training_outputs:
            return self.training_forward(images, draws=draws, autocast_dtype=autocast_dtype)
        return self.decode(self.encode(images))

    def training_forward(self, images: torch.Tensor, *, draws: DropPathDraws | None = None,
                         autocast_dtype: torch.dtype | None = None) -> TrainingOutputs:
        """images (B, 3, S, S) in [-1, 1] -> TrainingOutputs, differentiable in every parameter
        and in the images. The soft quantiser runs in float32 (as in `encode`), with its entropy
        regulariser; `autocast_dtype` runs the ViTs and the projector under autocast. `draws`:
        where drop path's decisions come from (torch's default generator when None); drop path
        acts in training mode only."""
        self._check_images(images)
        z = self._pre_quantize(images.to(self._dtype), autocast_dtype, draws)
        q = self.quantize
        latents, stats = soft_vq(z.float(), q.embedding.float(), q.tau, l2_norm=q.l2_norm, return_stats=True,
                                 backend=q.backend)
        inputs = latents.to(self._dtype)
        reconstructions = self._decode(inputs, autocast_dtype, draws)
        projected = None
        if self.projection is not None:
            with _autocast(images.device, autocast_dtype):
                projected = self.projection(inputs)
        return TrainingOutputs(reconstructions, latents, stats.entropy_loss, projected, stats.usage, stats.max_prob,
                               stats.cos, stats.column_sum)

    def unused_parameter_names(self) -> list[str]:
        """Parameters no forward reads, kept so that the authors' checkpoints load: the decoder's
        patch embedding, and its position table when the decoder adds no absolute positions
        (RoPE). Training freezes them (DistributedDataParallel needs every trained parameter to
        get a gradient)."""
        names = ["decoder.model.patch_embed.proj.weight", "decoder.model.patch_embed.proj.bias"]
        if not self.decoder.use_ape:
            names.append("decoder.model.pos_embed")
        return names

    def normalize_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """(z - vq_mean) / vq_std: the scale generators are trained on."""
        return (latents - self.config.vq_mean) / self.config.vq_std

    def denormalize_latents(self, x: torch.Tensor) -> torch.Tensor:
        """Inverse of `normalize_latents`: x * vq_std + vq_mean."""
        return x * self.config.vq_std + self.config.vq_mean

    # ------------------------------------------------------------------------------- internals
    def _pre_quantize(self, images: torch.Tensor, autocast_dtype: torch.dtype | None,
                      draws: DropPathDraws | None = None) -> torch.Tensor:
        """The quantiser's input (B, T, D): the encoder's latent tokens through quant_conv."""
        with _autocast(images.device, autocast_dtype):
            return self.quant_conv(self.encoder(images, draws))

    def _encode(self, images: torch.Tensor, autocast_dtype: torch.dtype | None) -> torch.Tensor:
        z = self._pre_quantize(images, autocast_dtype)
        # Eval path: z_q only, the softmax over the codes at temperature tau in float32.
        q = self.quantize
        return soft_vq(z.float(), q.embedding.float(), q.tau, l2_norm=q.l2_norm, backend=q.backend)

    def _decode(self, latents: torch.Tensor, autocast_dtype: torch.dtype | None,
                draws: DropPathDraws | None = None) -> torch.Tensor:
        with _autocast(latents.device, autocast_dtype):
            images = self.decoder(self.post_quant_conv(latents), draws)
        return images.float()

    @staticmethod
    def _sliced(fn: Callable, x: torch.Tensor, max_batch: int | None, autocast_dtype: torch.dtype | None) -> torch.Tensor:
        max_batch = fields.optional_integer("max_batch", max_batch)
        if autocast_dtype is not None:
            checkpoint.check_dtype(autocast_dtype, "autocast_dtype")
        if max_batch is None or x.shape[0] <= max_batch:
            return fn(x, autocast_dtype)
        return torch.cat([fn(chunk, autocast_dtype) for chunk in x.split(max_batch)])

    @property
    def _dtype(self) -> torch.dtype:
        """The parameters' dtype: floating inputs of any precision are computed in it."""
        return self.quant_conv.weight.dtype

    def _check_device(self, name: str, x: torch.Tensor) -> None:
        expected = self.quant_conv.weight.device
        if x.device != expected:
            raise ValueError(f"{name} is on {x.device} but the model is on {expected}: move one of them")

    def _check_images(self, images: torch.Tensor) -> None:
        size, patch = self.config.image_size, self.config.enc_patch_size
        if not isinstance(images, torch.Tensor) or images.dim() != 4 or images.shape[1] != 3:
            shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
            raise ValueError(f"images must be a (B, 3, {size}, {size}) tensor with values in [-1, 1], got {shape}")
        if images.shape[-2:] != (size, size):
            raise ValueError(
                f"images must be {size}x{size} (config.image_size; a multiple of the patch size {patch} and "
                f"fixed by the absolute position table), got {tuple(images.shape[-2:])}: resize or crop first"
            )
        if not images.is_floating_point():
            raise ValueError(f"images must be a floating tensor in [-1, 1], got {images.dtype} (divide uint8 by 127.5, subtract 1)")
        self._check_device("images", images)

    def _check_latents(self, latents: torch.Tensor) -> None:
        expected = (self.config.num_latent_tokens, self.config.codebook_embed_dim)
        if not isinstance(latents, torch.Tensor) or latents.dim() != 3 or tuple(latents.shape[1:]) != expected:
            shape = tuple(latents.shape) if isinstance(latents, torch.Tensor) else type(latents).__name__
            raise ValueError(f"latents must be a (B, {expected[0]}, {expected[1]}) tensor, got {shape}")
        if not latents.is_floating_point():
            raise ValueError(f"latents must be floating point, got {latents.dtype}")
        self._check_device("latents", latents)


def _autocast(device: torch.device, dtype: torch.dtype | None):
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)
