"""Package foundation: imports, the extension, the env command, the dispatcher contract."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

import softvq_fast
from softvq_fast import cli
from softvq_fast._extension import extension_available, extension_has_cuda
from softvq_fast.dispatch import AUTO, Backend, NoBackendError, OpBackends, registered_ops


def test_extension_imports_without_gpu():
    assert extension_available(), "softvq_fast._C was not built or does not import"


def _cuobjdump() -> str | None:
    """cuobjdump from the CUDA toolkit, else the copy in Triton's wheel."""
    found = shutil.which("cuobjdump") or os.path.join(os.environ.get("CUDA_HOME", "/usr/local/cuda"), "bin", "cuobjdump")
    if os.path.exists(found):
        return found
    try:
        import triton
    except ImportError:
        return None
    bundled = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    return str(bundled) if bundled.exists() else None


@pytest.mark.skipif(not extension_has_cuda(), reason="softvq_fast._C was built without CUDA kernels")
def test_cuda_kernels_are_built_for_sm90_without_spills():
    tool = _cuobjdump()
    if tool is None:
        pytest.skip("no cuobjdump (CUDA toolkit or triton) to read the library with")
    library = softvq_fast._extension._C.__file__
    elves = subprocess.run([tool, "--list-elf", library], capture_output=True, text=True, check=True).stdout
    assert "sm_90" in elves, elves
    usage = subprocess.run([tool, "--dump-resource-usage", library], capture_output=True, text=True, check=True).stdout
    kernels = re.findall(r"Function (\S+):\n\s+REG:(\d+) STACK:(\d+) SHARED:\d+ LOCAL:(\d+)", usage)
    assert kernels, usage
    spilling = [(name, stack, local) for name, _, stack, local in kernels if int(stack) or int(local)]
    assert not spilling, spilling


def test_kernels_package_maps_to_softvq_fast_kernels():
    import softvq_fast.kernels

    assert softvq_fast.kernels.__name__ == "softvq_fast.kernels"


def test_env_command_lists_versions_and_backends():
    out = subprocess.run(
        [sys.executable, "-m", "softvq_fast.cli", "env"], capture_output=True, text=True, check=True
    ).stdout
    for word in ("torch", "triton", "extension", "devices:", "backends"):
        assert word in out
    assert softvq_fast.__version__ in out


def test_cli_help_lists_every_command(capsys):
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    out = capsys.readouterr().out
    for name in cli.COMMANDS:
        assert name.replace("_", "-") in out


class _Inputs:
    def __init__(self, device="cpu", dtype=torch.float32, n=4, needs_grad=False):
        self.device, self.dtype, self.n, self.needs_grad = torch.device(device), dtype, n, needs_grad


class _Small(Backend):
    name, devices, dtypes = "small", frozenset({"cpu"}), frozenset({torch.float32})

    def input_reasons(self, inputs):
        return [] if inputs.n <= 8 else [f"n={inputs.n} > 8"]


class _Missing(Backend):
    name, devices, dtypes = "missing", frozenset({"cpu", "cuda"}), frozenset({torch.float32, torch.bfloat16})

    def unavailable_reason(self):
        return "package xyz is not installed"


class _Any(Backend):
    name, devices, dtypes = "any", frozenset({"cpu"}), frozenset({torch.float32, torch.bfloat16})


def _op(legacy_env_var=None):
    return OpBackends("toy", (_Missing(), _Small()), lambda inputs: ["missing", "small"], "missing, small",
                      legacy_env_var=legacy_env_var)


def test_dispatch_auto_takes_first_supported(monkeypatch):
    monkeypatch.delenv("SOFTVQ_FAST_TOY_BACKEND", raising=False)
    assert _op().select(_Inputs(), AUTO).name == "small"


def test_dispatch_lists_every_reason_when_nothing_fits(monkeypatch):
    monkeypatch.delenv("SOFTVQ_FAST_TOY_BACKEND", raising=False)
    with pytest.raises(NoBackendError) as err:
        _op().select(_Inputs(dtype=torch.bfloat16, n=20))
    text = str(err.value)
    assert "package xyz is not installed" in text and "n=20 > 8" in text and "bfloat16" in text


def test_dispatch_explicit_and_env_choice(monkeypatch):
    with pytest.raises(NoBackendError, match="'missing' .requested"):
        _op().select(_Inputs(), "missing")
    monkeypatch.setenv("SOFTVQ_FAST_TOY_BACKEND", "missing")
    with pytest.raises(NoBackendError, match="SOFTVQ_FAST_TOY_BACKEND"):
        _op().select(_Inputs())
    with pytest.raises(ValueError, match="unknown backend 'nope'"):
        _op().select(_Inputs(), "nope")


def test_dispatch_priority_sees_the_inputs(monkeypatch):
    """The automatic order is a function of the inputs (size, needs_grad, ...), not of the device alone."""
    monkeypatch.delenv("SOFTVQ_FAST_TOY_BACKEND", raising=False)
    op = OpBackends("toy", (_Small(), _Any()),
                    lambda inputs: ["any", "small"] if inputs.needs_grad or inputs.n > 2 else ["small", "any"], "")
    assert op.select(_Inputs(n=2)).name == "small"
    assert op.select(_Inputs(n=3)).name == "any"
    assert op.select(_Inputs(n=2, needs_grad=True)).name == "any"
    assert op.select(_Inputs(n=20)).name == "any"


def test_dispatch_old_environment_name_warns_and_yields_to_the_new(monkeypatch):
    monkeypatch.delenv("SOFTVQ_FAST_TOY_BACKEND", raising=False)
    monkeypatch.setenv("TOY_OLD", "missing")
    op = _op(legacy_env_var="TOY_OLD")
    with pytest.warns(FutureWarning, match="TOY_OLD is deprecated; set SOFTVQ_FAST_TOY_BACKEND instead"):
        with pytest.raises(NoBackendError, match=r"'missing' \(set by SOFTVQ_FAST_TOY_BACKEND\)"):
            op.select(_Inputs())
    monkeypatch.setenv("SOFTVQ_FAST_TOY_BACKEND", "small")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert op.select(_Inputs()).name == "small"


def test_every_op_registers_one_backends_object_with_one_env_name_pattern():
    import importlib

    ops = registered_ops()
    assert set(ops) == {"attention", "soft_vq", "linear", "layernorm_modulate", "lpips_distance"}
    for name, op in ops.items():
        assert op.env_var == f"SOFTVQ_FAST_{name.upper()}_BACKEND"
        assert importlib.import_module(f"softvq_fast.ops.{name}").BACKENDS is op
    assert {op.legacy_env_var for op in ops.values() if op.legacy_env_var is not None} == {
        "SOFTVQ_FAST_ATTENTION", "SOFTVQ_FAST_BACKEND", "SOFTVQ_FAST_LINEAR", "SOFTVQ_FAST_LN_MODULATE_BACKEND"}


def test_a_cpu_backend_whose_kernel_the_extension_lacks_says_rebuild():
    from softvq_fast.dispatch import ExtensionCpuBackend
    from softvq_fast.ops.lpips_distance import CpuBackend

    class Stale(ExtensionCpuBackend):
        kernel = "no_such_kernel"

    if CpuBackend().unavailable_reason() is not None:
        pytest.skip("the extension is not built")
    assert Stale().unavailable_reason() == "the C++ extension was built without the no_such_kernel kernel (rebuild it)"
