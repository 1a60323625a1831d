"""The ops: each module registers a torch.library custom op and its backends (softvq_fast.dispatch)."""
from softvq_fast.ops import attention as _attention  # noqa: F401  (registers its backends)
from softvq_fast.ops import soft_vq as _soft_vq  # noqa: F401  (registers its backends)
from softvq_fast.ops import layernorm_modulate as _layernorm_modulate  # noqa: F401  (registers its backends)
from softvq_fast.ops import linear as _linear  # noqa: F401  (registers its backends)
