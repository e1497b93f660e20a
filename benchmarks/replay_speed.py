"""How long a recorded run takes to replay in the app at --speed N, against its own length.

    python benchmarks/replay_speed.py RUN.jsonl [--speed 10]

Opens the main window off screen, plays the file as `paralab replay` does and prints the
recording's length (its last event's host time), the wall time of the replay and their
ratio; at --speed 10 a 60-second run should take about 6 seconds.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")

from paralab.core.compare import read_file  # noqa: E402
from paralab.gui.main_window import MainWindow  # noqa: E402
from PySide6.QtCore import QSettings  # noqa: E402
from PySide6.QtWidgets import QApplication  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("file")
    parser.add_argument("--speed", type=float, default=10.0)
    args = parser.parse_args()
    app = QApplication.instance() or QApplication([])
    settings = QSettings(os.path.join(tempfile.mkdtemp(), "s.ini"), QSettings.Format.IniFormat)
    window = MainWindow(settings=settings)
    window.show()
    events = read_file(args.file)
    began = time.monotonic()
    window.open_run(events, args.speed, os.path.basename(args.file))
    while not window.replay.at_end:
        app.processEvents()
        time.sleep(0.005)
    wall = time.monotonic() - began
    duration = window.replay.duration
    print(f"{args.file}: {len(events)} events over {duration:.1f} s recorded; "
          f"replayed at ×{args.speed:g} in {wall:.2f} s (expected {duration / args.speed:.2f} s, "
          f"ratio {duration / wall:.2f})")
    print(f"steps plotted: {len(window.data.steps)}, last step {window.data.last_step.step}")
    window.close_replay()
    window.panel.shutdown()


if __name__ == "__main__":
    main()
