"""CPU order rules: where an op puts its own CPU backend before torch's, on this machine.

A rule (`CpuRule`) is data: the backend an op puts first (attention: "softvq", linear: "onednn")
and, per dtype and pass (forward, or forward+backward when a gradient is needed), a window of
input sizes (inclusive bounds per feature: "kv_len" for attention, "macs" and "in_features" for
linear) where it does. Outside every window the op's default order holds (SDPA first for
attention, torch first for linear).

Where a rule comes from, in this order:
  1. the calibration file that `softvq-fast calibrate` writes (`calibration_path()`), for an
     entry whose key matches this machine exactly: CPU model name, vendor, ISA, torch threads and
     torch version (`calibration_key`); SOFTVQ_FAST_CPU_RULES=builtin skips the file;
  2. BUILTIN_RULES, keyed by (vendor, ISA, torch threads) of the machines they were measured on;
  3. nothing: the default order ("not measured").
Rules are looked up per call from torch.get_num_threads(), so torch.set_num_threads changes the
rule in force. The CPU's vendor, model and ISA, the environment and the file are read once, at
import and by `reload()`, so that choices cost a dictionary lookup and stay the same between
calls (no timing ever happens inside an op call).

File format (JSON), the same per-op rule format as BUILTIN_RULES:
  {"format": 1, "machines": {"<calibration key>": {"rules": {"attention": RULE, "linear": RULE}}}}
  RULE = {"first": "softvq", "windows": {"float32 forward": {"kv_len": [low, high]}, ...}}
with null for an unbounded high end and "forward+backward" as the pass with gradients.
"""
from __future__ import annotations

import json
import math
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, NamedTuple

import torch

FORMAT = 1
PASSES = {False: "forward", True: "forward+backward"}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
CACHE_DIR_ENV = "SOFTVQ_FAST_CACHE_DIR"
RULES_ENV = "SOFTVQ_FAST_CPU_RULES"
RULES_ENV_VALUES = ("auto", "builtin")

Window = Mapping[str, tuple[float, float]]


def window_key(dtype: torch.dtype, needs_grad: bool) -> str:
    """"float32 forward", "bfloat16 forward+backward", ...: a rule's window names."""
    return f"{str(dtype).replace('torch.', '')} {PASSES[needs_grad]}"


@dataclass(frozen=True)
class CpuRule:
    """Where `op` puts `first` before its default order: inside `windows[(dtype, needs_grad)]`,
    a map feature -> inclusive (low, high). `source` says where the rule came from."""

    op: str
    first: str | None
    windows: Mapping[tuple[torch.dtype, bool], Window]
    source: str

    def puts_first(self, dtype: torch.dtype, needs_grad: bool, features: Mapping[str, float]) -> bool:
        """True when these inputs fall in the window for their dtype and pass."""
        window = self.windows.get((dtype, needs_grad))
        return window is not None and all(low <= features[name] <= high for name, (low, high) in window.items())

    def to_json(self) -> dict[str, Any]:
        return {
            "first": self.first,
            "windows": {
                window_key(dtype, grad): {name: [low, None if math.isinf(high) else high]
                                          for name, (low, high) in window.items()}
                for (dtype, grad), window in self.windows.items()
            },
        }

    @classmethod
    def from_json(cls, op: str, data: Mapping[str, Any], source: str) -> "CpuRule":
        """Parses RULE (module docstring); raises ValueError naming what is malformed."""
        passes = {name: grad for grad, name in PASSES.items()}
        windows: dict[tuple[torch.dtype, bool], Window] = {}
        try:
            for key, window in data["windows"].items():
                dtype_name, pass_name = key.split(" ")
                windows[(DTYPES[dtype_name], passes[pass_name])] = {
                    name: (float(low), math.inf if high is None else float(high)) for name, (low, high) in window.items()
                }
            first = data["first"]
        except (KeyError, ValueError, TypeError, AttributeError) as exc:
            raise ValueError(f"{source}: malformed {op} rule {data!r} ({type(exc).__name__}: {exc})") from exc
        return cls(op, first, windows, source)

    def describe(self, default: str) -> str:
        """One line: where `first` goes first, `default` (the op's default order in words)
        elsewhere, and the rule's source."""
        if not self.windows:
            return f"{default} ({self.source})"
        parts = []
        for (dtype, grad), window in self.windows.items():
            bounds = ", ".join(f"{_bound(low)} <= {name} <= {_bound(high)}" for name, (low, high) in window.items())
            parts.append(f"{window_key(dtype, grad)}: {bounds}")
        return f"{self.first} first where {'; '.join(parts)}; elsewhere {default} ({self.source})"


def _bound(value: float) -> str:
    if math.isinf(value):
        return "inf"
    return str(int(value)) if value.is_integer() else f"{value:g}"


class Machine(NamedTuple):
    """What the rules are keyed by, besides the thread count and the torch version."""

    vendor: str  # /proc/cpuinfo vendor_id ("AuthenticAMD", "GenuineIntel"), "" where unknown
    model: str  # /proc/cpuinfo model name, else platform.processor()
    isa: str  # torch's CPU capability ("AVX512", "AVX2", "DEFAULT", ...), "+AMX" with AMX tiles


def detect_machine(cpuinfo: str | None = None) -> Machine:
    """This CPU; `cpuinfo` is /proc/cpuinfo's text (read here when None)."""
    import platform

    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text(encoding="ascii", errors="replace")
        except OSError:
            cpuinfo = ""
    fields: dict[str, str] = {}
    for line in cpuinfo.splitlines():
        name, sep, value = line.partition(":")
        if sep and name.strip() in ("vendor_id", "model name"):
            fields.setdefault(name.strip(), value.strip())
    try:
        amx = bool(torch.cpu._is_amx_tile_supported())
    except (AttributeError, RuntimeError):  # private API: absent from some torch versions
        amx = False
    isa = torch.backends.cpu.get_cpu_capability() + ("+AMX" if amx else "")
    return Machine(fields.get("vendor_id", ""), fields.get("model name", platform.processor()), isa)


# (vendor, ISA, torch threads) -> {"measured_on": str, op: RULE}: the machines the rules were
# measured on with the benchmark harness (bench/suites/attention.py, bench/suites/linear.py;
# tables in bench/RESULTS.md and the commit history).
BUILTIN_RULES: dict[tuple[str, str, int], dict[str, Any]] = {
    ("AuthenticAMD", "AVX512", 2): {
        "measured_on": "an AMD EPYC (Zen 4, AVX-512, no AMX) at 2 torch threads",
        "attention": {"first": "softvq", "windows": {
            f"{dtype} {pass_name}": {"kv_len": [0, None]}
            for dtype in ("float32", "bfloat16") for pass_name in PASSES.values()
        }},
        "linear": {"first": "onednn", "windows": {
            "float32 forward": {"macs": [2**21, None], "in_features": [64, None]},
            "float32 forward+backward": {"macs": [2**25, None], "in_features": [256, None]},
        }},
    },
    ("GenuineIntel", "AVX512+AMX", 2): {
        "measured_on": "an Intel Xeon with AMX at 2 torch threads",
        "attention": {"first": "softvq", "windows": {
            "float32 forward": {"kv_len": [0, 1200]},
            "bfloat16 forward": {"kv_len": [0, 32]},
            "float32 forward+backward": {"kv_len": [64, 1200]},
        }},
    },
}

MACHINE = detect_machine()


def torch_threads() -> int:
    return torch.get_num_threads()


# torch.compile cannot put torch.get_num_threads() in a graph: it reads it once, while tracing.
if hasattr(torch.compiler, "assume_constant_result"):
    torch_threads = torch.compiler.assume_constant_result(torch_threads)


def calibration_key(threads: int) -> str:
    """The calibration file's key for this machine at `threads` torch threads."""
    return f"{MACHINE.model}|{MACHINE.vendor}|{MACHINE.isa}|threads={threads}|torch={torch.__version__}"


def calibration_path() -> Path:
    """$SOFTVQ_FAST_CACHE_DIR/cpu_rules.json, by default ~/.cache/softvq-fast/cpu_rules.json."""
    folder = os.environ.get(CACHE_DIR_ENV) or os.path.join(os.path.expanduser("~"), ".cache", "softvq-fast")
    return Path(folder) / "cpu_rules.json"


def read_calibration_file(path: Path) -> dict[str, Any]:
    """The file's {"format", "machines"} content; an empty one where the file does not exist.
    Raises ValueError naming the file when it is not a calibration file."""
    try:
        content = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {"format": FORMAT, "machines": {}}
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"CPU rules file {path} cannot be read ({type(exc).__name__}: {exc}); "
                         f"delete it or run `softvq-fast calibrate` again") from exc
    if not isinstance(content, dict) or content.get("format") != FORMAT or not isinstance(content.get("machines"), dict):
        raise ValueError(f"CPU rules file {path} is not in format {FORMAT} ({{'format': 1, 'machines': {{...}}}}); "
                         f"delete it or run `softvq-fast calibrate` again")
    return content


def write_calibration(rules: Mapping[str, CpuRule], key: str, path: Path) -> None:
    """Stores `rules` (op -> rule) under `key` in the file at `path`, keeping other machines'
    entries; written under a temporary name, then renamed. Reloads the rules in force."""
    content = read_calibration_file(path)
    content["machines"][key] = {"rules": {op: rule.to_json() for op, rule in rules.items()}}
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    temporary.write_text(json.dumps(content, indent=1, sort_keys=True) + "\n", encoding="utf-8")
    os.replace(temporary, path)
    reload()


class _Loaded(NamedTuple):
    path: Path
    machines: Mapping[str, Any]  # the file's entries; empty where it is not read
    note: str | None  # why the file is not read, for `softvq-fast env`
    error: str | None  # a bad SOFTVQ_FAST_CPU_RULES, raised when a rule is first needed, not at import


def _load() -> _Loaded:
    mode = os.environ.get(RULES_ENV) or "auto"
    path = calibration_path()
    if mode not in RULES_ENV_VALUES:
        error = f"{RULES_ENV} must be one of {RULES_ENV_VALUES}, got {mode!r}"
        return _Loaded(path, {}, error, error)
    if mode == "builtin":
        return _Loaded(path, {}, f"ignored ({RULES_ENV}=builtin)", None)
    if not path.exists():
        return _Loaded(path, {}, "not written (run `softvq-fast calibrate`)", None)
    try:
        return _Loaded(path, read_calibration_file(path)["machines"], None, None)
    except ValueError as exc:
        warnings.warn(f"{exc}; using the built-in CPU rules", RuntimeWarning, stacklevel=2)
        return _Loaded(path, {}, str(exc), None)


_loaded = _load()
_rules: dict[tuple[str, int], CpuRule] = {}
_generation = 0


def reload() -> None:
    """Reads SOFTVQ_FAST_CPU_RULES, SOFTVQ_FAST_CACHE_DIR and the calibration file again; the
    ops' remembered choices are dropped with the old rules."""
    global _loaded, _generation
    _loaded = _load()
    _rules.clear()
    _generation += 1


def calibration_status() -> str:
    """One line for `softvq-fast env`: the calibration file and whether it serves this machine."""
    if _loaded.note is not None:
        return f"{_loaded.path}: {_loaded.note}"
    key = calibration_key(torch_threads())
    found = "an entry" if key in _loaded.machines else "no entry"
    return f"{_loaded.path}: {len(_loaded.machines)} entries, {found} for {key}"


def state() -> tuple[int, int]:
    """What the rule in force depends on that can change in a process: (torch threads, reloads).
    Ops that remember their choices key them by it."""
    return torch_threads(), _generation


def cpu_rule(op: str, threads: int | None = None) -> CpuRule:
    """The rule in force for `op` at `threads` torch threads (default: torch's current setting)."""
    threads = torch_threads() if threads is None else threads
    rule = _rules.get((op, threads))
    if rule is None:
        rule = _rules[(op, threads)] = _resolve(op, threads)
    return rule


def _resolve(op: str, threads: int) -> CpuRule:
    if _loaded.error is not None:
        raise ValueError(_loaded.error)
    key = calibration_key(threads)
    calibrated = _loaded.machines.get(key, {}).get("rules", {}).get(op)
    if calibrated is not None:
        return CpuRule.from_json(op, calibrated, f"calibration file {_loaded.path} for {key}")
    measured = BUILTIN_RULES.get((MACHINE.vendor, MACHINE.isa, threads), {})
    if op in measured:
        return CpuRule.from_json(op, measured[op], f"built-in table, measured on {measured['measured_on']}")
    return CpuRule(op, None, {}, f"not measured on {MACHINE.vendor or 'this CPU'} {MACHINE.isa} "
                                  f"at {threads} threads")
