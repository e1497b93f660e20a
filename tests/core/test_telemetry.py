"""Telemetry: NVML missing or half there never raises, simulated devices report how busy
they are during a run, and the sampler ends with the run."""

import sys
import threading
import types

import pytest
from paralab.core import nvml
from paralab.core.devices import Device
from paralab.core.events import MemorySample, PhaseSpan, RunEnded, StepDone, UtilizationSample
from paralab.core.telemetry import (
    UTILIZATION_EXPLAINED,
    BusyMeter,
    Sampler,
    gpu_reading,
    process_gpu_memory,
)

from tests.helpers import ended, run_events

GPU = Device(0, "cuda", 80 * 2**30, gpu=0)


@pytest.fixture
def fresh_nvml():
    nvml.reset_for_tests()
    yield
    nvml.reset_for_tests()


def fake_pynvml(monkeypatch, broken=(), init_fails=False, procs=()):
    """A pynvml whose functions in `broken` raise, as a driver without them does."""
    mod = types.ModuleType("pynvml")

    class NVMLError(Exception):
        pass

    def fn(name, value):
        def call(*args):
            if name in broken:
                raise NVMLError(f"{name}: Not Supported")
            return value
        return call

    def init():
        if init_fails:
            raise NVMLError("Driver Not Loaded")

    mod.nvmlInit = init
    mod.nvmlDeviceGetCount = fn("count", 1)
    mod.nvmlDeviceGetHandleByIndex = fn("handle", "h0")
    mod.nvmlDeviceGetUtilizationRates = fn("util", types.SimpleNamespace(gpu=87, memory=40))
    mod.nvmlDeviceGetMemoryInfo = fn("mem", types.SimpleNamespace(used=30 * 2**30, total=80 * 2**30))
    mod.nvmlDeviceGetPowerUsage = fn("power", 312_000)
    mod.nvmlDeviceGetTemperature = fn("temp", 64)
    mod.nvmlDeviceGetClockInfo = fn("clock", 1980)
    mod.nvmlDeviceGetComputeRunningProcesses = fn("procs", list(procs))
    mod.nvmlDeviceGetName = fn("name", "H100")
    monkeypatch.setitem(sys.modules, "pynvml", mod)
    return mod


def test_without_pynvml_a_gpu_reads_as_not_available(monkeypatch, fresh_nvml):
    monkeypatch.setitem(sys.modules, "pynvml", None)  # import pynvml raises ImportError
    percent, extra = gpu_reading(0)
    assert percent is None and extra["memory_used_bytes"] is None
    assert "nvidia-ml-py package is not installed" in extra["not_available"]["percent"]
    assert process_gpu_memory(0, 1234) is None
    sampler = Sampler([GPU], lambda: [], 0.0)
    [sample] = sampler.sample()
    assert sample.device == 0 and sample.source == "nvml" and sample.percent is None
    assert set(sample.extra["not_available"]) >= {"percent", "power_w", "temperature_c", "sm_clock_mhz"}


def test_a_driver_that_fails_to_start_is_a_reason_not_an_exception(monkeypatch, fresh_nvml):
    fake_pynvml(monkeypatch, init_fails=True)
    percent, extra = gpu_reading(0)
    assert percent is None and "Driver Not Loaded" in extra["not_available"]["percent"]
    assert nvml.list_gpus() == []


def test_nvml_reports_what_exists_and_names_what_does_not(monkeypatch, fresh_nvml):
    fake_pynvml(monkeypatch, broken={"power", "clock"})
    percent, extra = gpu_reading(0)
    assert percent == 87.0
    assert extra["memory_used_bytes"] == 30 * 2**30 and extra["memory_total_bytes"] == 80 * 2**30
    assert extra["temperature_c"] == 64 and extra["memory_busy_percent"] == 40.0
    assert extra["power_w"] is None and extra["sm_clock_mhz"] is None
    assert set(extra["not_available"]) == {"power_w", "sm_clock_mhz"}
    fake_pynvml(monkeypatch)
    nvml.reset_for_tests()
    percent, extra = gpu_reading(0)
    assert extra["power_w"] == 312.0 and extra["sm_clock_mhz"] == 1980 and "not_available" not in extra


def test_non_torch_is_what_nvml_sees_the_rank_use_beyond_the_allocator(monkeypatch, fresh_nvml):
    fake_pynvml(monkeypatch, procs=[types.SimpleNamespace(pid=4321, usedGpuMemory=5 * 2**30)])
    sampler = Sampler([GPU], lambda: [4321], 0.0)
    sample = MemorySample(1, 0, {}, 0, GPU.capacity_bytes, extra={"reserved": 4 * 2**30, "allocated": 3 * 2**30})
    sampler.observe([sample])
    assert sample.extra["non_torch"] == 2**30 and sample.extra["nvml_used"] == 5 * 2**30
    # Not listed (another pid namespace): a whole GPU falls back to its total use.
    elsewhere = Sampler([GPU], lambda: [999], 0.0)
    sample = MemorySample(1, 0, {}, 0, GPU.capacity_bytes, extra={"reserved": 4 * 2**30, "allocated": 0})
    elsewhere.observe([sample])
    assert sample.extra["non_torch"] == 26 * 2**30


def test_busy_is_each_devices_share_of_the_step_spent_computing():
    meter = BusyMeter(window_s=1.0)
    assert meter.fractions(0.0) == {}
    # Step 3: device 0 computes for 1 s, waits 1 s (idle) while device 1 computes.
    for span in (PhaseSpan(0, "forward", 0.0, 1.0, 3), PhaseSpan(0, "idle", 1.0, 2.0, 3),
                 PhaseSpan(1, "forward", 1.0, 1.5, 3), PhaseSpan(1, "communication", 1.5, 2.0, 3)):
        meter.add(span, arrived=10.0)
    assert meter.fractions(10.5) == {0: pytest.approx(0.5), 1: pytest.approx(0.25)}
    assert meter.fractions(11.5) == {0: pytest.approx(0.5), 1: pytest.approx(0.25)}  # held a while
    assert meter.fractions(14.0) == {0: 0.0, 1: 0.0}  # no step for long: paused, nothing computes


def test_merge_keeps_the_end_last():
    sampler = Sampler([Device(0, "sim", 2**30)], lambda: [], 0.0)
    sampler.queue.put(UtilizationSample(0, 50.0))
    batch = [StepDone(1, 0.5, 0.1, 10.0), RunEnded("ok")]
    merged = sampler.merge(batch)
    assert isinstance(merged[-1], RunEnded) and isinstance(merged[-2], UtilizationSample)
    assert sampler.merge([StepDone(2, 0.4, 0.2, 10.0)]) == [StepDone(2, 0.4, 0.2, 10.0)]


def test_simulated_devices_report_busy_and_cpu_during_a_run(no_leftover_ranks):
    events = run_events(mode="ddp", devices="sim:2", train__steps=400, telemetry__interval_s=0.05,
                        model__width=64, model__depth=2)
    assert ended(events).status == "ok"
    samples = [e for e in events if isinstance(e, UtilizationSample)]
    assert {s.source for s in samples} == {"spans", "modelled"}
    for source in ("spans", "modelled"):  # the host's busy share, and the modelled GPU's
        busy = [s.percent for s in samples if s.source == source and s.percent is not None]
        assert {s.device for s in samples if s.source == source} == {0, 1}
        assert busy and all(0.0 <= p <= 100.0 for p in busy), source
        assert max(busy) > 10.0, source  # training computes most of each step
    samples = [s for s in samples if s.source == "spans"]
    assert all("cpu_percent" in s.extra for s in samples)
    cpu = [s.extra["cpu_percent"] for s in samples if s.extra["cpu_percent"] is not None]
    assert cpu and max(cpu) > 0.0
    assert not any(t.name == "paralab-telemetry" and t.is_alive() for t in threading.enumerate())


def test_the_explanation_says_what_nvml_utilization_is():
    assert "kernel" in UTILIZATION_EXPLAINED and "not how busy" in UTILIZATION_EXPLAINED
