"""softvq-fast: fused kernels and a lean model core for SoftVQ-VAE (Chen et al., CVPR 2025).

Public entry points:
  soft_vq(z, codebook, tau, ...)   fused softmax-over-codebook aggregation (softvq_fast.ops.soft_vq)
  attention(q, k, v, ...)          multi-head attention with backend dispatch (softvq_fast.ops.attention)
  linear(x, weight, bias, ...)     linear layers with a fused activation, oneDNN where faster (softvq_fast.ops.linear)
  lpips_distance(fx, fy, weight)   one layer's LPIPS distance, fused (softvq_fast.ops.lpips_distance)
  softvq_fast.nn                   drop-in modules for the authors' code
  softvq_fast.models               tokenizer and generators
  generate(tokenizer, generator, class_labels, ...)   class labels -> images (softvq_fast.generation)
"""
__version__ = "0.1.0"

from softvq_fast import _extension  # noqa: F401  (loads the C++ ops before any op module)
from softvq_fast.ops.attention import attention  # noqa: E402,F401
from softvq_fast.ops.linear import linear  # noqa: E402,F401
from softvq_fast.ops.lpips_distance import lpips_distance  # noqa: E402,F401
from softvq_fast.ops.soft_vq import SoftVQStats, soft_vq  # noqa: E402,F401


def __getattr__(name: str):
    # `softvq_fast.generate` imports the models and samplers only when first used.
    if name == "generate":
        from softvq_fast.generation import generate

        globals()["generate"] = generate
        return generate
    raise AttributeError(f"module 'softvq_fast' has no attribute {name!r}")
