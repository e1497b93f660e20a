"""Cyclic garbage in the app's process is collected on the GUI thread, never in a worker
thread (where destroying a widget can deadlock with the GUI thread: gui/collector.py)."""

from __future__ import annotations

import gc
import threading
import weakref

from paralab.gui import collector
from PySide6.QtWidgets import QWidget


def test_a_widget_in_a_cycle_is_destroyed_on_the_gui_thread_not_by_a_worker(qtbot):
    collector.install()
    assert not gc.isenabled()
    where: list[str] = []
    widget = QWidget()
    widget.cycle = widget  # a reference cycle: only the cyclic collector can free it
    weakref.finalize(widget, lambda: where.append(threading.current_thread().name))
    del widget

    kept: list[list] = []

    def allocate() -> None:  # containers kept alive: far past the collector's thresholds
        kept.extend([i] for i in range(50_000))

    worker = threading.Thread(target=allocate, name="worker")
    worker.start()
    worker.join()
    assert where == []  # the worker allocated, and did not collect
    qtbot.waitUntil(lambda: where == [threading.main_thread().name], timeout=5_000)
