"""Soak: 100 000 steps of the seed data-parallel preset through the app's own run
controller, buffers and dashboard; the app process's resident memory must grow by
<= 50 MB between the first steps and the end.

    python benchmarks/soak.py [--steps 100000] [--devices sim:2]
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")

import psutil  # noqa: E402
from paralab.core import presets  # noqa: E402
from paralab.core.run import prewarm  # noqa: E402
from paralab.gui.buffers import RunData  # noqa: E402
from paralab.gui.controller import RunController  # noqa: E402
from paralab.gui.dashboard import Dashboard  # noqa: E402
from PySide6.QtCore import QTimer  # noqa: E402
from PySide6.QtWidgets import QApplication  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=100_000)
    p.add_argument("--devices", default="sim:2")
    args = p.parse_args()
    app = QApplication([])
    prewarm()
    cfg = presets.load("seed-data-parallel").with_overrides({"devices": args.devices, "train.steps": args.steps})
    me = psutil.Process()
    data = RunData()
    dashboard = Dashboard()
    dashboard.bind(data)
    dashboard.resize(1200, 800)
    dashboard.show()
    controller = RunController()
    controller.started.connect(data.reset)
    controller.events.connect(data.add)
    samples: list[tuple[float, int, int]] = []  # (time, step, rss)
    state = {"end": None, "t0": time.perf_counter()}

    def sample() -> None:
        step = data.last_step.step if data.last_step is not None else 0
        samples.append((time.perf_counter() - state["t0"], step, me.memory_info().rss))

    timer = QTimer()
    timer.timeout.connect(sample)
    timer.start(1000)
    controller.ended.connect(lambda e: state.update(end=e))
    controller.finished.connect(app.quit)
    dashboard.start()
    controller.start(cfg)
    app.exec()
    sample()
    end = state["end"]
    warm = next(((t, s, r) for t, s, r in samples if s >= min(2000, args.steps // 10)), samples[0])
    last = samples[-1]
    print(f"run ended: {end.status if end else None} after {end.steps if end else '?'} steps "
          f"in {last[0]:.0f} s")
    print(f"app RSS at step {warm[1]}: {warm[2] / 2**20:.1f} MiB; at the end (step {last[1]}): "
          f"{last[2] / 2**20:.1f} MiB; growth {(last[2] - warm[2]) / 2**20:+.1f} MiB (target <= 50 MB)")
    peak = max(r for _, _, r in samples)
    print(f"peak RSS {peak / 2**20:.1f} MiB over {len(samples)} samples")
    controller.cleanup()


if __name__ == "__main__":
    main()
