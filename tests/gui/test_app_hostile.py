"""Issue 14 in the app: Open shows a sentence for any file, Save writes what Open reads back
(and what the app remembers), and a disk that fills mid-run ends the run with every rank
stopped and the next run working."""

import os

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")

import pytest  # noqa: E402
from paralab.core.config import RunConfig  # noqa: E402
from paralab.gui.main_window import MainWindow  # noqa: E402
from PySide6.QtCore import QSettings  # noqa: E402

from tests.core.test_hardening import _disk_fills_after  # noqa: E402
from tests.core.test_hostile import _files  # noqa: E402
from tests.gui.test_app import alive, fill  # noqa: E402

START_S = 120


def test_open_shows_a_sentence_for_every_hostile_file(window, tmp_path):
    w = window
    before = w.panel.config()
    (tmp_path / "f").mkdir()
    files = _files(str(tmp_path / "f"))
    refused = 0
    for name, path in files.items():
        opened = w.open_config(path)
        if opened:  # it reads as TOML: the form names what is wrong with it
            assert w.panel.problems(), name
            w.panel.set_config(before)
        else:
            text = w.banner.text()
            assert text.startswith("Bad config: ") and "\n" not in text and len(text) < 1200, (name, text)
        refused += 1
    print(f"app Open: {len(files)} hostile files tried, {refused} refused with a sentence")


def test_save_writes_what_open_and_the_next_start_read(qtbot, tmp_path):
    settings = QSettings(str(tmp_path / "settings.ini"), QSettings.Format.IniFormat)
    w = MainWindow(settings=settings)
    qtbot.addWidget(w)
    cfg = w.panel.config().with_overrides({"name": "bell\x07 tab\t quote\" nul-ish\x1f"})
    w.panel.set_config(cfg)
    assert w.save_config(tmp_path / "odd.toml")
    assert RunConfig.load(tmp_path / "odd.toml").name == cfg.name
    w._remember()
    w.close()
    again = MainWindow(settings=settings)
    qtbot.addWidget(again)
    assert again.panel.config().name == cfg.name  # not the first preset


@pytest.mark.slow
def test_disk_full_mid_run_in_the_app(window, qtbot, monkeypatch, no_leftover_ranks):
    w = window
    fill(w.panel, mode="ddp", devices=2)
    _disk_fills_after(monkeypatch, 6)
    ended, batches = [], []
    w.controller.ended.connect(ended.append)
    w.controller.events.connect(batches.append)
    assert w.start_run()
    qtbot.waitUntil(lambda: not w.controller.running, timeout=START_S * 1000)
    assert ended and ended[-1].status == "error" and "disk is full" in ended[-1].message, ended
    pids = w.controller.pids()
    assert alive(pids) == []
    assert any(batches), "the events stay in memory in the app"
    monkeypatch.undo()
    fill(w.panel, mode="ddp", devices=2, steps=3)
    assert w.start_run()
    qtbot.waitUntil(lambda: not w.controller.running, timeout=START_S * 1000)
    assert ended[-1].status == "ok", ended[-1]
