"""GPU telemetry during a run with nvidia-ml-py (NVML): energy from the board's cumulative
energy counter (not the 1 s averaged power reading), and power, memory, SM clock and
utilisation sampled by a background thread. Work inside `span(label)` is also accounted to that
label (energy counter read around it, samples tagged with it), so interleaved runs of several
workloads each get their own figures. A span may hold a burst of several calls back to back
(`span.calls`): the energy per call is the counter's difference over the span divided by them,
which lets calls far shorter than the counter's steps be measured. On the CPU, or without NVML,
`summary()` says why there is nothing."""
from __future__ import annotations

import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Iterator

import torch


@dataclass
class Samples:
    power_w: list[float] = field(default_factory=list)
    memory_gib: list[float] = field(default_factory=list)
    sm_clock_mhz: list[float] = field(default_factory=list)
    utilization_pct: list[float] = field(default_factory=list)
    energy_j: float = 0.0  # spans only: summed counter deltas
    energy_complete: bool = True  # False when a counter read failed
    spans: int = 0
    calls: int = 0  # spans only: the calls they held
    seconds: float = 0.0  # spans only: their summed duration


@dataclass
class Span:
    """What `GpuTelemetry.span` yields: set `calls` to the number of calls the span held."""

    calls: int = 1


# Shortest mean span over which a label's energy is reported: the counter advances in steps of the
# power sensor's updates, so over shorter spans its differences are mostly quantisation.
MIN_ENERGY_SPAN_S = 1.0


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


class GpuTelemetry:
    """`with GpuTelemetry(device) as telemetry: run()`, then `telemetry.summary()`; inside,
    `with telemetry.span("name"): work()` for `telemetry.summary("name")`."""

    def __init__(self, device: torch.device, interval_s: float = 0.02) -> None:
        self.device, self.interval_s = device, interval_s
        self.unavailable: str | None = None
        self.samples = Samples()
        self.labelled: dict[str, Samples] = {}
        self._label: str | None = None
        self._handle = None
        self._nvml = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._energy_start_mj: int | None = None
        self.energy_j: float | None = None
        self.seconds = 0.0
        if device.type != "cuda":
            self.unavailable = f"no GPU telemetry on {device.type}"
            return
        try:
            import pynvml

            pynvml.nvmlInit()
            self._nvml = pynvml
            self._handle = self._find_handle(pynvml)
        except Exception as exc:  # ImportError, NVMLError_LibraryNotFound, driver errors
            self.unavailable = f"NVML unavailable: {exc}"

    def _find_handle(self, pynvml):
        uuid = getattr(torch.cuda.get_device_properties(self.device), "uuid", None)
        if uuid is not None:
            try:
                return pynvml.nvmlDeviceGetHandleByUUID(f"GPU-{uuid}")
            except Exception:  # NVMLError, or a bindings version that wants bytes: use the index
                pass
        return pynvml.nvmlDeviceGetHandleByIndex(self.device.index or 0)

    def _energy_mj(self) -> int | None:
        try:
            return self._nvml.nvmlDeviceGetTotalEnergyConsumption(self._handle)
        except self._nvml.NVMLError:
            return None

    def _sample(self) -> None:
        nvml, handle = self._nvml, self._handle
        while not self._stop.is_set():
            try:
                values = (
                    nvml.nvmlDeviceGetPowerUsage(handle) / 1e3,
                    nvml.nvmlDeviceGetMemoryInfo(handle).used / 2**30,
                    float(nvml.nvmlDeviceGetClockInfo(handle, nvml.NVML_CLOCK_SM)),
                    float(nvml.nvmlDeviceGetUtilizationRates(handle).gpu),
                )
            except nvml.NVMLError:
                values = None
            label = self._label
            targets = [self.samples] + ([self.labelled[label]] if label is not None else [])
            for target in targets if values else []:
                target.power_w.append(values[0])
                target.memory_gib.append(values[1])
                target.sm_clock_mhz.append(values[2])
                target.utilization_pct.append(values[3])
            self._stop.wait(self.interval_s)

    def __enter__(self) -> "GpuTelemetry":
        self._start = time.perf_counter()
        if self.unavailable is None:
            torch.cuda.synchronize(self.device)
            self._energy_start_mj = self._energy_mj()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.unavailable is None:
            torch.cuda.synchronize(self.device)
            end = self._energy_mj()
            self._stop.set()
            self._thread.join()
            if self._energy_start_mj is not None and end is not None:
                self.energy_j = (end - self._energy_start_mj) / 1e3
        self.seconds = time.perf_counter() - self._start

    @contextmanager
    def span(self, label: str) -> Iterator[Span]:
        """Account the work inside (synchronised at both ends) to `label`; the yielded Span's
        `calls` (default 1) says how many calls it held."""
        samples = self.labelled.setdefault(label, Samples())
        samples.spans += 1
        span = Span()
        if self.unavailable is not None:
            yield span
            samples.calls += span.calls
            return
        torch.cuda.synchronize(self.device)
        start = self._energy_mj()
        began = time.perf_counter()
        self._label = label
        try:
            yield span
            torch.cuda.synchronize(self.device)
        finally:
            self._label = None
        samples.calls += span.calls
        samples.seconds += time.perf_counter() - began
        end = self._energy_mj()
        if start is None or end is None:
            samples.energy_complete = False
        else:
            samples.energy_j += (end - start) / 1e3

    def summary(self, label: str | None = None) -> dict[str, float | str | None]:
        """For the whole run, or the spans of `label`: energy_j (counter; for the whole run
        power x time if the counter is unsupported; for labels None unless their spans last
        MIN_ENERGY_SPAN_S on average), energy_per_call_j (labels: energy_j over the calls the
        spans held), mean_power_w, peak_memory_gib (device-wide memory in use),
        mean_sm_clock_mhz, mean_utilization_pct."""
        if self.unavailable is not None:
            return {"telemetry": self.unavailable}
        samples = self.samples if label is None else self.labelled[label]
        mean_power = _mean(samples.power_w)
        result: dict[str, float | str | None] = {}
        if label is None:
            energy, source = self.energy_j, "counter"
            if energy is None and mean_power is not None:
                energy, source = mean_power * self.seconds, "sampled power x time"
            result.update(energy_j=energy, energy_source=source)
        else:
            measurable = samples.energy_complete and samples.seconds >= MIN_ENERGY_SPAN_S * samples.spans
            energy = samples.energy_j if measurable and samples.calls else None
            result.update(energy_j=energy, energy_per_call_j=energy / samples.calls if energy is not None else None)
        result.update(
            mean_power_w=mean_power,
            peak_memory_gib=max(samples.memory_gib, default=None),
            mean_sm_clock_mhz=_mean(samples.sm_clock_mhz),
            mean_utilization_pct=_mean(samples.utilization_pct),
        )
        return result
