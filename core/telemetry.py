"""Telemetry: a sampler thread in the controller that says how busy each device is.

Every `telemetry.interval_s` (default 0.25 s) it emits one UtilizationSample per
logical device:

  CUDA       NVML's utilization, with memory used/total, power, temperature and SM clock
             in `extra`.  What NVML cannot tell is None, and `extra["not_available"]`
             says what and why: a missing driver never raises.  Only NVML is read here,
             never torch.cuda, so the controller (GUI, CLI) holds no CUDA context.
  simulated  the share of each sampled step the device spent computing, from the ranks'
             PhaseSpan events, and the CPU use of the rank process that drives it (psutil).

It also completes the ranks' MemorySample events on CUDA with non_torch = what NVML
sees the rank process use on the GPU − what PyTorch's allocator has reserved (the CUDA
context, NCCL buffers, other libraries).  The Run feeds it every batch of events
(`merge`) and stops it when the run ends.
"""

from __future__ import annotations

import os
import queue
import threading
from collections import deque
from collections.abc import Callable, Iterable
from time import perf_counter
from typing import Any

from . import nvml
from .devices import Device
from .events import Event, MemorySample, PhaseSpan, RunEnded, UtilizationSample
from .spans import shares

UTILIZATION_EXPLAINED = (
    "GPU utilization, as NVML and nvidia-smi report it, is the share of the last sample "
    "period during which at least one kernel was running on the GPU. It is not how busy the "
    "GPU's streaming multiprocessors were: one small kernel that keeps a single SM of a hundred "
    "busy reads as 100 %. Treat it as 'the GPU was never idle', not as 'the GPU was used to the "
    "full'. On simulated devices 'busy' is the share of each sampled training step the device "
    "spent computing (forward, backward, optimizer) rather than communicating or waiting, and "
    "CPU is the rank process's CPU use (100 % = one core)."
)
WINDOW_S = 1.0
"""Steps whose spans arrived within this long are averaged: spans come from sampled steps
only (about one per interval), so a single interval may hold none."""


class Sampler(threading.Thread):
    """Samples every device at a fixed cadence into a queue that the Run drains."""

    def __init__(self, devices: list[Device], pids: Callable[[], list[int]], t0: float,
                 interval_s: float = 0.25, world: int = 1) -> None:
        super().__init__(daemon=True, name="paralab-telemetry")
        self.devices, self.pids, self.t0 = devices, pids, t0
        self.interval_s, self.world = interval_s, world
        self.queue: queue.SimpleQueue[UtilizationSample] = queue.SimpleQueue()
        self.busy = BusyMeter(WINDOW_S)
        self._halt = threading.Event()
        self._processes: dict[int, Any] = {}

    # ---- the thread ----------------------------------------------------------------------------

    def run(self) -> None:
        while not self._halt.wait(self.interval_s):
            try:
                for sample in self.sample():
                    self.queue.put(sample)
            except Exception:  # telemetry must never take a run down
                continue

    def stop(self) -> None:
        self._halt.set()
        if self.is_alive() and threading.current_thread() is not self:
            self.join(timeout=2.0)

    def sample(self) -> list[UtilizationSample]:
        now = perf_counter() - self.t0
        gpus = {d.gpu: gpu_reading(d.gpu) for d in self.devices if d.kind == "cuda"}
        busy = self.busy.fractions(perf_counter())
        cpu = {pid: self._cpu_percent(pid) for pid in {self._pid_of(d) for d in self.devices}}
        out = []
        for d in self.devices:
            if d.kind == "cuda":
                percent, extra = gpus[d.gpu]
                out.append(UtilizationSample(d.index, percent, now, "nvml", {**extra, "shared_by": d.share}))
            else:
                fraction = busy.get(d.index)
                extra = {"cpu_percent": cpu[self._pid_of(d)], "cpu_cores": os.cpu_count(),
                         "cpu_shared_by": 1 if self.world > 1 else len(self.devices)}
                if fraction is None:
                    extra["not_available"] = {"percent": "no sampled training step yet"}
                out.append(UtilizationSample(d.index, None if fraction is None else 100.0 * fraction, now,
                                             "spans", extra))
        return out

    # ---- called by the Run's event loop --------------------------------------------------------

    def merge(self, batch: list[Event]) -> list[Event]:
        """Take in a batch of the ranks' events and return it with the samples taken since,
        these first: a run's last event stays its RunEnded."""
        self.observe(batch)
        samples: list[Event] = []
        while True:
            try:
                samples.append(self.queue.get_nowait())
            except queue.Empty:
                break
        if not samples:
            return batch
        if batch and isinstance(batch[-1], RunEnded):
            return batch[:-1] + samples + batch[-1:]
        return samples + batch

    def observe(self, events: Iterable[Event]) -> None:
        arrived = perf_counter()
        for e in events:
            if isinstance(e, PhaseSpan) and e.clock == "host":  # the host's busy share, in host time
                self.busy.add(e, arrived)
            elif isinstance(e, MemorySample) and "reserved" in e.extra:
                self._add_non_torch(e)

    # ---- helpers -------------------------------------------------------------------------------

    def _pid_of(self, device: Device) -> int | None:
        pids = self.pids()
        rank = device.index if self.world > 1 else 0
        return pids[rank] if rank < len(pids) else None

    def _cpu_percent(self, pid: int | None) -> float | None:
        if pid is None:
            return None
        import psutil

        try:
            proc = self._processes.get(pid)
            if proc is None:
                proc = self._processes[pid] = psutil.Process(pid)
                proc.cpu_percent(None)  # the first reading only starts the clock
                return None
            return proc.cpu_percent(None)
        except psutil.Error:
            return None

    def _add_non_torch(self, e: MemorySample) -> None:
        device = next((d for d in self.devices if d.index == e.device), None)
        if device is None or device.kind != "cuda":
            return
        used = process_gpu_memory(device.gpu, self._pid_of(device))
        if used is None and device.share == 1:
            reading = nvml.query("nvmlDeviceGetMemoryInfo", nvml.handle(device.gpu))
            used = int(reading.used) if reading is not None else None
        if used is not None:
            e.extra["nvml_used"] = used
            e.extra["non_torch"] = max(0, used - int(e.extra["reserved"]))


class BusyMeter:
    """Each device's share of a step spent computing, over the recently sampled steps
    (core.spans' compute share): a device that waits for the others, or communicates, is
    busy for less than the whole step."""

    def __init__(self, window_s: float = WINDOW_S) -> None:
        self.window_s = window_s
        self.spans: deque[tuple[float, PhaseSpan]] = deque()
        self.last: dict[int, float] = {}
        self.last_seen: float | None = None

    def add(self, span: PhaseSpan, arrived: float) -> None:
        self.spans.append((arrived, span))
        self.last_seen = arrived

    def fractions(self, now: float) -> dict[int, float]:
        while self.spans and now - self.spans[0][0] > self.window_s:
            self.spans.popleft()
        if not self.spans:
            if self.last_seen is not None and now - self.last_seen > 3 * self.window_s:
                return dict.fromkeys(self.last, 0.0)  # paused or stuck: nothing computes
            return dict(self.last)
        self.last.update({d: computed for d, (computed, _) in shares(s for _, s in self.spans).items()})
        return dict(self.last)


# ---- NVML ------------------------------------------------------------------------------------


def gpu_reading(gpu: int | None) -> tuple[float | None, dict[str, Any]]:
    """(utilization %, extra) of one GPU; whatever NVML cannot give is None and named
    in extra["not_available"] with the reason."""
    missing: dict[str, str] = {}
    if not nvml.available():
        reason = nvml.unavailable_reason() or "NVML is not available"
        keys = ("percent", "memory_used_bytes", "memory_total_bytes", "power_w", "temperature_c", "sm_clock_mhz")
        return None, {**dict.fromkeys(keys[1:]), "gpu": gpu, "not_available": dict.fromkeys(keys, reason)}
    h = nvml.handle(gpu) if gpu is not None else None
    if h is None:
        missing["gpu"] = f"NVML has no GPU {gpu}"

    def read(name: str, fn: str, *args: Any) -> Any:
        value = nvml.query(fn, h, *args) if h is not None else None
        if value is None:
            missing[name] = "NVML cannot read it on this GPU"
        return value

    util = read("percent", "nvmlDeviceGetUtilizationRates")
    mem = read("memory_used_bytes", "nvmlDeviceGetMemoryInfo")
    power = read("power_w", "nvmlDeviceGetPowerUsage")
    temp = read("temperature_c", "nvmlDeviceGetTemperature", 0)  # NVML_TEMPERATURE_GPU
    clock = read("sm_clock_mhz", "nvmlDeviceGetClockInfo", 1)  # NVML_CLOCK_SM
    if mem is None:
        missing["memory_total_bytes"] = missing["memory_used_bytes"]
    extra = {
        "gpu": gpu,
        "memory_used_bytes": int(mem.used) if mem is not None else None,
        "memory_total_bytes": int(mem.total) if mem is not None else None,
        "power_w": power / 1000.0 if power is not None else None,
        "temperature_c": temp,
        "sm_clock_mhz": clock,
        "memory_busy_percent": float(util.memory) if util is not None else None,
    }
    if missing:
        extra["not_available"] = missing
    return (float(util.gpu) if util is not None else None), extra


def process_gpu_memory(gpu: int | None, pid: int | None) -> int | None:
    """Bytes NVML sees process `pid` use on `gpu`, or None (no NVML, not listed: a
    container with its own pid namespace, a driver that hides it)."""
    if gpu is None or pid is None:
        return None
    h = nvml.handle(gpu)
    if h is None:
        return None
    for fn in ("nvmlDeviceGetComputeRunningProcesses", "nvmlDeviceGetComputeRunningProcesses_v3"):
        procs = nvml.query(fn, h)
        if procs is None:
            continue
        for p in procs:
            if getattr(p, "pid", None) == pid and isinstance(getattr(p, "usedGpuMemory", None), int):
                return p.usedGpuMemory
        return None
    return None
