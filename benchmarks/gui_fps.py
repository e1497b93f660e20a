"""How fast the live dashboard draws, and how long the GUI thread stalls during a run.

    QT_QPA_PLATFORM=offscreen python benchmarks/gui_fps.py [--devices 8] [--points 100000]

1. Frames per second: a Dashboard with 8 devices × 5 memory series × 100 000 points
   (plus utilization, loss and throughput at the same length).  Each frame appends one
   sample per series through RunData.add (so every curve changes and the rings wrap),
   calls Dashboard.refresh and processes events until the plots have painted.
2. Event-loop stall p99: a real run trains (ddp on sim:2 by default) through the app's
   RunController (its thread, its 50 ms batches, its ranks' lower priority), whose
   batches the GUI thread feeds into RunData; the Dashboard's own timer draws at ≤ 30 Hz
   and a 5 ms QTimer records how late each of its ticks fires.

Targets: ≥ 60 frames/s and a stall p99 ≤ 20 ms.  The loss and throughput redraw with
every frame; memory, utilization, gauges and timeline at most 10 times a second (their
samples come at a few per second), as in the app.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")

import numpy as np  # noqa: E402
from paralab.core.config import RunConfig  # noqa: E402
from paralab.core.events import CATEGORIES, MemorySample, RunStarted, StepDone, UtilizationSample  # noqa: E402
from paralab.gui.buffers import MIB, RunData  # noqa: E402
from paralab.gui.controller import RunController  # noqa: E402
from paralab.gui.dashboard import Dashboard  # noqa: E402
from PySide6.QtCore import QElapsedTimer, QEvent, QObject, QTimer  # noqa: E402
from PySide6.QtWidgets import QApplication  # noqa: E402


class PaintCounter(QObject):
    """Counts paint events of a widget: a frame counts only if the plots really painted."""

    def __init__(self) -> None:
        super().__init__()
        self.paints = 0

    def eventFilter(self, obj, event) -> bool:  # noqa: N802
        if event.type() == QEvent.Type.Paint:
            self.paints += 1
        return False


def fake_start(n: int) -> RunStarted:
    devices = [{"index": i, "label": f"sim{i}", "kind": "sim", "capacity_bytes": 24 * 2**30,
                "description": ""} for i in range(n)]
    return RunStarted("ddp", devices, RunConfig().to_dict(), n)


def walk(rng: np.random.Generator, points: int, lo: float, hi: float) -> np.ndarray:
    """A bounded random walk: jagged at every scale, like real telemetry (white noise
    would paint every pixel column from top to bottom, which no device does)."""
    return lo + (hi - lo) * (0.5 + 0.5 * np.sin(np.cumsum(rng.normal(0, 0.05, points))))


def prefill(data: RunData, points: int, rng: np.random.Generator) -> None:
    """Fill every buffer to `points` rows directly (800 000 events would only time Python)."""
    t = np.arange(points) * 0.25
    for d in data.devices:
        cats = np.column_stack([walk(rng, points, 50, 400) for _ in CATEGORIES])
        d.memory.extend(np.column_stack([t, np.cumsum(cats, axis=1)]))
        d.utilization.extend(np.column_stack([t, walk(rng, points, 0, 100)]))
    steps = np.arange(1, points + 1, dtype=float)
    rate = rng.uniform(900, 1100, points)
    data.steps.extend(np.column_stack([steps, steps * 0.01, 1.0 / np.sqrt(steps), rate, np.full(points, 0.01), rate]))
    data._bump(steps=True, memory=True, util=True)


def frame_events(k: int, n: int, points: int, rng: np.random.Generator) -> list:
    t = (points + k) * 0.25
    step = points + k
    events: list = [StepDone(step, 1.0 / np.sqrt(step), step * 0.01, 1000.0, 0.01)]
    for i in range(n):
        b = {c: int(rng.uniform(100, 300) * MIB) for c in CATEGORIES}
        events.append(MemorySample(step, i, b, sum(b.values()), 24 * 2**30, t))
        events.append(UtilizationSample(i, float(rng.uniform(0, 100)), t, "spans"))
    return events


def measure_fps(app: QApplication, n: int, points: int, seconds: float) -> tuple[float, float]:
    """(frames per second of wall time, milliseconds of this process's CPU per frame)."""
    rng = np.random.default_rng(0)
    data = RunData(step_capacity=points, memory_capacity=points, util_capacity=points)
    data.reset(fake_start(n))
    prefill(data, points, rng)
    dash = Dashboard()
    dash.resize(1600, 1000)
    dash.show()
    dash.bind(data)
    counter = PaintCounter()
    dash.plots.viewport().installEventFilter(counter)
    dash.refresh()
    app.processEvents()
    frames, k = 0, 0
    t0, cpu0 = time.perf_counter(), time.process_time()
    while time.perf_counter() - t0 < seconds:
        k += 1
        data.add(frame_events(k, n, points, rng))
        before = counter.paints
        dash.refresh()
        app.processEvents()  # the scene paints here, as a visible window would
        frames += counter.paints > before
    fps = frames / (time.perf_counter() - t0)
    cpu_ms = (time.process_time() - cpu0) * 1000 / max(frames, 1)
    dash.close()
    dash.deleteLater()
    app.processEvents()
    return fps, cpu_ms


def measure_stall(app: QApplication, mode: str, devices: str, seconds: float) -> tuple[float, float, int]:
    cfg = RunConfig().with_overrides({"mode": mode, "devices": devices, "train.steps": 1_000_000,
                                      "model.kind": "mlp", "model.width": 128, "model.depth": 2,
                                      "train.batch_size": 32})
    data = RunData()
    dash = Dashboard()
    dash.resize(1600, 1000)
    dash.show()
    dash.bind(data)
    dash.start()
    # The app's own path: RunController's thread, its 50 ms batches, its rank priority.
    controller = RunController()
    controller.started.connect(data.reset)
    controller.events.connect(data.add)

    late: list[float] = []
    clock = QElapsedTimer()
    ticker = QTimer()
    ticker.setInterval(5)
    state = {"last": None}

    def tick() -> None:
        now = clock.nsecsElapsed() / 1e6
        if state["last"] is not None:
            late.append(max(0.0, now - state["last"] - 5.0))
        state["last"] = now

    ticker.timeout.connect(tick)
    clock.start()
    ticker.start()
    controller.finished.connect(app.quit)
    controller.start(cfg)
    QTimer.singleShot(int(seconds * 1000), controller.stop)
    app.exec()
    ticker.stop()
    dash.stop()
    controller.cleanup()
    steps = data.last_step.step if data.last_step else 0
    dash.close()
    dash.deleteLater()
    app.processEvents()
    arr = np.array(late) if late else np.zeros(1)
    return float(np.percentile(arr, 99)), float(arr.max()), steps


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--devices", type=int, default=8)
    ap.add_argument("--points", type=int, default=100_000)
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--mode", default="ddp")
    ap.add_argument("--run-devices", default="sim:2")
    ap.add_argument("--run-seconds", type=float, default=8.0)
    args = ap.parse_args()
    app = QApplication.instance() or QApplication(sys.argv)
    fps, cpu_ms = measure_fps(app, args.devices, args.points, args.seconds)
    print(f"redraw: {fps:.1f} frames/s with {args.devices} devices x {len(CATEGORIES)} series x "
          f"{args.points} points (target >= 60); {cpu_ms:.1f} ms of CPU per frame "
          f"(= {1000 / cpu_ms:.0f} frames/s on an idle core)", flush=True)
    p99, worst, steps = measure_stall(app, args.mode, args.run_devices, args.run_seconds)
    print(f"event-loop stall during a {args.mode} run on {args.run_devices} ({steps} steps): "
          f"p99 {p99:.1f} ms, max {worst:.1f} ms (target p99 <= 20)", flush=True)
    ok = fps >= 60 and p99 <= 20
    return 0 if ok else 1


if __name__ == "__main__":
    code = main()
    sys.stdout.flush()
    os._exit(code)  # skip interpreter teardown: Qt objects outliving the app can crash it
