"""The ops: each op module (attention, soft_vq, layernorm_modulate, linear, lpips_distance) registers
its torch.library custom ops and one `BACKENDS = register_op(OpBackends(...))` with
softvq_fast.dispatch. cpu_rules holds the CPU order rules that `auto` reads, calibration measures them
on this machine."""
from softvq_fast.ops import attention as _attention  # noqa: F401  (registers its backends)
from softvq_fast.ops import soft_vq as _soft_vq  # noqa: F401  (registers its backends)
from softvq_fast.ops import layernorm_modulate as _layernorm_modulate  # noqa: F401  (registers its backends)
from softvq_fast.ops import linear as _linear  # noqa: F401  (registers its backends)
from softvq_fast.ops import lpips_distance as _lpips_distance  # noqa: F401  (registers its backends)
