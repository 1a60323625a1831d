"""The adaLN-Zero class-conditional transformer shared by SiT and DiT.

Parameter names follow the authors' release (x_embedder, t_embedder.mlp, y_embedder.embedding_table,
blocks.N.{attn,mlp,adaLN_modulation}, final_layer.{adaLN_modulation,linear}, pos_embed), so their
checkpoints load unchanged. Inputs are either 1-D token sequences (B, T, C) (linear token
embedder, patch 1, 1-D sin-cos positions) or 2-D latents (B, C, H, W) (patch embedding,
2-D sin-cos positions).
"""
from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

import torch
from torch import nn

from softvq_fast import hub
from softvq_fast.models import fields
from softvq_fast.models.checkpoint import (
    CONFIG_NAME, CheckpointError, LoadReport, check_dtype, load_weights, read_json, read_state_dict,
)
from softvq_fast.models.positions import sincos_1d, sincos_2d
from softvq_fast.nn.linear import Linear, set_linear_backend
from softvq_fast.nn.transformer import Attention, Mlp
from softvq_fast.ops.layernorm_modulate import layernorm_modulate

FREQUENCY_DIM = 256
LAYERNORM_EPS = 1e-6
# depth, hidden size, heads of the S/B/L/XL generator sizes.
SIZES = {"S": (12, 384, 6), "B": (12, 768, 12), "L": (24, 1024, 16), "XL": (28, 1152, 16)}
# config.json fields of the release that describe the checkpoint, not the network.
METADATA_FIELDS = ("license", "repo_url", "tags")


def timestep_embedding(t: torch.Tensor, dim: int = FREQUENCY_DIM, max_period: float = 10000.0) -> torch.Tensor:
    """(N,) possibly fractional timesteps -> (N, dim) float32 [cos | sin] features at frequencies
    max_period^(-k/(dim/2)), k < dim/2."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    embedding = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        embedding = torch.cat([embedding, torch.zeros_like(embedding[:, :1])], dim=-1)
    return embedding


class TimestepEmbedder(nn.Module):
    """(N,) timesteps -> (N, hidden): sinusoidal features through Linear-SiLU-Linear."""

    def __init__(self, hidden_size: int) -> None:
        super().__init__()
        self.mlp = nn.Sequential(Linear(FREQUENCY_DIM, hidden_size), nn.SiLU(), Linear(hidden_size, hidden_size))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return self.mlp(timestep_embedding(t).to(self.mlp[0].weight.dtype))


class LabelEmbedder(nn.Module):
    """(N,) class labels -> (N, hidden). With dropout_prob > 0 the table has one more row, the
    null class `num_classes` of classifier-free guidance, which training substitutes at random:
    in train mode each label becomes the null class where torch.rand(N, device=labels.device)
    (one draw from that device's default generator per call) is below dropout_prob, unless the
    caller passes the (N,) bool mask `drop` itself (applied in any mode). Eval mode draws nothing."""

    def __init__(self, num_classes: int, hidden_size: int, dropout_prob: float) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.dropout_prob = dropout_prob
        self.embedding_table = nn.Embedding(num_classes + int(dropout_prob > 0), hidden_size)

    def forward(self, labels: torch.Tensor, drop: torch.Tensor | None = None) -> torch.Tensor:
        if drop is not None:
            if self.dropout_prob <= 0:
                raise ValueError("label_drop given, but this model was built with class_dropout_prob=0: it has no null class")
            if drop.shape != labels.shape or drop.dtype != torch.bool:
                raise ValueError(f"label_drop must be a bool tensor of shape {tuple(labels.shape)}, got {drop.dtype} {tuple(drop.shape)}")
        elif self.training and self.dropout_prob > 0:
            drop = torch.rand(labels.shape[0], device=labels.device) < self.dropout_prob
        if drop is not None:
            labels = torch.where(drop, self.num_classes, labels)
        return self.embedding_table(labels)


class PatchEmbed(nn.Module):
    """(N, C, H, W) -> (N, (H/p)*(W/p), hidden) by a stride-p convolution (row-major tokens)."""

    def __init__(self, patch_size: int, in_channels: int, hidden_size: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_channels, hidden_size, patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class AdaLNBlock(nn.Module):
    """x + gate * attn(LN(x) * (1 + scale) + shift), then the same around the MLP; the six
    modulation vectors come from SiLU(c) in the order shift, scale, gate (attention) and
    shift, scale, gate (MLP)."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float, qk_norm: bool) -> None:
        super().__init__()
        self.norm_backend = "auto"
        self.attn = Attention(hidden_size, num_heads, qkv_bias=True, qk_norm=qk_norm)
        self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio), approximate="tanh")
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), Linear(hidden_size, 6 * hidden_size))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=-1)
        h = layernorm_modulate(x, shift_msa, scale_msa, eps=LAYERNORM_EPS, backend=self.norm_backend)
        x = torch.addcmul(x, gate_msa.unsqueeze(1), self.attn(h))  # one kernel for x + gate * branch
        h = layernorm_modulate(x, shift_mlp, scale_mlp, eps=LAYERNORM_EPS, backend=self.norm_backend)
        return torch.addcmul(x, gate_mlp.unsqueeze(1), self.mlp(h))


class FinalLayer(nn.Module):
    """LN(x) * (1 + scale) + shift, then a linear map to patch_size**2 * out_channels."""

    def __init__(self, hidden_size: int, patch_size: int, out_channels: int) -> None:
        super().__init__()
        self.norm_backend = "auto"
        self.linear = Linear(hidden_size, patch_size * patch_size * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), Linear(hidden_size, 2 * hidden_size))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=-1)
        return self.linear(layernorm_modulate(x, shift, scale, eps=LAYERNORM_EPS, backend=self.norm_backend))


def parse_preset(name: str) -> tuple[str, int, int, int, int]:
    """"SiT-XL/1" -> ("SiT", depth, hidden, heads, patch)."""
    match = re.fullmatch(r"(SiT|DiT)-(S|B|L|XL)/(\d+)", name)
    if not match:
        raise ValueError(f"unknown generator preset {name!r}; expected e.g. 'SiT-XL/1' or 'DiT-B/2' (sizes {list(SIZES)})")
    family, size, patch = match.group(1), match.group(2), int(match.group(3))
    depth, hidden, heads = SIZES[size]
    return family, depth, hidden, heads, patch


class AdaLNTransformer(nn.Module):
    """Class-conditional adaLN-Zero transformer: forward(x, t, y) -> prediction shaped like x with
    `out_channels` (default: in_channels) channels. 1-D (`vae_1d`): x (B, input_size,
    in_channels). 2-D: x (B, in_channels, input_size, input_size), split into
    patch_size x patch_size patches. The defaults are SiT-XL/2 on 32 x 32 x 4 latents."""

    def __init__(
        self,
        *,
        input_size: int = 32,
        patch_size: int = 2,
        in_channels: int = 4,
        out_channels: int | None = None,
        hidden_size: int = 1152,
        depth: int = 28,
        num_heads: int = 16,
        mlp_ratio: float = 4.0,
        class_dropout_prob: float = 0.1,
        num_classes: int = 1000,
        vae_1d: bool = False,
        qk_norm: bool = False,
    ) -> None:
        super().__init__()
        for name, value in (("input_size", input_size), ("patch_size", patch_size), ("in_channels", in_channels),
                            ("hidden_size", hidden_size), ("depth", depth), ("num_heads", num_heads),
                            ("num_classes", num_classes)):
            fields.integer(name, value)
        out_channels = fields.optional_integer("out_channels", out_channels) or in_channels
        fields.real("mlp_ratio", mlp_ratio, above=0)
        fields.real("class_dropout_prob", class_dropout_prob, at_least=0, below=1)
        fields.boolean("vae_1d", vae_1d)
        fields.boolean("qk_norm", qk_norm)
        if hidden_size % num_heads:
            raise ValueError(f"hidden_size={hidden_size} must be divisible by num_heads={num_heads}")
        if int(hidden_size * mlp_ratio) < 1:
            raise ValueError(f"mlp_ratio={mlp_ratio} leaves no MLP units at hidden_size={hidden_size}")
        self.load_report: LoadReport | None = None
        self.input_size = input_size
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.vae_1d = vae_1d
        # The authors' 1-D models embed each token linearly whatever patch_size the config says.
        self.patch_size = 1 if vae_1d else patch_size
        if vae_1d:
            self.x_embedder: nn.Module = Linear(in_channels, hidden_size)
            num_tokens = input_size
        else:
            if input_size % patch_size:
                raise ValueError(f"input_size={input_size} must be divisible by patch_size={patch_size}")
            self.x_embedder = PatchEmbed(patch_size, in_channels, hidden_size)
            num_tokens = (input_size // patch_size) ** 2
        self.num_tokens = num_tokens
        self.t_embedder = TimestepEmbedder(hidden_size)
        self.y_embedder = LabelEmbedder(num_classes, hidden_size, class_dropout_prob)
        self.pos_embed = nn.Parameter(torch.zeros(1, num_tokens, hidden_size), requires_grad=False)
        self.blocks = nn.ModuleList(AdaLNBlock(hidden_size, num_heads, mlp_ratio, qk_norm) for _ in range(depth))
        self.final_layer = FinalLayer(hidden_size, self.patch_size, out_channels)
        if self.pos_embed.device.type != "meta":
            self._initialize()

    @property
    def channel_dim(self) -> int:
        """The channel axis of inputs and outputs: -1 for token sequences, 1 for latent images."""
        return -1 if self.vae_1d else 1

    @property
    def null_class(self) -> int:
        """The label of the unconditional (classifier-free guidance) embedding."""
        if self.y_embedder.dropout_prob <= 0:
            raise ValueError("this generator was built with class_dropout_prob=0: it has no null class for guidance")
        return self.y_embedder.num_classes

    @property
    def latent_shape(self) -> tuple[int, ...]:
        """Shape of one input sample."""
        if self.vae_1d:
            return (self.input_size, self.in_channels)
        return (self.in_channels, self.input_size, self.input_size)

    def _initialize(self) -> None:
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
        if isinstance(self.x_embedder, PatchEmbed):
            weight = self.x_embedder.proj.weight.data
            nn.init.xavier_uniform_(weight.view(weight.shape[0], -1))
            nn.init.zeros_(self.x_embedder.proj.bias)
        hidden = self.pos_embed.shape[-1]
        grid = int(round(self.num_tokens**0.5))
        table = sincos_1d(self.num_tokens, hidden) if self.vae_1d else sincos_2d(grid, hidden)
        self.pos_embed.data.copy_(table.unsqueeze(0))
        nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        # adaLN-Zero: every residual branch and the output start at zero.
        for layer in [block.adaLN_modulation[-1] for block in self.blocks] + [
            self.final_layer.adaLN_modulation[-1],
            self.final_layer.linear,
        ]:
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def set_backends(
        self, *, attention: str | None = None, layernorm_modulate: str | None = None, linear: str | None = None
    ) -> "AdaLNTransformer":
        """Choose the attention, fused LayerNorm-modulate and linear-layer backends of every block
        ("auto" by default)."""
        for block in self.blocks:
            if attention is not None:
                block.attn.backend = attention
            if layernorm_modulate is not None:
                block.norm_backend = layernorm_modulate
        if layernorm_modulate is not None:
            self.final_layer.norm_backend = layernorm_modulate
        if linear is not None:
            set_linear_backend(self, linear)
        return self

    def _check_inputs(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> None:
        expected = self.latent_shape
        if tuple(x.shape[1:]) != expected:
            layout = "(B, tokens, channels)" if self.vae_1d else "(B, channels, height, width)"
            raise ValueError(f"x must be {layout} = (B, {', '.join(map(str, expected))}), got {tuple(x.shape)}")
        for name, value in (("t", t), ("y", y)):
            if value.shape != (x.shape[0],):
                raise ValueError(f"{name} must have shape ({x.shape[0]},) like x's batch, got {tuple(value.shape)}")
        if y.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"y must hold integer class labels, got {y.dtype}")

    def forward(
        self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, *, label_drop: torch.Tensor | None = None
    ) -> torch.Tensor:
        """x: see the class docstring; t (B,) timesteps; y (B,) labels (null class allowed);
        label_drop (B,) bool: labels to replace by the null class (classifier-free guidance
        training), or None: drawn in train mode with probability class_dropout_prob (see
        LabelEmbedder), none in eval mode.
        Returns (B, T, out_channels) for 1-D inputs, (B, out_channels, H, W) for 2-D ones."""
        self._check_inputs(x, t, y)
        h = self.x_embedder(x) + self.pos_embed
        c = self.t_embedder(t) + self.y_embedder(y, label_drop)
        for block in self.blocks:
            h = block(h, c)
        out = self.final_layer(h, c)
        return out if self.vae_1d else self._unpatchify(out)

    def _unpatchify(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, (H/p)*(W/p), p*p*C) -> (B, C, H, W)."""
        p, grid = self.patch_size, self.input_size // self.patch_size
        x = tokens.reshape(tokens.shape[0], grid, grid, p, p, self.out_channels)
        return torch.einsum("nhwpqc->nchpwq", x).reshape(tokens.shape[0], self.out_channels, grid * p, grid * p)

    def forward_with_cfg(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, cfg_scale: float) -> torch.Tensor:
        """Classifier-free guidance in one batch of 2B: conditional on y and unconditional on the
        null class. Returns uncond + cfg_scale * (cond - uncond) on the first `in_channels`
        output channels; further channels (a learned variance) come from the conditional half.
        (The authors' method of this name takes the doubled batch instead and guides its first half.)"""
        both = self.forward(torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, torch.full_like(y, self.null_class)]))
        cond, uncond = both.chunk(2)
        dim, n = self.channel_dim, self.in_channels
        guided = uncond.narrow(dim, 0, n) + cfg_scale * (cond.narrow(dim, 0, n) - uncond.narrow(dim, 0, n))
        if self.out_channels == n:
            return guided
        return torch.cat([guided, cond.narrow(dim, n, self.out_channels - n)], dim=dim)

    @classmethod
    def from_config(cls, directory: str | Path) -> "AdaLNTransformer":
        """The network that a release folder's config.json describes, on the meta device (no
        weights, nothing allocated): for checking arguments against a model before loading it.
        CheckpointError naming the file and the field when the config describes no such network."""
        config_path = Path(directory) / CONFIG_NAME
        config = read_json(config_path, f"{cls.__name__} arguments")
        try:
            with torch.device("meta"):
                return cls(**{k: v for k, v in config.items() if k not in METADATA_FIELDS})
        except (TypeError, ValueError) as exc:
            raise CheckpointError(f"{config_path} does not describe a {cls.__name__}: {exc}") from exc

    @classmethod
    def from_pretrained(
        cls, path: str | Path, *, revision: str | None = None, device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> "AdaLNTransformer":
        """Load a release folder (config.json: the constructor's arguments plus metadata;
        model.safetensors or pytorch_model.bin), or a Hugging Face Hub repo id such as
        "SoftVQVAE/sit-xl_softvq-b-64" (at `revision`, through huggingface_hub's cache; an
        existing local folder of the same name wins). Floating tensors stored in another
        precision are cast to `dtype` (listed in `model.load_report.cast`). Raises
        CheckpointError naming the file and the field, or the missing, unexpected, misshaped
        or non-floating keys."""
        dtype = check_dtype(dtype)
        directory = hub.resolve(path, revision=revision)
        model = cls.from_config(directory)
        state, source = read_state_dict(directory)
        model.load_report = LoadReport(cast=load_weights(model, state, source, dtype), weights_file=str(source))
        return model.to(device=device).eval()


def preset_kwargs(name: str, family: str) -> dict[str, Any]:
    """Constructor arguments of a named preset of `family` ("SiT" or "DiT")."""
    found, depth, hidden, heads, patch = parse_preset(name)
    if found != family:
        raise ValueError(f"preset {name!r} is a {found}, not a {family}")
    return dict(depth=depth, hidden_size=hidden, num_heads=heads, patch_size=patch)
