"""The automatic order of attention's backends, from the inputs (`priority`).

CUDA: flash_attn, sdpa, xformers, math. Our CUDA kernel (`softvq`) is left out: it runs only when
asked for by name (backend="softvq" or SOFTVQ_FAST_ATTENTION_BACKEND=softvq) until a recorded GPU
table shows it correct and faster.
CPU: sdpa, math, with softvq first where the CPU rule in force (softvq_fast.ops.cpu_rules: a
calibration of this machine, else the built-in table of measured machines) has a window for the
dtype, the pass (with or without gradients) and the kv length.
Other devices: sdpa, math.
"""
from __future__ import annotations

from softvq_fast.ops.attention.inputs import AttentionInputs
from softvq_fast.ops.cpu_rules import cpu_rule

OP = "attention"
CUDA_ORDER = ("flash_attn", "sdpa", "xformers", "math")
TORCH_ORDER = ("sdpa", "math")
SUMMARY = (
    "cuda: flash_attn, sdpa, xformers, math (softvq only by name); "
    "cpu: sdpa, math, with softvq first where the CPU rule says so (below)"
)


def priority(inputs: AttentionInputs) -> tuple[str, ...]:
    """Backend names in the order `auto` tries them for these inputs."""
    device = inputs.device.type
    if device == "cuda":
        return CUDA_ORDER
    if device != "cpu":
        return TORCH_ORDER
    rule = cpu_rule(OP)
    if rule.puts_first(inputs.dtype, inputs.needs_grad, {"kv_len": inputs.kv_len}):
        return (rule.first,) + TORCH_ORDER
    return TORCH_ORDER
