"""RunData: what the live views draw, kept in preallocated numpy buffers.

Events arrive in batches on the GUI thread (`add`); a QTimer later reads the arrays
(`Dashboard`).  Memory stays flat however long a run goes:

* per-step series (loss, throughput, lr) live in a `Compacting` table: every step is
  kept up to its capacity (100 000 rows); when it fills, neighbouring rows are merged
  into their mean and from then on each row is the mean of 2, 4, 8 … consecutive steps.
  The whole run stays on screen at a resolution that halves each time the run doubles.
* sampled series (memory by category, utilization, phase spans) live in `Ring`s: the
  most recent N samples (memory, utilization: 32 768 each ≈ 2 h at 4 Hz; spans: 4 096
  per device, a few dozen sampled steps).  Past 8 devices the rings shrink in
  proportion, so 64 devices take what 8 do (about 35 MiB in all).

Arrays are float64 and stored column by column, so a plotted column is a contiguous
slice handed to `setData` without a copy.
"""

from __future__ import annotations

import re

import numpy as np

from ..core.events import (
    CATEGORIES,
    PHASES,
    MemorySample,
    PhaseSpan,
    RunEnded,
    RunStarted,
    StepDone,
    UtilizationSample,
)

MIB = float(2**20)
RATE_SMOOTHING = 0.1
"""Weight of the newest step in the smoothed step time (about the last 20 steps count)."""
PHASE_INDEX = {p: i for i, p in enumerate(PHASES)}
END_LABELS = {"ok": "finished", "stopped": "stopped", "oom": "out of memory", "error": "rank failed"}


class Ring:
    """The last `capacity` rows of a float64 table.

    Each row is written twice, at i and at i + capacity, so the rows in order are always
    one contiguous slice of the doubled array: reading never copies, whatever the wrap."""

    def __init__(self, capacity: int, columns: int) -> None:
        self.capacity = int(capacity)
        self._buf = np.zeros((columns, 2 * self.capacity))
        self.count = 0
        """Rows ever appended (not bounded)."""

    def __len__(self) -> int:
        return min(self.count, self.capacity)

    def clear(self) -> None:
        self.count = 0

    def extend(self, rows: np.ndarray) -> None:
        """Append rows (shape: n × columns); only the last `capacity` of them can stay."""
        rows = np.asarray(rows, dtype=np.float64)
        if rows.ndim == 1:
            rows = rows[np.newaxis]
        n = len(rows)
        if n == 0:
            return
        skip = max(0, n - self.capacity)
        pos = (self.count + skip + np.arange(n - skip)) % self.capacity
        self._buf[:, pos] = rows[skip:].T
        self._buf[:, pos + self.capacity] = rows[skip:].T
        self.count += n

    def column(self, index: int) -> np.ndarray:
        """The column's rows, oldest first: a view, valid until the next `extend`."""
        return self.columns(index, index + 1)[0]

    def columns(self, first: int, stop: int) -> np.ndarray:
        """Columns first..stop-1 as one (k, rows) view."""
        n = len(self)
        start = self.count % self.capacity if self.count > self.capacity else 0
        return self._buf[first:stop, start:start + n]

    def last(self, index: int, default: float = float("nan")) -> float:
        col = self.column(index)
        return float(col[-1]) if len(col) else default


class Compacting:
    """All rows of a float64 table in at most `capacity` rows: when full, each pair of
    neighbouring rows becomes their mean and `stride` (appended rows per stored row) doubles."""

    def __init__(self, capacity: int, columns: int) -> None:
        self.capacity = max(2, int(capacity) // 2 * 2)
        self._buf = np.zeros((columns, self.capacity))
        self.size = 0
        self.stride = 1
        self.count = 0
        self._pending = np.zeros(columns)
        self._pending_n = 0

    def __len__(self) -> int:
        return self.size

    def clear(self) -> None:
        self.size, self.stride, self.count, self._pending_n = 0, 1, 0, 0
        self._pending[:] = 0.0

    def extend(self, rows: np.ndarray) -> None:
        rows = np.asarray(rows, dtype=np.float64)
        if rows.ndim == 1:
            rows = rows[np.newaxis]
        n = len(rows)
        if self.stride == 1 and self.size + n <= self.capacity:  # the usual case: one copy
            self._buf[:, self.size:self.size + n] = rows.T
            self.size += n
            self.count += n
            return
        for row in rows:
            self.count += 1
            self._pending += row
            self._pending_n += 1
            if self._pending_n < self.stride:
                continue
            mean = self._pending / self.stride
            self._pending[:] = 0.0
            self._pending_n = 0
            if self.size < self.capacity:
                self._buf[:, self.size] = mean
                self.size += 1
                continue
            half = self.capacity // 2
            self._buf[:, :half] = 0.5 * (self._buf[:, 0::2] + self._buf[:, 1::2])
            self.size = half
            self.stride *= 2
            # The row that did not fit holds half a bin at the new stride.
            self._pending += mean * (self.stride // 2)
            self._pending_n = self.stride // 2

    def column(self, index: int) -> np.ndarray:
        return self._buf[index, :self.size]


class DeviceSeries:
    """One device's memory, utilization and spans."""

    def __init__(self, info: dict, memory_capacity: int, util_capacity: int, span_capacity: int) -> None:
        self.index = int(info.get("index", 0))
        self.label = str(info.get("label", f"device {self.index}"))
        self.kind = str(info.get("kind", ""))
        self.capacity_bytes = int(info.get("capacity_bytes", 0))
        self.memory = Ring(memory_capacity, 1 + len(CATEGORIES))
        """time_s, then the running sum of the categories in MiB (the stacked curves' tops)."""
        self.peak_bytes = 0
        self.last: MemorySample | None = None
        self.previous: MemorySample | None = None
        self.utilization = Ring(util_capacity, 2)
        """time_s, percent (samples without a value are not stored)."""
        self.util_source = ""
        self.util_percent: float | None = None
        self.util_extra: dict = {}
        """The last sample's figures (modelled: mfu, overlap, comm_bytes, busbw_gbs...)."""
        self.spans = Ring(span_capacity, 4)
        """start_s, end_s, phase index (core.events.PHASES), step."""
        # The other clock's spans and utilization (a simulated device sends the host's and
        # the modelled GPU's): kept so that the view can switch to them.
        self.other_spans = Ring(span_capacity, 4)
        self.other_utilization = Ring(util_capacity, 2)

    @property
    def used_bytes(self) -> int:
        return sum(self.last.bytes.values()) if self.last else 0


class RunData:
    """Live buffers of one run, fed with events on the GUI thread.

    `version` grows on every change; the per-view counters (`steps_version`,
    `memory_version`, `util_version`, `span_version`, `end_version`) let a view skip
    the work when its own data did not move."""

    def __init__(self, step_capacity: int = 100_000, memory_capacity: int = 32_768,
                 util_capacity: int = 32_768, span_capacity: int = 4_096) -> None:
        self._caps = (memory_capacity, util_capacity, span_capacity)
        self.steps = Compacting(step_capacity, 6)
        """step, time_s, loss, samples_per_s, lr, smoothed samples_per_s."""
        self.marks: list[tuple[int, float, str, str]] = []
        """(step, time_s, kind, label): paused, learning rate changed, ended (plot markers)."""
        self._step_time = 0.0  # smoothed seconds per sample (the rate's inverse), bias-corrected below
        self._step_weight = 0.0
        self._inverse_sum = 0.0  # sum of 1/rate over every step: the run's average rate
        self._rate_steps = 0
        self._last_lr: float | None = None
        self.devices: list[DeviceSeries] = []
        self.start: RunStarted | None = None
        self.clock = "host"
        self.viewing_host = False
        """True while the view shows the host's measured time for a modelled run."""
        self.end: RunEnded | None = None
        self.last_step: StepDone | None = None
        self.loss_finite = True
        """False once a non-finite loss (a diverged run) has been seen."""
        self.ignored = 0
        """Events about devices the start did not name (counted, not drawn)."""
        self.version = 0
        self.steps_version = self.memory_version = self.util_version = 0
        self.span_version = self.end_version = 0

    # ---- what the run is ------------------------------------------------------------------------

    @property
    def mode(self) -> str:
        return self.start.mode if self.start else ""

    @property
    def config(self) -> dict:
        return self.start.config if self.start else {}

    @property
    def tokens_per_sample(self) -> int:
        """A transformer's sample is a sequence: its tokens; 0 for the other models."""
        model = self.config.get("model", {})
        return int(model.get("seq_len", 0)) if model.get("kind") == "transformer" else 0

    @property
    def labels(self) -> list[str]:
        return [d.label for d in self.devices]

    # ---- feeding --------------------------------------------------------------------------------

    def reset(self, start: RunStarted | None = None) -> None:
        """Forget the previous run; `start` names the devices of the next (None: empty)."""
        self.start = start
        self.clock = "modelled" if start is not None and start.clock != "host" else "host"
        """The run's clock: its spans and utilization are shown unless `viewing_host`."""
        self.viewing_host = False
        self.end = None
        self.last_step = None
        self.loss_finite = True
        self.ignored = 0
        self.steps.clear()
        self.marks = []
        self._step_time = self._step_weight = self._inverse_sum = 0.0
        self._rate_steps = 0
        self._last_lr = None
        infos = start.devices if start else []
        if len(infos) == len(self.devices) and all(
                d.capacity_bytes == int(i.get("capacity_bytes", 0)) for d, i in zip(self.devices, infos)):
            for d, info in zip(self.devices, infos):  # same layout: reuse the arrays
                self._clear_device(d, info)
        else:
            caps = [max(1024, c * 8 // len(infos)) if len(infos) > 8 else c for c in self._caps]
            self.devices = [DeviceSeries(info, *caps) for info in infos]
        self._bump(steps=True, memory=True, util=True, spans=True, end=True)

    @staticmethod
    def _clear_device(d: DeviceSeries, info: dict) -> None:
        d.label = str(info.get("label", d.label))
        d.kind = str(info.get("kind", d.kind))
        d.memory.clear()
        d.utilization.clear()
        d.spans.clear()
        d.other_spans.clear()
        d.other_utilization.clear()
        d.peak_bytes, d.last, d.previous = 0, None, None
        d.util_source, d.util_percent, d.util_extra = "", None, {}

    def add(self, events: list) -> None:
        """Take a batch of events (any kinds, in order)."""
        steps: list[tuple] = []
        changed = dict.fromkeys(("steps", "memory", "util", "spans", "end"), False)
        for e in events:
            if isinstance(e, StepDone):
                # Plots share the host's time axis; the rate is in the run's clock.
                t = e.time_s if e.host_s is None else e.host_s
                if self._last_lr is not None and e.lr != self._last_lr:
                    self.marks.append((e.step, t, "lr", f"lr {e.lr:g}"))
                self._last_lr = e.lr
                steps.append((e.step, t, e.loss, e.samples_per_s, e.lr, self._smooth(e.samples_per_s)))
                self.last_step = e
            elif isinstance(e, MemorySample):
                changed["memory"] |= self._memory(e)
            elif isinstance(e, UtilizationSample):
                changed["util"] |= self._utilization(e)
            elif isinstance(e, PhaseSpan):
                changed["spans"] |= self._span(e)
            elif isinstance(e, RunEnded):
                self.end = e
                changed["end"] = True
                if self.last_step is not None or e.status in ("oom", "error"):
                    self.mark(e.status, END_LABELS.get(e.status, e.status))
            elif isinstance(e, RunStarted):
                if steps:
                    self._steps(steps)
                    steps = []
                self.reset(e)
        if steps:
            self._steps(steps)
            changed["steps"] = True
        if any(changed.values()):
            self._bump(**changed)

    def mark(self, kind: str, label: str) -> None:
        """A marker at the last step (pause, lr, ended), drawn on the step and time plots."""
        last = self.last_step
        step = last.step if last else 0
        t = (last.time_s if last.host_s is None else last.host_s) if last else 0.0
        self.marks.append((step, t, kind, label))
        self._bump(steps=True)

    def _smooth(self, rate: float) -> float:
        """The rate from an exponentially smoothed time per sample: a slow step weighs
        as much as it took, and one fast or slow step does not swing the figure."""
        if not rate > 0 or not np.isfinite(rate):
            return float("nan") if self._step_weight == 0 else 1.0 / (self._step_time / self._step_weight)
        inverse = 1.0 / rate
        self._inverse_sum += inverse
        self._rate_steps += 1
        self._step_time = (1 - RATE_SMOOTHING) * self._step_time + RATE_SMOOTHING * inverse
        self._step_weight = (1 - RATE_SMOOTHING) * self._step_weight + RATE_SMOOTHING
        return self._step_weight / self._step_time

    @property
    def smoothed_rate(self) -> float | None:
        return self._step_weight / self._step_time if self._step_time > 0 else None

    @property
    def average_rate(self) -> float | None:
        """The run's samples/s: all its samples over all its steps' time (pauses excluded)."""
        return self._rate_steps / self._inverse_sum if self._inverse_sum > 0 else None

    def _steps(self, rows: list[tuple]) -> None:
        arr = np.array(rows, dtype=np.float64)
        if self.loss_finite and not np.isfinite(arr[:, 2]).all():
            self.loss_finite = False
        self.steps.extend(arr)

    def _device(self, index: int) -> DeviceSeries | None:
        if 0 <= index < len(self.devices):
            return self.devices[index]
        self.ignored += 1
        return None

    def _memory(self, e: MemorySample) -> bool:
        d = self._device(e.device)
        if d is None:
            return False
        row = np.empty(1 + len(CATEGORIES))
        row[0] = e.time_s
        row[1:] = np.cumsum([e.bytes.get(c, 0) for c in CATEGORIES]) / MIB
        d.memory.extend(row)
        d.previous, d.last = d.last, e
        d.peak_bytes = max(d.peak_bytes, int(e.peak_bytes))
        if e.capacity_bytes:
            d.capacity_bytes = int(e.capacity_bytes)
        return True

    def _utilization(self, e: UtilizationSample) -> bool:
        d = self._device(e.device)
        if d is None:
            return False
        if e.source == "modelled":
            d.util_extra = dict(e.extra)
        # A modelled device's busy share is its compute stream's; the CPU's is the host view's.
        clock = "modelled" if e.source == "modelled" else "host"
        if clock != self.shown_clock:
            if e.percent is not None:
                d.other_utilization.extend((e.time_s, e.percent))
            return False
        d.util_source = e.source
        d.util_percent = e.percent
        if e.percent is not None:
            d.utilization.extend((e.time_s, e.percent))
        return True

    @property
    def shown_clock(self) -> str:
        return "host" if self.viewing_host else self.clock

    def view_host_time(self, host: bool) -> None:
        """Show the host's measured spans and utilization instead of the modelled ones (or
        back); a run in host time has nothing else to show."""
        if self.clock == "host" or host == self.viewing_host:
            return
        self.viewing_host = host
        for d in self.devices:
            d.spans, d.other_spans = d.other_spans, d.spans
            d.utilization, d.other_utilization = d.other_utilization, d.utilization
            d.util_source = "spans" if host else "modelled"
            d.util_percent = d.utilization.last(1) if len(d.utilization) else None
        self._bump(util=True, spans=True)

    def _span(self, e: PhaseSpan) -> bool:
        d = self._device(e.device)
        if d is None or e.phase not in PHASE_INDEX:
            return False
        row = (e.start_s, e.end_s, PHASE_INDEX[e.phase], e.step)
        if e.clock != self.shown_clock:  # a simulated device sends both clocks' spans
            d.other_spans.extend(row)
            return False
        d.spans.extend(row)
        return True

    def _bump(self, steps=False, memory=False, util=False, spans=False, end=False) -> None:
        self.version += 1
        self.steps_version += steps
        self.memory_version += memory
        self.util_version += util
        self.span_version += spans
        self.end_version += end

    # ---- reading --------------------------------------------------------------------------------

    def overflow(self) -> tuple[int, str | None] | None:
        """(device, category that overflowed or None) when the run ended out of memory."""
        end = self.end
        if end is None or end.status != "oom":
            return None
        device = end.device if end.device is not None else 0
        return device, overflow_category(end, self.devices[device] if device < len(self.devices) else None)


def overflow_category(end: RunEnded, device: DeviceSeries | None) -> str | None:
    """Which category pushed the device over: named in the message of a simulated device's
    out-of-memory ("… forward: activations pushed it to …"); otherwise the category that
    grew most between the device's last two memory samples (CUDA messages do not say)."""
    m = re.search(r"(\w+) pushed it", end.message or "")
    if m and m.group(1) in CATEGORIES:
        return m.group(1)
    if device is None or device.last is None:
        return None
    now = device.last.bytes
    before = device.previous.bytes if device.previous else {}
    growth = {c: now.get(c, 0) - before.get(c, 0) for c in CATEGORIES}
    best = max(growth, key=growth.get)
    return best if growth[best] > 0 else None
