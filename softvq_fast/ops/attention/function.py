"""The public function `attention(q, k, v, *, scale, backend)`: checks and describes the inputs,
chooses the backend (remembering the choice per input description) and runs it."""
from __future__ import annotations

import torch

from softvq_fast.dispatch import AUTO, Backend
from softvq_fast.ops import cpu_rules
from softvq_fast.ops.attention.backends import BACKENDS
from softvq_fast.ops.attention.inputs import describe_inputs, softmax_scale

# Backends chosen so far, by (inputs, requested backend, the environment's override, the CPU
# rules' state: torch threads and reloads). Backend availability does not change within a
# process, so choosing again would only repeat the checks, several microseconds a call, which
# short sequences notice.
_CHOSEN: dict[tuple, Backend] = {}
_CHOSEN_MAX = 4096


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    scale: float | None = None,
    backend: str = AUTO,
) -> torch.Tensor:
    """softmax(q·kᵀ·scale)·v per batch and head, non-causal.

    q: (B, Sq, H, D); k, v: (B, Sk, H, D), one dtype and device; any strides with stride 1 in the
    last dimension are read without a copy by the `softvq` kernels. scale: a finite float,
    default 1/sqrt(D). Returns (B, Sq, H, D), contiguous, in q's dtype; with Sk = 0, zeros.
    Differentiable with every backend. `backend`: "auto" (softvq_fast.ops.attention.order) or a
    name from softvq_fast.ops.attention.backends; SOFTVQ_FAST_ATTENTION_BACKEND overrides "auto".
    """
    inputs = describe_inputs(q, k, v)
    scale = softmax_scale(scale, inputs.head_dim)
    if torch.compiler.is_compiling():
        chosen = BACKENDS.select(inputs, backend)
    else:
        key = (inputs, backend, BACKENDS.env_choice(), cpu_rules.state())
        chosen = _CHOSEN.get(key)
        if chosen is None:
            chosen = BACKENDS.select(inputs, backend)
            if len(_CHOSEN) >= _CHOSEN_MAX:
                _CHOSEN.clear()
            _CHOSEN[key] = chosen
    return chosen.fn(q, k, v, scale)
