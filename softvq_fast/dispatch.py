"""Backend selection shared by every op (xformers fmha style).

Each op registers one `OpBackends`: its backends and a `priority(inputs)` function that returns
the automatic order of backend names for those inputs. A backend declares the devices and dtypes
it handles and answers `not_supported_reasons(inputs)`; an empty list means it can run them. The
op's inputs description (a small NamedTuple or dataclass built per call) carries at least
`device`, `dtype` and `needs_grad`, plus whatever the op's backends and order look at.

`select(inputs, requested)` takes an explicit choice (the argument, else the environment
variable SOFTVQ_FAST_<OP>_BACKEND) or, for "auto", the first backend of `priority(inputs)` with no
reasons; when nothing fits it raises `NoBackendError` listing every backend's reasons.
"""
from __future__ import annotations

import importlib.util
import os
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch

AUTO = "auto"
# Looked up once: torch.compile traces backend selection, and dynamo refuses to trace
# importlib.util.find_spec (fullgraph=True fails on the graph break).
_TRITON_INSTALLED = importlib.util.find_spec("triton") is not None


class NoBackendError(RuntimeError):
    """Raised when the requested backend, or every backend, cannot run the given inputs."""


def grad_needed(*tensors: torch.Tensor | None) -> bool:
    """True when autograd is recording and one of `tensors` (None entries skipped) requires grad."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def backend_env_var(op: str) -> str:
    """The environment variable that overrides `op`'s automatic choice: SOFTVQ_FAST_<OP>_BACKEND."""
    return f"SOFTVQ_FAST_{op.upper()}_BACKEND"


class Backend:
    """One implementation of an op.

    Subclasses set `name`, `devices` (device types such as "cpu", "cuda") and `dtypes`, and may
    override `unavailable_reason` (environment: missing package, extension, GPU) and
    `input_reasons` (shapes, head dims, gradients, ...).
    """

    name: str = ""
    devices: frozenset[str] = frozenset()
    dtypes: frozenset[torch.dtype] = frozenset()

    def unavailable_reason(self) -> str | None:
        """Why this backend cannot run in this environment at all, or None."""
        return None

    def input_reasons(self, inputs: Any) -> list[str]:
        """Reasons specific to these inputs beyond device and dtype."""
        return []

    def not_supported_reasons(self, inputs: Any) -> list[str]:
        reasons = []
        unavailable = self.unavailable_reason()
        if unavailable:
            reasons.append(unavailable)
        if inputs.device.type not in self.devices:
            reasons.append(f"device {inputs.device.type} not supported (supports {sorted(self.devices)})")
        if inputs.dtype not in self.dtypes:
            names = sorted(str(d).replace("torch.", "") for d in self.dtypes)
            reasons.append(f"dtype {str(inputs.dtype).replace('torch.', '')} not supported (supports {names})")
        return reasons + self.input_reasons(inputs)

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name!r}>"


FLOAT_DTYPES = frozenset({torch.float32, torch.bfloat16, torch.float16})
REFERENCE_DTYPES = FLOAT_DTYPES | {torch.float64}


class ReferenceBackend(Backend):
    """An op's eager PyTorch formula: any device torch runs, float64 too (the tests' reference)."""

    name = "reference"
    devices = frozenset({"cpu", "cuda"})
    dtypes = REFERENCE_DTYPES


class ExtensionCpuBackend(Backend):
    """C++ CPU kernels of softvq_fast._C. Subclasses set `dtypes` and `kernel`, one of the op's
    kernels in torch.ops.softvq_fast: an extension built before the op was added lacks it."""

    name = "cpu"
    devices = frozenset({"cpu"})
    kernel: str = ""

    def unavailable_reason(self) -> str | None:
        from softvq_fast._extension import EXTENSION_ERROR, extension_available

        if not extension_available():
            return f"needs the C++ extension ({EXTENSION_ERROR})"
        if not hasattr(torch.ops.softvq_fast, self.kernel):
            return f"the C++ extension was built without the {self.kernel} kernel (rebuild it)"
        return None


def triton_interpreted() -> bool:
    """True under TRITON_INTERPRET=1, where Triton runs its kernels on CPU tensors (tests)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


class TritonBackend(Backend):
    """Fused Triton kernels: CUDA, or CPU tensors under the interpreter (slowly: tests only).
    Subclasses set `dtypes` and any `input_reasons`."""

    name = "triton"

    @property
    def devices(self) -> frozenset[str]:  # type: ignore[override]
        return frozenset({"cuda", "cpu"}) if triton_interpreted() else frozenset({"cuda"})

    def unavailable_reason(self) -> str | None:
        if not _TRITON_INSTALLED:
            return "triton is not installed"
        if not triton_interpreted() and not torch.cuda.is_available():
            return "no CUDA GPU (TRITON_INTERPRET=1 runs the kernels on the CPU, slowly)"
        return None


@dataclass(frozen=True)
class OpBackends:
    """The backends of one op and its automatic order.

    op: the op's name ("attention"); the override variable is SOFTVQ_FAST_<OP>_BACKEND.
    priority: inputs -> backend names in the order `auto` tries them. A backend left out of it is
        used only when asked for by name.
    order_summary: the automatic order in words, for `softvq-fast env`.
    legacy_env_var: an older name of the override variable, still read when the new one is not
        set, with a FutureWarning (a deprecation aimed at users, so shown by default).
    """

    op: str
    backends: tuple[Backend, ...]
    priority: Callable[[Any], Sequence[str]]
    order_summary: str
    legacy_env_var: str | None = None
    env_var: str = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "env_var", backend_env_var(self.op))

    def get(self, name: str) -> Backend:
        for backend in self.backends:
            if backend.name == name:
                return backend
        known = ", ".join([AUTO] + [b.name for b in self.backends])
        raise ValueError(f"{self.op}: unknown backend {name!r}; expected one of: {known}")

    def env_choice(self) -> str | None:
        """The backend named by the environment (the new variable, else the deprecated one), or
        None. Read on every call, so that a change between calls applies."""
        value = os.environ.get(self.env_var)
        if value is None and self.legacy_env_var is not None:
            value = os.environ.get(self.legacy_env_var)
            if value is not None:
                warnings.warn(
                    f"{self.legacy_env_var} is deprecated; set {self.env_var} instead", FutureWarning, stacklevel=3
                )
        return value or None

    def select(self, inputs: Any, requested: str | None = None) -> Backend:
        """Pick the backend for `inputs`: `requested` if given and not "auto", else the
        environment's choice, else the first supported backend of `priority(inputs)`."""
        explicit = requested not in (None, AUTO)
        choice = requested if explicit else (self.env_choice() or AUTO)
        if choice != AUTO:
            backend = self.get(choice)
            reasons = backend.not_supported_reasons(inputs)
            if reasons:
                source = "requested" if explicit else f"set by {self.env_var}"
                raise NoBackendError(
                    f"{self.op}: backend {choice!r} ({source}) cannot run these inputs: " + "; ".join(reasons)
                )
            return backend
        collected = []
        for name in self.priority(inputs):
            backend = self.get(name)
            reasons = backend.not_supported_reasons(inputs)
            if not reasons:
                return backend
            collected.append(f"  {name}: " + "; ".join(reasons))
        raise NoBackendError(f"{self.op}: no backend can run these inputs:\n" + "\n".join(collected))


_REGISTRY: dict[str, OpBackends] = {}


def register_op(op_backends: OpBackends) -> OpBackends:
    """Record an op's backends so that `softvq-fast env` can list them."""
    _REGISTRY[op_backends.op] = op_backends
    return op_backends


def registered_ops() -> dict[str, OpBackends]:
    """Every registered op, importing the op modules first."""
    import softvq_fast.ops  # noqa: F401  (registers on import)

    return dict(_REGISTRY)
