"""`Linear`: nn.Linear through `softvq_fast.ops.linear`, with an optional fused activation."""
from __future__ import annotations

import torch
from torch import nn

from softvq_fast.dispatch import AUTO
from softvq_fast.ops.linear import ACTIVATIONS, linear


class Linear(nn.Linear):
    """A drop-in nn.Linear (same parameters, state-dict keys and initialisation) whose forward is
    `softvq_fast.ops.linear`: (..., in_features) -> (..., out_features), followed by
    `activation` ("none", "gelu", "gelu_tanh") fused where the backend allows. `linear_backend`
    chooses the backend ("auto" by default)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *, activation: str = "none",
                 linear_backend: str = AUTO, device=None, dtype=None) -> None:
        if not isinstance(activation, str) or activation not in ACTIVATIONS:
            raise ValueError(f"Linear: activation must be one of {sorted(ACTIVATIONS)}, got {activation!r}")
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.activation = activation
        self.linear_backend = linear_backend

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias, activation=self.activation, backend=self.linear_backend)

    def extra_repr(self) -> str:
        return super().extra_repr() + (f", activation={self.activation}" if self.activation != "none" else "")


def set_linear_backend(module: nn.Module, backend: str) -> None:
    """Set the linear backend of every submodule that has one (`Linear`, the tokenizer's patch
    embedding)."""
    for submodule in module.modules():
        if hasattr(submodule, "linear_backend"):
            submodule.linear_backend = backend
