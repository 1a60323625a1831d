"""softvq-fast: fused kernels and a lean model core for SoftVQ-VAE (Chen et al., CVPR 2025).

Public entry points:
  soft_vq(z, codebook, tau, ...)   fused softmax-over-codebook aggregation (softvq_fast.ops.soft_vq)
  attention(q, k, v, ...)          multi-head attention with backend dispatch (softvq_fast.ops.attention)
  softvq_fast.nn                   drop-in modules for the authors' code
  softvq_fast.models               tokenizer and generators
"""
__version__ = "0.1.0"

from softvq_fast import _extension  # noqa: F401  (loads the C++ ops before any op module)
from softvq_fast.ops.attention import attention  # noqa: E402,F401
from softvq_fast.ops.soft_vq import SoftVQStats, soft_vq  # noqa: E402,F401
