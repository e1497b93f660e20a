"""The app's main window for a test: its own settings file, shown, and everything it
started (a run, the prediction process) ended afterwards, whatever the test did."""

from __future__ import annotations

import os

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")

import pytest  # noqa: E402


@pytest.fixture
def window(qtbot, tmp_path):
    from paralab.gui.main_window import MainWindow
    from PySide6.QtCore import QSettings

    w = MainWindow(settings=QSettings(str(tmp_path / "settings.ini"), QSettings.Format.IniFormat))
    qtbot.addWidget(w)
    w.show()
    yield w
    w.panel.shutdown()
    w.controller.shutdown()  # a failed test must not leave a run behind
