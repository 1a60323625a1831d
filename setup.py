"""Build script: installs `softvq_fast`, maps top-level `kernels/` to `softvq_fast.kernels`
and builds the extension `softvq_fast._C` from `csrc/`.

Environment switches (flash-attention style):
  SOFTVQ_FAST_CUDA=auto|1|0   build the CUDA kernels: auto (default) when nvcc and a CUDA-enabled
                              torch are present; 1 forces them (fails clearly if impossible);
                              0 skips them (CPU kernels only).
  SOFTVQ_FAST_NO_EXTENSION=1  build no extension at all (the package falls back to PyTorch paths).
  SOFTVQ_FAST_CUDA_ARCHS      semicolon list of compute capabilities, default "8.0;9.0+PTX"
                              (+PTX: also PTX, which the driver compiles for newer GPUs).
  MAX_JOBS                    parallel compile jobs (honoured by torch's ninja build).
  CUDA_HOME                   CUDA toolkit root (torch may guess wrong: set it explicitly).
"""
from __future__ import annotations

import glob
import os
import shutil
import sys

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))
DEFAULT_CUDA_ARCHS = "8.0;9.0+PTX"


def _log(msg: str) -> None:
    print(f"[softvq-fast setup] {msg}", file=sys.stderr)


def _sources(pattern: str) -> list[str]:
    return sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, pattern), recursive=True))


def _cuda_decision() -> tuple[bool, str]:
    """Return (build_cuda, why)."""
    switch = os.environ.get("SOFTVQ_FAST_CUDA", "auto").strip().lower()
    if switch not in {"auto", "1", "0"}:
        raise SystemExit(f"SOFTVQ_FAST_CUDA must be auto, 1 or 0, got {switch!r}")
    if switch == "0":
        return False, "SOFTVQ_FAST_CUDA=0"
    import torch
    from torch.utils.cpp_extension import CUDA_HOME

    problems = []
    if torch.version.cuda is None:
        problems.append(f"torch {torch.__version__} is a CPU-only build")
    nvcc = os.path.join(CUDA_HOME, "bin", "nvcc") if CUDA_HOME else shutil.which("nvcc")
    if not nvcc or not os.path.exists(nvcc):
        problems.append("nvcc not found (set CUDA_HOME to the CUDA toolkit root)")
    if problems:
        if switch == "1":
            raise SystemExit("SOFTVQ_FAST_CUDA=1 but the CUDA kernels cannot be built: " + "; ".join(problems))
        return False, "; ".join(problems)
    return True, f"nvcc at {nvcc}, torch CUDA {torch.version.cuda}"


def _extensions() -> tuple[list, dict]:
    if os.environ.get("SOFTVQ_FAST_NO_EXTENSION", "0") == "1":
        _log("SOFTVQ_FAST_NO_EXTENSION=1: building no extension")
        return [], {}
    try:
        import torch  # noqa: F401
        from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension
    except ImportError as exc:
        raise SystemExit(
            "softvq-fast builds its extension against an installed torch: install torch first, then "
            "`pip install --no-build-isolation .` (" + str(exc) + ")"
        ) from exc

    build_cuda, why = _cuda_decision()
    sources = _sources("csrc/*.cpp") + _sources("csrc/cpu/*.cpp")
    # torch's build adds the C++ standard its headers need (C++17 or C++20 by version).
    cxx_flags = ["-O3"]
    extra_link: list[str] = []
    if sys.platform.startswith("linux"):
        cxx_flags += ["-fopenmp"]
        extra_link += ["-fopenmp"]
    kwargs = dict(name="softvq_fast._C", include_dirs=[os.path.join(ROOT, "csrc")], py_limited_api=False)
    if build_cuda:
        archs = os.environ.get("SOFTVQ_FAST_CUDA_ARCHS", DEFAULT_CUDA_ARCHS)
        # torch's build reads TORCH_CUDA_ARCH_LIST; ours is the documented switch.
        os.environ["TORCH_CUDA_ARCH_LIST"] = archs
        _log(f"building CPU + CUDA kernels for compute capabilities {archs} ({why})")
        nvcc_flags = ["-O3", "--use_fast_math", "-lineinfo", "--expt-relaxed-constexpr"]
        ext = CUDAExtension(
            sources=sources + _sources("csrc/cuda/*.cu"),
            define_macros=[("SOFTVQ_WITH_CUDA", "1")],
            extra_compile_args={"cxx": cxx_flags, "nvcc": nvcc_flags},
            extra_link_args=extra_link,
            **kwargs,
        )
    else:
        _log(f"building CPU kernels only ({why})")
        ext = CppExtension(sources=sources, extra_compile_args={"cxx": cxx_flags}, extra_link_args=extra_link, **kwargs)
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=shutil.which("ninja") is not None)}


ext_modules, cmdclass = _extensions()

setup(
    packages=[
        "softvq_fast",
        "softvq_fast.ops",
        "softvq_fast.ops.attention",
        "softvq_fast.nn",
        "softvq_fast.models",
        "softvq_fast.sampling",
        "softvq_fast.commands",
        "softvq_fast.kernels",
    ],
    package_dir={"softvq_fast.kernels": "kernels"},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
