"""Loads the compiled extension `softvq_fast._C` if it was built, and says why not otherwise."""
from __future__ import annotations

import warnings

import torch  # noqa: F401  (loads libtorch, which _C links against)

try:
    from softvq_fast import _C
except ImportError as exc:  # built with SOFTVQ_FAST_NO_EXTENSION=1, or a broken build
    _C = None
    EXTENSION_ERROR: str | None = f"softvq_fast._C could not be imported: {exc}"
    warnings.warn(
        f"{EXTENSION_ERROR}; the C++/CUDA backends are unavailable and slower PyTorch paths are used "
        "(`softvq-fast env` lists every backend)",
        RuntimeWarning,
        stacklevel=2,
    )
else:
    EXTENSION_ERROR = None


def extension_available() -> bool:
    """True when `softvq_fast._C` was built and imported."""
    return _C is not None


def extension_has_cuda() -> bool:
    """True when the extension was compiled with its CUDA kernels."""
    return _C is not None and bool(_C.WITH_CUDA)


def extension_status() -> str:
    """One line for `softvq-fast env`."""
    if _C is None:
        return f"not available ({EXTENSION_ERROR})"
    return f"loaded from {_C.__file__} ({'CPU + CUDA kernels' if extension_has_cuda() else 'CPU kernels only'})"
