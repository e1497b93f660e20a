"""Python's cyclic garbage is collected on the GUI thread only.

The app runs Python in other threads too: the run's QThread and the prediction's worker.
Python's collector runs in whichever thread happens to allocate past its threshold, and a
widget caught in a reference cycle would then be destroyed off the GUI thread.  Qt's
destructor takes locks the GUI thread may hold while it waits for the interpreter lock,
held by the collecting thread: both stop for good (seen: the prediction's thread
collecting a closed window's widget while the GUI thread ran an event filter).  So
automatic collection is turned off and the GUI thread collects on a timer instead, by
the same thresholds the interpreter uses (the recipe of Camelot's GarbageCollector).
"""

from __future__ import annotations

import gc

from PySide6.QtCore import QCoreApplication, QObject, QTimer

INTERVAL_MS = 250

_installed: QObject | None = None


class _Collector(QObject):
    def __init__(self, app: QCoreApplication) -> None:
        super().__init__(app)
        self.threshold = gc.get_threshold()
        gc.disable()
        self.timer = QTimer(self)
        self.timer.setInterval(INTERVAL_MS)
        self.timer.timeout.connect(self.check)
        self.timer.start()

    def check(self) -> None:
        counts = gc.get_count()
        if counts[0] <= self.threshold[0]:
            return
        generation = 2 if counts[2] > self.threshold[2] else 1 if counts[1] > self.threshold[1] else 0
        gc.collect(generation)


def install() -> None:
    """Collect on the GUI thread from now on (once per application; a no-op without one).
    Whatever starts a Python thread in the app's process calls it first."""
    global _installed
    app = QCoreApplication.instance()
    if app is None:
        return
    try:
        if _installed is not None and _installed.parent() == app:
            return
    except RuntimeError:  # its application is gone (a new one was made)
        pass
    _installed = _Collector(app)
