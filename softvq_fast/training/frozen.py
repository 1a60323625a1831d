"""Frozen networks of the tokenizer's losses, read from local files in their public layouts.

- DINOv2 ViT-S/B/L/14 (`load_dinov2`, representation alignment; `load_dinov2_weights` fills a
  trainable ViT such as the tokenizer's encoder from the same files): the official
  `dinov2_vit{s,b,l}14[_reg4]_pretrain.pth` layout or timm's
  `vit_{small,base,large}_patch14[_reg4]_dinov2.lvd142m` layout of the same weights. The official
  layout is mapped onto timm's, which is the project's ViT (`softvq_fast.models.vit.Backbone`).
  The patch kernel and the position table are resampled to the patch and image size asked for, as
  timm does when the authors create the model with another patch size.
- DINO ViT-S/16 (`load_dino_vits16`, the discriminator's trunk): the official
  `dino_deitsmall16_pretrain.pth` layout.
- VGG16 (`load_vgg16`, LPIPS): torchvision's `vgg16` state dict; its convolutional part is used.

Each network comes back frozen: in eval mode that `.train()` does not undo, no parameter requiring
a gradient (gradients still flow through it to its input). Nothing is downloaded: `locate_weights`
is the one place where a weights source is turned into a local file. A file that is missing,
unreadable or of another architecture raises `FrozenWeightsError` naming the file and the layout
that was expected (missing and unexpected keys, wrong shapes). Floating-point weights are read as
float32 whatever their stored dtype.
"""
from __future__ import annotations

import math
import os
import re
from pathlib import Path
from typing import Callable, Iterable, Mapping, Sequence

import torch
from safetensors.torch import load_file
from torch import nn
from torch.nn import functional as F

from softvq_fast.models.checkpoint import CheckpointError
from softvq_fast.models.config import ViTSpec, vit_spec
from softvq_fast.models.vit import LAYER_NORM_EPS, Backbone, PatchEmbed
from softvq_fast.nn.transformer import Attention, Mlp

__all__ = [
    "FrozenWeightsError",
    "FrozenModule",
    "FrozenDINOv2",
    "DinoViTS16",
    "VGG16Features",
    "locate_weights",
    "read_weights",
    "check_layout",
    "imagenet_pixels",
    "load_dinov2",
    "load_dinov2_weights",
    "load_dino_vits16",
    "load_vgg16",
    "dinov2_official_to_timm",
    "resample_patch_embedding",
    "resample_position_table",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "VGG16_TAPS",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# How many key names an error message lists per category before it only counts the rest.
_LISTED_KEYS = 12


class FrozenWeightsError(CheckpointError):
    """A frozen network's weights file that cannot be used; the message names the file and the
    expected layout."""


class FrozenModule(nn.Module):
    """Base of the frozen networks: always in eval mode, parameters never require gradients."""

    def freeze(self) -> "FrozenModule":
        for parameter in self.parameters():
            parameter.requires_grad_(False)
        return super().train(False)

    def train(self, mode: bool = True) -> "FrozenModule":
        # A parent's .train() must not switch a frozen network out of eval mode.
        return super().train(False)


def imagenet_pixels(images: torch.Tensor) -> torch.Tensor:
    """Images in [-1, 1] (B, 3, H, W) -> ImageNet-normalised pixels ((x + 1) / 2 - mean) / std,
    written as x * (0.5 / std) + (0.5 - mean) / std."""
    if images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"images must be (B, 3, H, W), got shape {tuple(images.shape)}")
    mean = torch.tensor(IMAGENET_MEAN, dtype=torch.float32, device=images.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, dtype=torch.float32, device=images.device).view(1, 3, 1, 1)
    return images * (0.5 / std) + (0.5 - mean) / std


# ---------------------------------------------------------------------------------------------
# Reading and checking files


def locate_weights(source: str | os.PathLike, network: str) -> Path:
    """The local file behind `source`, or FrozenWeightsError naming it and `network`.

    This is the single place where a weights source becomes a file: a resolver of Hugging Face
    Hub ids (softvq_fast.hub) hooks in here, before the not-found error. Nothing is downloaded
    otherwise."""
    path = Path(source)
    if path.is_file():
        return path
    raise FrozenWeightsError(f"{path}: not found (expected a local {network} weights file)")


def read_weights(path: Path, layout: str) -> dict[str, torch.Tensor]:
    """A flat state dict from a `.safetensors` file or a torch checkpoint (read with
    weights_only), floating-point tensors as float32. `layout` describes what was expected, for
    the error message."""
    try:
        if path.suffix == ".safetensors":
            state = load_file(str(path))
        else:
            state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # damaged files raise many types (SafetensorError, UnpicklingError, ...)
        reason = (str(exc).splitlines() or [type(exc).__name__])[0]
        raise FrozenWeightsError(f"{path}: cannot be read as a weights file ({reason}); expected {layout}") from exc
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise FrozenWeightsError(f"{path}: expected a flat dict of tensors (a state dict) in {layout}")
    return {k: v.float() if v.is_floating_point() else v for k, v in state.items()}


def _listed(keys: Sequence[str]) -> str:
    shown = ", ".join(keys[:_LISTED_KEYS])
    return shown + (f" and {len(keys) - _LISTED_KEYS} more" if len(keys) > _LISTED_KEYS else "")


def check_layout(
    expected: Mapping[str, tuple[int, ...]],
    state: Mapping[str, torch.Tensor],
    path: Path,
    layout: str,
    ignored: Callable[[str], bool] = lambda key: False,
) -> None:
    """Raise FrozenWeightsError naming `path`, `layout` and the missing keys, the unexpected keys
    (those not in `expected` and not `ignored`) and the keys of another shape."""
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(k for k in state if k not in expected and not ignored(k))
    misshaped = [
        f"{key} {tuple(state[key].shape)} (expected {tuple(shape)})"
        for key, shape in expected.items()
        if key in state and tuple(state[key].shape) != tuple(shape)
    ]
    problems = []
    if missing:
        problems.append(f"missing keys ({len(missing)}): {_listed(missing)}")
    if unexpected:
        problems.append(f"unexpected keys ({len(unexpected)}): {_listed(unexpected)}")
    if misshaped:
        problems.append(f"wrong shapes ({len(misshaped)}): {_listed(misshaped)}")
    if problems:
        raise FrozenWeightsError(f"{path}: not {layout}: " + " | ".join(problems))


def _shapes(module: nn.Module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in module.state_dict().items()}


def _load_frozen(module: FrozenModule, state: Mapping[str, torch.Tensor], path: Path, layout: str,
                 ignored: Callable[[str], bool] = lambda key: False) -> FrozenModule:
    check_layout(_shapes(module), state, path, layout, ignored)
    module.load_state_dict({k: v for k, v in state.items() if not ignored(k)}, strict=True)
    return module.freeze()


# ---------------------------------------------------------------------------------------------
# DINOv2 (representation alignment)

_DINOV2_ARCHS = {384: "small", 768: "base", 1024: "large"}
_OFFICIAL_DINOV2 = {"small": "vits14", "base": "vitb14", "large": "vitl14"}


def dinov2_official_to_timm(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The official DINOv2 layout mapped onto timm's: `mask_token` dropped; with registers,
    `register_tokens` -> `reg_token` and the class token's position folded into `cls_token` (timm
    gives register models a position table over the patches only). A timm state passes unchanged."""
    out = {k: v for k, v in state.items() if k != "mask_token"}
    if "register_tokens" in out and "pos_embed" in out and "cls_token" in out:
        table = out.pop("pos_embed")
        out["reg_token"] = out.pop("register_tokens")
        out["cls_token"] = out["cls_token"] + table[:, :1]
        out["pos_embed"] = table[:, 1:]
    return out


def resample_patch_embedding(weight: torch.Tensor, size: int) -> torch.Tensor:
    """A patch kernel (out, in, p, p) resampled to (out, in, size, size) so that a patch resized
    by bicubic interpolation (antialiased) gives the same token: new = pinv(Rᵀ) · old, R the
    resize matrix (FlexiViT's rule, which timm applies when the patch size changes)."""
    old = weight.shape[-1]
    if weight.dim() != 4 or weight.shape[-2] != old:
        raise ValueError(f"weight must be a square patch kernel (out, in, p, p), got shape {tuple(weight.shape)}")
    if old == size:
        return weight
    basis = torch.eye(old * old, dtype=torch.float32).reshape(old * old, 1, old, old)
    resize = F.interpolate(basis, size=(size, size), mode="bicubic", antialias=True).reshape(old * old, size * size)
    # Row i of `resize` is basis patch i resized: a patch x becomes resizeᵀx, and its token
    # (resizeᵀx)·w' equals x·w for every x when resize·w' = w (minimum-norm solution).
    flat = weight.double().reshape(-1, old * old) @ torch.linalg.pinv(resize.double()).T
    return flat.reshape(*weight.shape[:2], size, size).to(weight.dtype)


def resample_position_table(table: torch.Tensor, grid: int, prefix_tokens: int) -> torch.Tensor:
    """A position table (1, prefix + g*g, D) -> (1, prefix + grid*grid, D): the g x g part
    resized by bicubic interpolation (antialiased), the prefix rows kept (timm's rule)."""
    cells = table.shape[1] - prefix_tokens
    old = math.isqrt(cells)
    if table.dim() != 3 or table.shape[0] != 1 or old * old != cells:
        raise ValueError(
            f"position table must be (1, {prefix_tokens} + g*g, D), got shape {tuple(table.shape)}"
        )
    if old == grid:
        return table
    prefix, cells = table[:, :prefix_tokens], table[:, prefix_tokens:]
    square = cells.reshape(1, old, old, -1).permute(0, 3, 1, 2).float()
    resized = F.interpolate(square, size=(grid, grid), mode="bicubic", antialias=True)
    return torch.cat([prefix, resized.permute(0, 2, 3, 1).reshape(1, grid * grid, -1).to(table.dtype)], dim=1)


class FrozenDINOv2(FrozenModule):
    """A frozen DINOv2 (timm layout under `model`) on images in [-1, 1]: (B, 3, H, W) ->
    the final-norm patch tokens (B, (H/p) * (W/p), width), class and register tokens dropped."""

    def __init__(self, spec: ViTSpec, image_size: int, patch_size: int, depth: int | None = None,
                 attention_backend: str = "auto") -> None:
        super().__init__()
        if image_size % patch_size:
            raise ValueError(f"image_size={image_size} is not a multiple of patch_size={patch_size}")
        self.image_size, self.patch_size = image_size, patch_size
        grid = image_size // patch_size
        self.model = Backbone(spec, depth or spec.depth, grid * grid, patch_size, True, attention_backend)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.shape[-2:] != (self.image_size, self.image_size):
            raise ValueError(
                f"images must be (B, 3, {self.image_size}, {self.image_size}), got shape {tuple(images.shape)}"
            )
        model = self.model
        x = model.prefix_and_positions(model.patch_embed(imagenet_pixels(images)), add_positions=True)
        x = model.run_blocks(x, None, slice(None))
        return model.norm(x)[:, model.num_prefix_tokens:]


def _is_patch_kernel(kernel: torch.Tensor, width: int) -> bool:
    return kernel.dim() == 4 and kernel.shape[:2] == (width, 3) and kernel.shape[2] == kernel.shape[3]


def _is_position_table(table: torch.Tensor, prefix: int, width: int) -> bool:
    if table.dim() != 3 or table.shape[0] != 1 or table.shape[2] != width:
        return False
    cells = table.shape[1] - prefix
    return cells > 0 and math.isqrt(cells) ** 2 == cells


def _dinov2_spec(model_name: str) -> ViTSpec:
    spec = vit_spec(model_name)
    if spec.swiglu:
        raise ValueError(f"model_name={model_name!r}: only the DINOv2 ViT-S/B/L (not the SwiGLU giant) are supported")
    return spec


def load_dinov2_weights(backbone: Backbone, source: str | os.PathLike, model_name: str) -> Path:
    """Fill `backbone` (a ViT of `model_name`'s size in timm's layout, e.g. the tokenizer's
    encoder, with the patch size and position grid it runs at) with DINOv2 `model_name`'s weights
    from a local file in the official or timm layout: the patch kernel and the position table are
    resampled to the backbone's patch size and grid. The file must hold as many blocks as the
    backbone. Returns the file's path; FrozenWeightsError naming it and the layout expected."""
    spec = _dinov2_spec(model_name)
    arch = _DINOV2_ARCHS[spec.width]
    official = f"dinov2_{_OFFICIAL_DINOV2[arch]}{'_reg4' if spec.reg_tokens else ''}_pretrain.pth"
    layout = f"the DINOv2 ViT-{arch} layout ({official} or timm's {model_name}, {len(backbone.blocks)} blocks)"
    path = locate_weights(source, f"DINOv2 {model_name}")
    state = dinov2_official_to_timm(read_weights(path, layout))
    expected = _shapes(backbone)
    # The file's patch size and position grid are free: checked for structure, then resampled.
    geometry = {"patch_embed.proj.weight", "pos_embed"}
    check_layout({k: s for k, s in expected.items() if k not in geometry}, state, path, layout,
                 ignored=lambda key: key in geometry)
    prefix = 0 if spec.reg_tokens else 1
    kernel, table = state.get("patch_embed.proj.weight"), state.get("pos_embed")
    if kernel is None or table is None:
        raise FrozenWeightsError(f"{path}: not {layout}: missing keys: patch_embed.proj.weight or pos_embed")
    if not (_is_patch_kernel(kernel, spec.width) and _is_position_table(table, prefix, spec.width)):
        raise FrozenWeightsError(
            f"{path}: not {layout}: patch_embed.proj.weight {tuple(kernel.shape)} (expected ({spec.width}, 3, p, p)), "
            f"pos_embed {tuple(table.shape)} (expected (1, {prefix} + g*g, {spec.width}))"
        )
    state["patch_embed.proj.weight"] = resample_patch_embedding(kernel, backbone.patch_embed.patch_size)
    grid = math.isqrt(expected["pos_embed"][1] - prefix)
    state["pos_embed"] = resample_position_table(table, grid, prefix)
    with torch.no_grad():
        backbone.load_state_dict(state, strict=True)
    return path


def load_dinov2(
    source: str | os.PathLike,
    model_name: str = "vit_large_patch14_dinov2.lvd142m",
    *,
    image_size: int = 256,
    patch_size: int = 16,
    depth: int | None = None,
    attention_backend: str = "auto",
) -> FrozenDINOv2:
    """The frozen DINOv2 `model_name` (timm's name, e.g. vit_small_patch14_reg4_dinov2.lvd142m)
    from a local file in the official or timm layout, running at `image_size` with `patch_size`
    (the authors' alignment target: patch 16 at 256 px). `depth`: the blocks the file holds when
    it is cut shorter than the named model (default: all of them)."""
    module = FrozenDINOv2(_dinov2_spec(model_name), image_size, patch_size, depth, attention_backend)
    load_dinov2_weights(module.model, source, model_name)
    return module.freeze()


# ---------------------------------------------------------------------------------------------
# DINO ViT-S/16 (the discriminator's trunk)


class DinoBlock(nn.Module):
    """Pre-norm ViT block without LayerScale (DINO v1)."""

    def __init__(self, width: int, heads: int, mlp_hidden: int, gelu: str, attention_backend: str) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(width, eps=LAYER_NORM_EPS)
        self.attn = Attention(width, heads, qkv_bias=True, backend=attention_backend)
        self.norm2 = nn.LayerNorm(width, eps=LAYER_NORM_EPS)
        self.mlp = Mlp(width, mlp_hidden, approximate=gelu)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class DinoViTS16(FrozenModule):
    """DINO ViT-S/16 at 224 px (14 x 14 patches + class token, width 384, 6 heads), the first
    `depth` blocks. `gelu` is the MLP's GELU: "none" (exact) as DINO was trained, "tanh" as the
    authors' discriminator runs it. The final norm of the file is not used."""

    width, heads, mlp_hidden, patch_size, image_size = 384, 6, 1536, 16, 224

    def __init__(self, depth: int = 12, gelu: str = "none", attention_backend: str = "auto") -> None:
        super().__init__()
        if depth < 1:
            raise ValueError(f"depth={depth}: at least one block")
        tokens = (self.image_size // self.patch_size) ** 2 + 1
        self.patch_embed = PatchEmbed(self.patch_size, self.width)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, self.width))
        self.pos_embed = nn.Parameter(torch.zeros(1, tokens, self.width))
        self.blocks = nn.ModuleList(
            DinoBlock(self.width, self.heads, self.mlp_hidden, gelu, attention_backend) for _ in range(depth)
        )

    def hidden_states(self, pixels: torch.Tensor, taps: Iterable[int]) -> list[torch.Tensor]:
        """ImageNet-normalised pixels (B, 3, 224, 224) -> [the embedded tokens (class token and
        positions added), then the output of each block in `taps`], each (B, 197, 384)."""
        if pixels.shape[-2:] != (self.image_size, self.image_size):
            raise ValueError(f"pixels must be (B, 3, 224, 224), got shape {tuple(pixels.shape)}")
        taps = sorted(set(taps))
        if taps and not 0 <= taps[-1] < len(self.blocks):
            raise ValueError(f"taps={taps}: blocks are numbered 0..{len(self.blocks) - 1}")
        x = self.patch_embed(pixels)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
        states = [x]
        for index in range(taps[-1] + 1 if taps else 0):
            x = self.blocks[index](x)
            if index in taps:
                states.append(x)
        return states


def load_dino_vits16(source: str | os.PathLike, depth: int = 12, *, gelu: str = "none",
                     attention_backend: str = "auto") -> DinoViTS16:
    """The frozen DINO ViT-S/16 (its first `depth` blocks; later blocks and the final norm in
    the file are ignored) from a file in the official `dino_deitsmall16_pretrain.pth` layout."""
    layout = f"the DINO ViT-S/16 layout (dino_deitsmall16_pretrain.pth, at least {depth} blocks)"
    path = locate_weights(source, "DINO ViT-S/16")
    state = read_weights(path, layout)
    later_block = re.compile(r"blocks\.(\d+)\.")

    def ignored(key: str) -> bool:
        match = later_block.match(key)
        return key in ("norm.weight", "norm.bias") or (match is not None and int(match.group(1)) >= depth)

    return _load_frozen(DinoViTS16(depth, gelu, attention_backend), state, path, layout, ignored)


# ---------------------------------------------------------------------------------------------
# VGG16 (LPIPS)

# torchvision's vgg16 `features` (configuration D): channels per conv, "M" a 2x2 max pool.
_VGG16_LAYERS = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512)
# Indices in `features` of the ReLUs whose outputs LPIPS compares (relu1_2 ... relu5_3).
VGG16_TAPS = (3, 8, 15, 22, 29)


class VGG16Features(FrozenModule):
    """torchvision's vgg16 `features` up to relu5_3 (module indices as in its state dict):
    pixels (B, 3, H, W) -> the five ReLU outputs at VGG16_TAPS, 64/128/256/512/512 channels at
    1, 1/2, 1/4, 1/8 and 1/16 of the size (floored)."""

    def __init__(self) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        channels = 3
        for item in _VGG16_LAYERS:
            if item == "M":
                layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
            else:
                layers += [nn.Conv2d(channels, item, kernel_size=3, padding=1), nn.ReLU()]
                channels = item
        self.features = nn.Sequential(*layers)

    def forward(self, pixels: torch.Tensor) -> list[torch.Tensor]:
        outputs = []
        x = pixels
        for index, layer in enumerate(self.features):
            x = layer(x)
            if index in VGG16_TAPS:
                outputs.append(x)
        return outputs


def load_vgg16(source: str | os.PathLike) -> VGG16Features:
    """The frozen VGG16 convolutional layers from torchvision's `vgg16` state dict (the
    classifier's keys are ignored)."""
    layout = "torchvision's vgg16 state-dict layout (features.N.weight/bias, classifier.*)"
    path = locate_weights(source, "VGG16")
    state = read_weights(path, layout)
    return _load_frozen(VGG16Features(), state, path, layout, ignored=lambda key: key.startswith("classifier."))
