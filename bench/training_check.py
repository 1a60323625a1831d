"""What the training suites share: the check that ours and the plain baseline compute the same
function (losses and gradients on the same weights and inputs), weights that make every layer
count in that check, and the search for the largest batch that fits a GPU."""
from __future__ import annotations

import contextlib
import gc
from typing import Callable, Iterator, TypeVar

import torch
from torch import nn

from bench.compare import relative_error

# fp32 tolerances of the exactness check: the losses, and the gradients (summed over more terms).
LOSS_TOL = 1e-5
GRAD_TOL = 1e-4

T = TypeVar("T")


class NotTheSameFunction(AssertionError):
    """Ours and the baseline disagree beyond the fp32 tolerance: timing them side by side would
    compare different computations."""


def training_precision(device: torch.device) -> str:
    """The training suites' precision (LoopSettings' name): bf16 autocast on GPUs, fp32 on the CPU."""
    return "bf16" if device.type == "cuda" else "fp32"


def training_dtype(device: torch.device) -> torch.dtype:
    """The dtype of training_precision(device)'s matrix products."""
    return torch.bfloat16 if device.type == "cuda" else torch.float32


@contextlib.contextmanager
def float32_convolutions() -> Iterator[None]:
    """cuDNN convolutions in IEEE float32 within the block (cuDNN's default is TF32 on GPUs that
    have it, about 1e-3 relative: the plain networks' Conv2d patch embeddings would differ from
    our float32 matrix products by that much). Float32 matrix products are IEEE by default."""
    conv = torch.backends.cudnn.conv
    saved = conv.fp32_precision
    conv.fp32_precision = "ieee"
    try:
        yield
    finally:
        conv.fp32_precision = saved


def gradients(module: nn.Module) -> torch.Tensor:
    """Every parameter's gradient (zeros where it has none), flattened in parameter order."""
    return torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).flatten() for p in module.parameters()])


def clear_gradients(*modules: nn.Module) -> None:
    for module in modules:
        for parameter in module.parameters():
            parameter.grad = None


def check_same(what: str, ours: tuple[torch.Tensor, torch.Tensor], plain: tuple[torch.Tensor, torch.Tensor],
               grad_tol: float = GRAD_TOL) -> tuple[float, float]:
    """(loss rel_err, gradient rel_err) of ours = (losses, gradients) against the plain
    baseline's; NotTheSameFunction naming `what` when the losses differ by more than LOSS_TOL or
    the gradients by more than `grad_tol`."""
    for name, a, b in (("losses", ours[0], plain[0]), ("gradients", ours[1], plain[1])):
        if a.shape != b.shape:
            raise NotTheSameFunction(f"{what}: ours gives {a.numel()} {name}, the plain baseline {b.numel()}")
    loss_err = relative_error(ours[0].detach(), plain[0].detach())
    grad_err = relative_error(ours[1], plain[1])
    if not (loss_err <= LOSS_TOL and grad_err <= grad_tol):
        raise NotTheSameFunction(
            f"{what}: ours and the plain baseline differ (losses rel_err {loss_err:.2e}, limit {LOSS_TOL:.0e}; "
            f"gradients rel_err {grad_err:.2e}, limit {grad_tol:.0e}) on the same weights and inputs"
        )
    return loss_err, grad_err


@torch.no_grad()
def make_every_layer_count(module: nn.Module, seed: int) -> None:
    """Redraw the weights that start at zero or near it (adaLN-Zero modulation and output layers,
    biases, LayerScale gammas), so that every block changes the output and a baseline missing one
    fails the exactness check. Timing does not depend on these values."""
    generator = torch.Generator(device=next(module.parameters()).device).manual_seed(seed)
    for name, parameter in module.named_parameters():
        if not parameter.requires_grad:
            continue
        if name.endswith(".gamma"):
            parameter.copy_(0.5 + 0.5 * torch.rand(parameter.shape, generator=generator, device=parameter.device))
        elif parameter.abs().max() == 0:
            parameter.copy_(0.02 * torch.randn(parameter.shape, generator=generator, device=parameter.device))


def largest_fitting_batch(ctx, batch: int, measure: Callable[[int], T], what: str) -> T:
    """measure(batch), halving the batch after each CUDA out-of-memory error (with a note on
    `ctx`) until it fits; on other devices, or at batch 1, the error propagates."""
    while True:
        try:
            return measure(batch)
        except torch.OutOfMemoryError:
            if ctx.device.type != "cuda" or batch == 1:
                raise
        gc.collect()
        torch.cuda.empty_cache()
        ctx.note(f"{what}: batch {batch} did not fit in GPU memory; tried {batch // 2}")
        batch //= 2
