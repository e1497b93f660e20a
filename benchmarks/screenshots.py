"""Screenshots of the app as a new user meets it, under a real X server (Xvfb):

    xvfb-run -s "-screen 0 1920x1080x24" python benchmarks/screenshots.py OUT_DIR

first open; 2, 8 and 32 devices at 1280×720 and 1920×1080 (the layouts, fed with
synthetic events: 32 rank processes would not fit a small machine); a real run with a
pause and a learning-rate change; an out-of-memory; and a new run after it; then the same
model run again as FSDP with the last run as a ghost, Compare runs… on the session, and a
replay of the first run paused halfway.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

from paralab.core import presets
from paralab.core.events import (
    CATEGORIES,
    MemorySample,
    PhaseSpan,
    RunStarted,
    StepDone,
    UtilizationSample,
)
from paralab.core.run import prewarm
from PySide6.QtCore import QSettings
from PySide6.QtWidgets import QApplication

MIB = 2**20


def wait(app: QApplication, until, timeout_s: float) -> bool:
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        app.processEvents()
        if until():
            return True
        time.sleep(0.02)
    return False


def shoot(app: QApplication, window, path: Path) -> None:
    for _ in range(10):
        app.processEvents()
        time.sleep(0.03)
    window.dashboard.refresh(force=True)
    app.processEvents()
    # The whole X screen cut to the window, as `import -window root` would see it.
    g = window.frameGeometry()
    window.screen().grabWindow(0, g.x(), g.y(), g.width(), g.height()).save(str(path))
    print("wrote", path, f"{g.width()}x{g.height()}", flush=True)


def synthetic(n: int, steps: int = 120) -> list:
    devices = [{"index": i, "label": f"sim{i}", "kind": "sim", "capacity_bytes": 512 * MIB, "description": ""}
               for i in range(n)]
    events: list = [RunStarted("ddp", devices, {"train": {"micro_batches": 1}}, n)]
    for s in range(1, steps + 1):
        t = s * 0.05
        events.append(StepDone(s, 2.0 / (1 + 0.05 * s), t, 400.0 + 30 * ((s * 7) % 5), 1e-4))
        if s % 4 == 0:
            for d in range(n):
                b = dict.fromkeys(CATEGORIES, 0)
                b.update(params=60 * MIB, grads=60 * MIB, optimizer=120 * MIB, activations=(20 + (s + d) % 30) * MIB,
                         temporaries=8 * MIB, other=4 * MIB)
                events.append(MemorySample(s, d, b, sum(b.values()), 512 * MIB, t))
                events.append(UtilizationSample(d, 60.0 + (s + 3 * d) % 30, t, "spans"))
        if s % 20 == 0:
            for d in range(n):
                base = t - 0.04
                for k, phase in enumerate(("forward", "backward", "communication", "optimizer")):
                    events.append(PhaseSpan(d, phase, base + 0.01 * k, base + 0.01 * k + 0.008, s))
    return events


def recordings(app: QApplication, w, out: Path) -> None:
    """Run again with a change (the ghost), Compare runs…, a replay scrubbed to its middle."""
    w.stop_run()
    wait(app, lambda: not w.controller.running, 60)
    w.panel.set_config(presets.load("mlp-ddp").with_overrides({"mode": "fsdp", "train.steps": 150}))
    wait(app, lambda: w.again_action.isEnabled(), 30)
    w.again_action.trigger()
    wait(app, lambda: not w.controller.running and w.data.end is not None, 180)
    shoot(app, w, out / "08-run-again-with-ghost-1280x720.png")
    w.open_compare()
    dialog = w.compare_dialog
    dialog.move(0, 0)
    wait(app, lambda: False, 1)
    g = dialog.frameGeometry()
    dialog.screen().grabWindow(0, g.x(), g.y(), g.width(), g.height()).save(str(out / "09-compare-runs.png"))
    print("wrote", out / "09-compare-runs.png", flush=True)
    dialog.close()
    first = w.session_runs[0]
    w.open_run(first.all_events(), speed=10, name="the first run")
    w.replay.pause()
    w.replay.seek(w.replay.duration / 2)
    shoot(app, w, out / "10-replay-halfway-1280x720.png")
    w.close_replay()


def main() -> int:
    out = Path(sys.argv[1] if len(sys.argv) > 1 else "screenshots")
    out.mkdir(parents=True, exist_ok=True)
    prewarm()
    app = QApplication(sys.argv[:1])
    from paralab.gui.main_window import MainWindow

    settings = QSettings(str(Path(tempfile.mkdtemp()) / "s.ini"), QSettings.Format.IniFormat)
    w = MainWindow(settings=settings)
    w.move(0, 0)
    w.resize(1280, 720)
    w.show()
    wait(app, lambda: w.panel.estimate is not None, 60)
    shoot(app, w, out / "01-first-open-1280x720.png")

    w.show_dashboard()
    for size in ((1280, 720), (1920, 1080)):
        for n in (2, 8, 32):
            w.resize(*size)
            w.data.reset(None)
            w.dashboard.clear()
            w.data.add(synthetic(n))
            shoot(app, w, out / f"02-devices-{n}-{size[0]}x{size[1]}.png")
    w.resize(1280, 720)

    # A real run: paused, then the learning rate changed.
    w.panel.set_config(presets.load("mlp-ddp").with_overrides({"train.steps": 100000}))
    wait(app, lambda: w.start_action.isEnabled(), 30)
    w.start_run()
    wait(app, lambda: w.data.last_step is not None and w.data.last_step.step >= 30, 180)
    w.pause_run()
    wait(app, lambda: False, 3)
    w.resume_run()
    wait(app, lambda: w.data.last_step.step >= 60, 120)
    w.lr_box.setValue(3e-5)
    wait(app, lambda: w.data.last_step.step >= 110, 120)
    shoot(app, w, out / "03-run-pause-and-lr-1280x720.png")
    w.stop_run()
    wait(app, lambda: not w.controller.running, 60)
    shoot(app, w, out / "04-run-stopped-1280x720.png")

    # An out-of-memory, then a new run after it.
    w.load_preset("out-of-memory")
    wait(app, lambda: w.panel.estimate is not None, 60)
    w.start_run()
    wait(app, lambda: not w.controller.running, 180)
    shoot(app, w, out / "05-out-of-memory-1280x720.png")
    w.panel.set_config(presets.load("mlp-ddp").with_overrides({"train.steps": 100000}))
    wait(app, lambda: w.start_action.isEnabled(), 30)
    w.start_run()
    wait(app, lambda: False, 0.5)
    shoot(app, w, out / "06-new-run-starting-1280x720.png")
    wait(app, lambda: w.data.last_step is not None and w.data.last_step.step >= 40, 180)
    shoot(app, w, out / "07-new-run-after-oom-1280x720.png")
    recordings(app, w, out)
    w.close()
    wait(app, lambda: not w.controller.running and not w.isVisible(), 60)
    return 0


if __name__ == "__main__":
    sys.exit(main())
