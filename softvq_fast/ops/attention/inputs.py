"""What attention's backends and order look at (`AttentionInputs`), built and checked per call.

Layout: q is (B, Sq, H, D), k and v are (B, Sk, H, D): batch, sequence, heads, head dim.
"""
from __future__ import annotations

import math
import numbers
from typing import NamedTuple

import torch

FLOATS = frozenset({torch.float32, torch.bfloat16, torch.float16, torch.float64})


class AttentionInputs(NamedTuple):
    """Shapes, device, dtype, whether a gradient is needed, strides. (A NamedTuple: cheap to
    build on every call, and hashable as a key of the remembered choices.)"""

    device: torch.device
    dtype: torch.dtype
    needs_grad: bool
    batch: int
    heads: int
    q_len: int
    kv_len: int
    head_dim: int
    last_dim_contiguous: bool


def describe_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> AttentionInputs:
    """Checks q, k, v (raising what is wrong, naming the argument) and describes them."""
    try:  # the common, valid case in few attribute reads (this runs on every call)
        shape, kv_shape, dtype, device = q.shape, k.shape, q.dtype, q.device
        valid = (
            len(shape) == 4 and kv_shape == v.shape and len(kv_shape) == 4 and shape[3] > 0
            and kv_shape[0] == shape[0] and kv_shape[2] == shape[2] and kv_shape[3] == shape[3]
            and k.dtype == dtype and v.dtype == dtype and dtype in FLOATS
            and k.device == device and v.device == device
        )
    except AttributeError:
        valid = False
    if not valid:
        _raise_invalid(q, k, v)
    b, sq, h, d = shape
    return AttentionInputs(
        device=device,
        dtype=dtype,
        needs_grad=torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad),
        batch=b,
        heads=h,
        q_len=sq,
        kv_len=kv_shape[1],
        head_dim=d,
        last_dim_contiguous=all(t.stride(-1) == 1 or t.shape[-1] == 1 for t in (q, k, v)),
    )


def _raise_invalid(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    """Raises the error that says what is wrong with q, k, v."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"attention: {name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(
                f"attention: {name} must be 4-D (batch, seq, heads, head_dim), got shape {tuple(t.shape)}"
            )
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"attention: q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"attention: q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")
    if q.dtype not in FLOATS:
        names = sorted(str(d).replace("torch.", "") for d in FLOATS)
        raise ValueError(f"attention: q, k, v must be floating point ({', '.join(names)}), got {q.dtype}")
    b, sq, h, d = q.shape
    if k.shape != v.shape or k.shape[0] != b or k.shape[2] != h or k.shape[3] != d:
        raise ValueError(
            f"attention: k and v must be (B, Sk, H, D) = ({b}, Sk, {h}, {d}) matching q {tuple(q.shape)}, "
            f"got k {tuple(k.shape)} and v {tuple(v.shape)}"
        )
    if d == 0:
        raise ValueError(f"attention: head_dim (the last dimension of q, k, v) must be at least 1, got shapes "
                         f"{tuple(q.shape)}, {tuple(k.shape)}")
    raise ValueError(
        f"attention: invalid q, k, v: shapes {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}, "
        f"dtypes {q.dtype}, {k.dtype}, {v.dtype}, devices {q.device}, {k.device}, {v.device}"
    )


def softmax_scale(scale: float | None, head_dim: int) -> float:
    """`scale` as a float (1/sqrt(head_dim) when None); raises TypeError/ValueError naming `scale`
    unless it is a finite real number. A tensor is refused: it would get no gradient."""
    if scale is None:
        return 1.0 / math.sqrt(head_dim)
    if type(scale) is not float:
        if isinstance(scale, bool) or not isinstance(scale, numbers.Real):
            hint = " (a tensor scale would get no gradient: pass float(scale))" if torch.is_tensor(scale) else ""
            raise TypeError(f"attention: scale must be a real number (float) or None, got {type(scale).__name__}{hint}")
        scale = float(scale)
    if not math.isfinite(scale):
        raise ValueError(f"attention: scale must be finite, got {scale}")
    return scale
