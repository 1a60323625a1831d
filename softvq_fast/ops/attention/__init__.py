"""Non-causal multi-head attention with backend dispatch: `attention(q, k, v, *, scale, backend)`.

Layout: q is (B, Sq, H, D), k and v are (B, Sk, H, D) (batch, sequence, heads, head dim), the
layout that one qkv Linear produces (`x @ Wqkv -> (B, S, 3, H, D)`, unbound into strided views).
Inputs may be non-contiguous as long as the last dimension has stride 1; the `softvq` kernels read
them in place. The output is (B, Sq, H, D) contiguous, so `.flatten(2)` is free.

Modules:
  function   the public function and the remembered backend choices
  inputs     AttentionInputs (what backends and the order look at) and the input checks
  backends   the backends, each declaring what it runs; BACKENDS, registered with the dispatcher
  order      the automatic order from the inputs (`priority`)
  custom_op  fake kernels and autograd of softvq_fast::attention_fwd / attention_bwd
  plain      the PyTorch paths (sdpa, math)
`softvq-fast env` lists the backends with the reasons any cannot run here, and the CPU rule in
force.
"""
from softvq_fast.ops.attention.backends import BACKENDS
from softvq_fast.ops.attention.function import attention
from softvq_fast.ops.attention.inputs import AttentionInputs, describe_inputs

__all__ = ["attention", "BACKENDS", "AttentionInputs", "describe_inputs"]
