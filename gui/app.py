"""The desktop app: `paralab gui [--preset NAME | --config FILE | --lesson NAME] [--start]`.

SIGINT and SIGTERM close the window the way the close button does: the run is stopped,
every rank ends, then the app quits with 128 + the signal number.  Python runs signal
handlers only between bytecodes, so a slow no-op timer hands it control while Qt's
event loop waits.
"""

from __future__ import annotations

import signal
import sys

from PySide6.QtCore import QTimer
from PySide6.QtWidgets import QApplication

from ..core.config import RunConfig
from ..core.lessons import Lesson
from ..core.run import prewarm
from .main_window import MainWindow


def main(cfg: RunConfig | None = None, start: bool = False, replay: tuple[list, float, str] | None = None,
         session: str | None = None, lesson: Lesson | None = None) -> int:
    """Open the app; `replay` = (events, speed, name) plays a recording at once, `session`
    opens a session file (its settings, and its recorded run when it has one), `lesson`
    opens a lesson at its first step."""
    from .syscheck import report

    problem = report()  # Qt's own message for a missing X11 library names the wrong one
    if problem:
        print(problem, file=sys.stderr)
        return 1
    # Ranks fork from a forkserver that imports torch once; start it while the window opens,
    # so Start is a fork away (benchmarks/startup.py).
    prewarm()
    app = QApplication.instance() or QApplication(sys.argv[:1])
    app.setOrganizationName("paralab")
    app.setApplicationName("paralab")
    window = MainWindow(cfg)
    window.show()
    if lesson is not None:
        window.lessons.open(lesson)  # its first step's settings, before --start runs them
    if start:
        QTimer.singleShot(0, window.start_run)
    if session is not None:
        QTimer.singleShot(0, lambda: window.open_session(session))
    if replay is not None:
        QTimer.singleShot(0, lambda: window.open_run(replay[0], replay[1], replay[2]))

    received: list[int] = []

    def on_signal(signum: int, _frame: object) -> None:
        received.append(signum)
        # The first signal closes as the close button does; a second one does not wait
        # for the ranks to stop by themselves.
        QTimer.singleShot(0, window.close if len(received) == 1 else window.force_close)

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    wake = QTimer()
    wake.timeout.connect(lambda: None)
    wake.start(200)
    try:
        code = app.exec()
    finally:
        wake.stop()
        for s, handler in previous.items():
            signal.signal(s, handler)
        window.controller.shutdown()  # normally a no-op: closing already ended the run
        window.controller.cleanup()
    return 128 + received[0] if received else code
