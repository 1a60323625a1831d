"""Drop-in modules built on softvq_fast ops."""
from softvq_fast.nn.linear import Linear  # noqa: F401
from softvq_fast.nn.soft_vq import SoftVectorQuantizer  # noqa: F401
from softvq_fast.nn.transformer import Attention, Mlp  # noqa: F401
