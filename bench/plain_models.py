"""The training suites' baselines: the networks written the way the authors' code runs them, in
plain eager PyTorch (timm-style attention on F.scaled_dot_product_attention, nn.Linear, nn.GELU,
LayerNorm followed by the adaLN modulation, LayerScale as a multiply), with the parameter names of
softvq_fast's models so that one state dict loads into both.

PlainSiT       the authors' SiT written from the math (1-D tokens or 2-D latents in patches)
plain_copy     a deep copy of a tokenizer-side network (SoftVQVAE, the frozen DINOv2, the DINO
               discriminator) with every softvq_fast layer replaced by its plain counterpart and
               the soft quantiser on its `reference` backend (the tokens x codes tensors)
PlainLPIPS     LPIPS-VGG as the `lpips` package computes the authors' perceptual loss
flow_matching_loss_plain, update_ema_plain   the authors' SiT loss and EMA update
"""
from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F
from torch import nn

from softvq_fast.models import SoftVQVAE
from softvq_fast.models.adaln_transformer import AdaLNTransformer
from softvq_fast.models.vit import Block, PatchEmbed, SwiGLU
from softvq_fast.nn.linear import Linear
from softvq_fast.nn.transformer import Attention, Mlp
from softvq_fast.training.discriminator import DinoDiscriminator
from softvq_fast.training.lpips import LPIPS

ADALN_EPS = 1e-6
FREQUENCY_DIM = 256


class PlainAttention(nn.Module):
    """timm's Attention: (B, S, dim) -> qkv -> (3, B, H, S, head_dim) -> SDPA -> proj."""

    def __init__(self, dim: int, num_heads: int, qk_norm: bool = False) -> None:
        super().__init__()
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.q_norm = nn.LayerNorm(self.head_dim) if qk_norm else nn.Identity()
        self.k_norm = nn.LayerNorm(self.head_dim) if qk_norm else nn.Identity()
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, rope=None) -> torch.Tensor:
        if rope is not None:
            raise ValueError("PlainAttention: rotary positions are not part of the plain baselines")
        batch, tokens, dim = x.shape
        q, k, v = self.qkv(x).reshape(batch, tokens, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(self.q_norm(q), self.k_norm(k), v)
        return self.proj(out.transpose(1, 2).reshape(batch, tokens, dim))


class PlainMlp(nn.Module):
    """fc1 -> GELU (exact or tanh) -> fc2."""

    def __init__(self, dim: int, hidden: int, approximate: str = "none") -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU(approximate=approximate)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


class PlainSiTBlock(nn.Module):
    """x + gate * attn(modulate(LN(x))), then the same around the MLP; shift, scale, gate of both
    from adaLN_modulation(c)."""

    def __init__(self, hidden: int, heads: int, mlp_ratio: float, qk_norm: bool) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden, elementwise_affine=False, eps=ADALN_EPS)
        self.attn = PlainAttention(hidden, heads, qk_norm)
        self.norm2 = nn.LayerNorm(hidden, elementwise_affine=False, eps=ADALN_EPS)
        self.mlp = PlainMlp(hidden, int(hidden * mlp_ratio), approximate="tanh")
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden, 6 * hidden))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=1)
        x = x + gate_msa.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift_msa, scale_msa))
        return x + gate_mlp.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))


class PlainFinalLayer(nn.Module):
    def __init__(self, hidden: int, patch: int, out_channels: int) -> None:
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden, elementwise_affine=False, eps=ADALN_EPS)
        self.linear = nn.Linear(hidden, patch * patch * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden, 2 * hidden))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


class PlainPatchEmbed(nn.Module):
    """(B, C, H, W) -> (B, (H/p) * (W/p), dim) through a stride-p Conv2d `proj`."""

    def __init__(self, patch: int, in_channels: int, dim: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_channels, dim, patch, stride=patch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class PlainSiT(nn.Module):
    """SiT (adaLN-Zero transformer predicting a velocity) on 1-D tokens x (B, T, C) or 2-D latents
    x (B, C, H, W); forward(x, t, y, label_drop=None), labels where label_drop is True replaced
    by the null class. Built from one of softvq_fast's SiT / DiT models (`of`), whose weights it
    loads (strictly: the same parameters, names and shapes)."""

    def __init__(self, of: AdaLNTransformer) -> None:
        super().__init__()
        block = of.blocks[0]
        hidden, heads = block.attn.dim, block.attn.num_heads
        mlp_ratio = block.mlp.fc1.out_features / hidden
        qk_norm = not isinstance(block.attn.q_norm, nn.Identity)
        self.vae_1d, self.patch, self.out_channels = of.vae_1d, of.patch_size, of.out_channels
        self.num_classes = of.y_embedder.num_classes
        self.x_embedder = (nn.Linear(of.in_channels, hidden) if of.vae_1d
                           else PlainPatchEmbed(of.patch_size, of.in_channels, hidden))
        self.t_embedder = nn.Module()
        self.t_embedder.mlp = nn.Sequential(nn.Linear(FREQUENCY_DIM, hidden), nn.SiLU(), nn.Linear(hidden, hidden))
        self.y_embedder = nn.Module()
        self.y_embedder.embedding_table = nn.Embedding(*of.y_embedder.embedding_table.weight.shape)
        self.pos_embed = nn.Parameter(torch.zeros_like(of.pos_embed), requires_grad=False)
        self.blocks = nn.ModuleList(PlainSiTBlock(hidden, heads, mlp_ratio, qk_norm) for _ in of.blocks)
        self.final_layer = PlainFinalLayer(hidden, self.patch, self.out_channels)
        self.load_state_dict(of.state_dict(), strict=True)
        self.to(device=of.pos_embed.device, dtype=of.pos_embed.dtype)

    @staticmethod
    def timestep_features(t: torch.Tensor, max_period: float = 10000.0) -> torch.Tensor:
        half = FREQUENCY_DIM // 2
        freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
        args = t[:, None].float() * freqs[None]
        return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, label_drop: torch.Tensor | None = None):
        h = self.x_embedder(x) + self.pos_embed
        if label_drop is not None:
            y = torch.where(label_drop, self.num_classes, y)
        c = self.t_embedder.mlp(self.timestep_features(t)) + self.y_embedder.embedding_table(y)
        for block in self.blocks:
            h = block(h, c)
        out = self.final_layer(h, c)
        if self.vae_1d:
            return out
        batch, p, grid = x.shape[0], self.patch, x.shape[-1] // self.patch
        out = out.reshape(batch, grid, grid, p, p, self.out_channels)
        return torch.einsum("nhwpqc->nchpwq", out).reshape(batch, self.out_channels, grid * p, grid * p)


def flow_matching_loss_plain(model: nn.Module, x: torch.Tensor, y: torch.Tensor, t: torch.Tensor,
                             noise: torch.Tensor, label_drop: torch.Tensor) -> torch.Tensor:
    """The authors' SiT objective on the linear path, per sample (B,): x_t = (1 - t) x + t noise,
    velocity target noise - x, mean squared error over the non-batch dimensions."""
    t_ = t.view(-1, *([1] * (x.dim() - 1)))
    velocity = model((1 - t_) * x + t_ * noise, t, y, label_drop=label_drop)
    return ((velocity - (noise - x)) ** 2).mean(dim=tuple(range(1, x.dim())))


@torch.no_grad()
def update_ema_plain(ema: nn.Module, model: nn.Module, decay: float) -> None:
    """The authors' EMA update, parameter by parameter: ema = decay * ema + (1 - decay) * model."""
    ema_parameters = dict(ema.named_parameters())
    for name, parameter in model.named_parameters():
        ema_parameters[name].mul_(decay).add_(parameter.data, alpha=1 - decay)


# ------------------------------------------------------------------------ tokenizer-side networks
class PlainLPIPS(nn.Module):
    """LPIPS-VGG the way the `lpips` package runs it: each image through the scaling layer and
    VGG16 on its own, each layer's features divided by their norm over channels (+1e-10), the
    squared difference through the layer's bias-free 1x1 convolution, the spatial mean, summed
    over the layers. Shares `lpips`'s VGG16 and heads. forward(x, y) -> (B,)."""

    EPS = 1e-10

    def __init__(self, lpips: LPIPS) -> None:
        super().__init__()
        self.vgg, self.shift, self.scale = lpips.vgg, lpips.shift, lpips.scale
        self.heads = nn.ModuleList()
        for head in lpips.heads:
            conv = nn.Conv2d(head.numel(), 1, 1, bias=False).requires_grad_(False)
            conv.weight.data = head.detach().view(1, -1, 1, 1)
            self.heads.append(conv)

    def _normalised(self, features: torch.Tensor) -> torch.Tensor:
        return features / (torch.sqrt(torch.sum(features**2, dim=1, keepdim=True)) + self.EPS)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        features_x = self.vgg((x - self.shift) / self.scale)
        features_y = self.vgg((y - self.shift) / self.scale)
        total = 0
        for fx, fy, head in zip(features_x, features_y, self.heads):
            total = total + head((self._normalised(fx) - self._normalised(fy)) ** 2).mean([2, 3], keepdim=True)
        return total.view(-1)


class PlainLayerScaleBlock(nn.Module):
    """timm's pre-norm block with LayerScale: x + gamma1 * attn(norm1(x)), then x + gamma2 *
    mlp(norm2(x)), over every token (`rows` selects output rows afterwards)."""

    def __init__(self, block: Block) -> None:
        super().__init__()
        if block.drop_path_rate > 0:
            raise ValueError("plain_copy: drop path is not part of the plain baselines (set its rate to 0)")
        self.norm1, self.attn, self.ls1 = block.norm1, block.attn, block.ls1
        self.norm2, self.mlp, self.ls2 = block.norm2, block.mlp, block.ls2

    def forward(self, x: torch.Tensor, rotate=None, rows: slice | None = None, draws=None) -> torch.Tensor:
        x = x + self.ls1.gamma * self.attn(self.norm1(x), rotate)
        x = x + self.ls2.gamma * self.mlp(self.norm2(x))
        return x if rows is None else x[:, rows]


def _plain_linear(layer: Linear) -> nn.Linear:
    if layer.activation != "none":
        raise ValueError(f"plain_copy: a Linear with a fused {layer.activation} outside an Mlp")
    plain = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None)
    plain.weight, plain.bias = layer.weight, layer.bias
    return plain


def _plain_layer(module: nn.Module) -> nn.Module | None:
    """The plain replacement of one softvq_fast layer (children already replaced), or None."""
    if isinstance(module, Attention):
        plain = PlainAttention(module.dim, module.num_heads)
        plain.qkv, plain.proj = module.qkv, module.proj
        plain.q_norm, plain.k_norm = module.q_norm, module.k_norm
        return plain
    if isinstance(module, Mlp):
        plain = PlainMlp(module.fc1.in_features, module.fc1.out_features,
                         "tanh" if module.fc1.activation == "gelu_tanh" else "none")
        plain.fc1.weight, plain.fc1.bias = module.fc1.weight, module.fc1.bias
        plain.fc2 = _plain_linear(module.fc2)
        return plain
    if isinstance(module, Linear):
        return _plain_linear(module)
    if isinstance(module, Block):
        return PlainLayerScaleBlock(module)
    if isinstance(module, PatchEmbed):
        plain = PlainPatchEmbed(module.patch_size, module.proj.in_channels, module.proj.out_channels)
        plain.proj = module.proj
        return plain
    if isinstance(module, SwiGLU):
        raise ValueError("plain_copy: the SwiGLU MLP (ViT-giant) is not part of the plain baselines")
    return None


def _replace_layers(module: nn.Module) -> None:
    for name, child in list(module.named_children()):
        if not isinstance(child, Mlp):  # an Mlp is replaced whole: its fc1 carries the GELU
            _replace_layers(child)
        plain = _plain_layer(child)
        if plain is not None:
            setattr(module, name, plain)


def plain_copy(network: nn.Module) -> nn.Module:
    """A deep copy of `network` in plain PyTorch (module docstring), same parameter names and
    order, computing the same function. A DinoDiscriminator's frozen trunk is replaced too; a
    SoftVQVAE's soft quantiser runs its `reference` backend."""
    network = copy.deepcopy(network)
    if isinstance(network, SoftVQVAE) and network.config.use_rope:
        raise ValueError("plain_copy: rotary positions (use_rope) are not part of the plain baselines")
    _replace_layers(network)
    if isinstance(network, DinoDiscriminator):
        _replace_layers(network.dino)
    if isinstance(network, SoftVQVAE):
        network.quantize.backend = "reference"
    return network
