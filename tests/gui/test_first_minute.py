"""The app as a new user meets it (issue 11): no run needed for these, except where said.

Each bug test fails without its fix: the wheel over the form (3), the prediction that was
never cancelled (4), the window that grew with the devices (5), the last run's lines left
on the dashboard (6), the device column cut to "sim" (7), the parameter count in the CSV's
bytes column (10)."""

import os

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")

import csv  # noqa: E402
import time  # noqa: E402

import psutil  # noqa: E402
import pytest  # noqa: E402
from paralab.core import presets  # noqa: E402
from paralab.core.events import (  # noqa: E402
    CATEGORIES,
    EventWriter,
    MemorySample,
    PhaseSpan,
    RunEnded,
    RunStarted,
    StepDone,
)
from paralab.gui.main_window import MainWindow  # noqa: E402
from paralab.gui.style import CATEGORY_COLORS, DEVICE_COLORS  # noqa: E402
from PySide6.QtCore import QByteArray, QPoint, QPointF, QRect, QSettings, Qt  # noqa: E402
from PySide6.QtGui import QWheelEvent  # noqa: E402
from PySide6.QtWidgets import QApplication  # noqa: E402

GiB, MIB = 2**30, 2**20


def start_event(n, capacity=GiB):
    devices = [{"index": i, "label": f"sim{i}", "kind": "sim", "capacity_bytes": capacity, "description": ""}
               for i in range(n)]
    return RunStarted("ddp", devices, {"train": {"micro_batches": 1}}, n, params=1234)


def memory(step, device, t, mib):
    b = dict.fromkeys(CATEGORIES, 0)
    b["params"] = mib * MIB
    return MemorySample(step, device, b, mib * MIB, GiB, t)


def wheel(widget, up=True):
    pos = QPointF(widget.width() / 2, widget.height() / 2)
    event = QWheelEvent(pos, widget.mapToGlobal(pos), QPoint(0, 0), QPoint(0, 120 if up else -120),
                        Qt.MouseButton.NoButton, Qt.KeyboardModifier.NoModifier, Qt.ScrollPhase.NoScrollPhase, False)
    QApplication.sendEvent(widget, event)


# ---- 3: the wheel scrolls the form, it does not change fields ----------------------------------


def test_wheel_over_the_form_changes_a_field_only_when_it_has_focus(window, qtbot):
    panel = window.panel
    panel.set_config(presets.load("transformer-fsdp"))
    heads, mode = panel._spins["model.heads"], panel.mode
    before_heads, before_mode = heads.value(), mode.currentText()
    for _ in range(3):
        wheel(heads, up=False)
        wheel(mode, up=False)
    assert heads.value() == before_heads and mode.currentText() == before_mode
    heads.setFocus()
    qtbot.waitUntil(heads.hasFocus, timeout=2000)
    wheel(heads, up=True)
    assert heads.value() == before_heads + 1  # a focused field takes the wheel as before


# ---- 4: a new configuration cancels the prediction in flight -----------------------------------


def test_a_new_configuration_cancels_a_prediction_that_takes_long(window, qtbot):
    panel = window.panel
    real = panel.prediction.process.task
    panel.prediction.process.task = lambda cfg: (time.sleep, (120,))  # a "huge model" that never ends
    panel._spins["train.steps"].setValue(panel._spins["train.steps"].value() + 1)
    qtbot.waitUntil(lambda: bool(panel.prediction.process.busy and panel.prediction.process.pids()), timeout=60_000)
    pids = panel.prediction.process.pids()
    qtbot.waitUntil(lambda: "so far" in panel.prediction.label.text(), timeout=10_000)
    assert panel.prediction.label.text().startswith("Predicting… ")  # says that it is long, and how long

    panel.prediction.process.task = real
    panel.set_config(presets.load("seed-data-parallel"))  # the small preset loaded afterwards
    qtbot.waitUntil(lambda: not any(psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE
                                    for p in pids), timeout=10_000)
    qtbot.waitUntil(lambda: panel.estimate is not None, timeout=60_000)
    assert "Predicting" not in panel.prediction.label.text()
    assert panel.estimate.devices[0].label == "sim0"


# ---- 5: the window fits its screen whatever the device count -----------------------------------


@pytest.mark.parametrize("n", [2, 8, 32])
def test_the_window_never_grows_past_the_screen(window, qtbot, n):
    w = window
    w.resize(1280, 720)
    w.show_dashboard()
    w.data.reset(start_event(n))
    w.data.add([memory(1, d, 0.1, 10) for d in range(n)])
    w.dashboard.refresh(force=True)
    qtbot.wait(50)
    assert w.minimumSizeHint().width() <= 1280 and w.minimumSizeHint().height() <= 720
    assert (w.width(), w.height()) == (1280, 720)  # the devices did not push the window wider
    gauges = [g for g in w.dashboard.devices.gauges if g.isVisible()]
    assert len(gauges) == n
    if n == 32:
        assert w.dashboard.devices.rows() > 1  # wrapped, scrolling inside the view


def test_a_remembered_oversized_window_is_brought_back_on_screen(qtbot, tmp_path):
    settings = QSettings(str(tmp_path / "settings.ini"), QSettings.Format.IniFormat)
    first = MainWindow(settings=settings)
    qtbot.addWidget(first)
    first.setGeometry(QRect(-300, 50, 4586, 1400))  # what 32 devices once made of it
    settings.setValue("geometry", first.saveGeometry())
    settings.sync()
    first.panel.shutdown()
    second = MainWindow(settings=settings)
    qtbot.addWidget(second)
    room = second.screen().availableGeometry()
    assert isinstance(settings.value("geometry"), QByteArray)
    assert second.frameGeometry().width() <= room.width() and second.frameGeometry().height() <= room.height()
    assert room.contains(second.frameGeometry().topLeft())
    second.panel.shutdown()


# ---- 6: Start clears what the last run left ----------------------------------------------------


def test_start_clears_the_last_runs_capacity_prediction_and_ranges(window, monkeypatch):
    w, dash = window, window.dashboard
    w.show_dashboard()
    w.data.reset(start_event(2))
    dash.set_prediction({0: {"peak_bytes": 500 * MIB}, 1: {"peak_bytes": 500 * MIB}})
    w.data.add([StepDone(1, 2.0, 0.1, 100.0, 0.01), memory(1, 0, 900.0, 800), memory(1, 1, 900.0, 800),
                RunEnded("oom", "sim0 forward: params pushed it to 1.1 GiB", 0, 900.0, 1)])
    dash.refresh(force=True)
    mp = dash.mem_plots[0]
    assert mp.capacity.isVisible() and mp.predicted.isVisible() and dash.devices.gauges[0].oom
    assert mp.plot.getViewBox().viewRange()[0][1] > 800

    monkeypatch.setattr(w.controller, "start", lambda cfg, **_: True)  # no ranks: what shows before any event
    assert w.start_run()
    for mp in dash.mem_plots:
        assert not mp.capacity.isVisible() and not mp.predicted.isVisible()
        assert mp.plot.getViewBox().viewRange()[0][1] < 800  # not the last run's range
    assert not any(g.isVisible() and (g.oom or g.capacity or g.predicted) for g in dash.devices.gauges)
    assert dash.loss_curve.getData()[0] is None or len(dash.loss_curve.getData()[0]) == 0
    assert dash.placeholders["loss"].showing and not any(line.isVisible() for line in dash.markers["loss"].lines)
    monkeypatch.undo()
    w._set_state("idle")


# ---- 7: the placement table shows whole device names --------------------------------------------


def test_the_layer_tables_device_column_is_readable(window):
    panel = window.panel
    panel.set_config(presets.load("seed-model-parallel"))
    table = panel.placement
    assert table.rowCount() > 0
    for row in range(table.rowCount()):
        combo = table.cellWidget(row, 1)
        assert table.columnWidth(1) >= combo.sizeHint().width()
        text = combo.currentText()
        assert combo.fontMetrics().horizontalAdvance(text) < combo.width() - 16, (text, combo.width())


# ---- 10: the CSV's params column holds bytes ----------------------------------------------------


def test_the_csv_keeps_one_meaning_per_column(window, tmp_path):
    events_file = tmp_path / "run.jsonl"
    writer = EventWriter(events_file)
    writer.write([start_event(2), StepDone(1, 1.0, 0.1, 10.0, 0.01), memory(1, 0, 0.1, 3),
                  PhaseSpan(0, "communication", 0.0, 0.01, 1, "host", 4096, "all-reduce"),
                  RunEnded("stopped", "", None, 1.0, 1)])
    writer.close()
    window.controller.metrics_path = events_file
    assert window.export_events(tmp_path / "out.csv", "csv")
    with open(tmp_path / "out.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    start, memory_row, span = rows[0], rows[2], rows[3]
    assert start["event"] == "start" and start["params"] == "" and start["param_count"] == "1234"
    assert memory_row["params"] == str(3 * MIB)
    assert span["message_bytes"] == "4096" and span["name"] == "all-reduce" and span["params"] == ""


# ---- 11, 13, 16: the first minute --------------------------------------------------------------


def test_first_open_welcomes_with_the_presets_and_the_forms_learning_rate(window):
    w = window
    assert w.pages.currentWidget() is w.welcome
    names = list(w.welcome.buttons)
    assert names[:2] == ["seed-data-parallel", "seed-model-parallel"] and set(names) == set(presets.names())
    assert all(" — " in b.text() for b in w.welcome.buttons.values())  # one line each
    assert abs(w.lr_box.value() - w.panel.config().train.lr) < 1e-12  # not 1e-08
    assert w.dashboard.placeholders["loss"].showing
    w.welcome.buttons["mlp-ddp"].click()
    assert w.pages.currentWidget() is w.dashboard and w.panel.config().mode == "ddp"
    assert abs(w.lr_box.value() - w.panel.config().train.lr) < 1e-12


def test_markers_for_pause_learning_rate_and_the_end(window):
    w, dash = window, window.dashboard
    w.data.reset(start_event(2))
    w.data.add([StepDone(i, 1.0 / i, 0.1 * i, 100.0, 0.01) for i in range(1, 5)])
    w.data.mark("pause", "paused")
    w.data.add([StepDone(i, 1.0 / i, 0.1 * i, 100.0, 0.001) for i in range(5, 9)])
    w.data.add([RunEnded("oom", "sim1 forward: activations pushed it to 2 GiB", 1, 1.0, 8)])
    dash.refresh(force=True)
    shown = dash.markers["loss"].shown
    assert [(x, kind) for x, kind, _ in shown] == [(4.0, "pause"), (5.0, "lr"), (8.0, "oom")]
    assert shown[1][2] == "lr 0.001" and shown[2][2] == "out of memory"
    assert [line.label.textItem.toPlainText() for line in dash.markers["loss"].lines] == \
        ["paused", "lr 0.001", "out of memory"]
    assert [x for x, _, _ in dash.markers["rate"].shown] == pytest.approx([0.4, 0.5, 0.8])
    assert "sim0" in dash.device_legend.text() and "sim1" in dash.device_legend.text()
    assert not {c.upper() for c in DEVICE_COLORS} & {c.upper() for c in CATEGORY_COLORS.values()}


def test_problems_name_the_forms_labels(window):
    panel = window.panel
    panel.memory.setText("512")  # bytes: too small
    assert any(p.startswith("“Capacity each”") for p in panel.problems()), panel.problems()
    assert not any("sim.memory" in p for p in panel.problems())


# ---- 1: the system libraries the window needs ---------------------------------------------------


def test_syscheck_names_the_packages_for_what_the_linker_misses(monkeypatch):
    from paralab.gui import syscheck

    assert syscheck.install_line(["libxcb-icccm.so.4", "libxcb-keysyms.so.1"]) == \
        "sudo apt-get install -y libxcb-icccm4 libxcb-keysyms1"
    monkeypatch.setenv("QT_QPA_PLATFORM", "offscreen")
    assert syscheck.report() is None  # not X11: nothing to check
    monkeypatch.setenv("QT_QPA_PLATFORM", "xcb")
    monkeypatch.setattr(syscheck, "missing_libraries", lambda paths=None: ["libxcb-keysyms.so.1"])
    text = syscheck.report()
    assert "libxcb-keysyms.so.1" in text and "apt-get install -y libxcb-keysyms1" in text


# ---- 12: from Start to the first step, what is happening ---------------------------------------


def test_startup_says_what_is_happening():
    from paralab.gui.main_window import startup_text

    assert startup_text(None) == "Starting the run…"
    assert startup_text({"world": 4, "launched": 4, "heard": 1, "training": 0}) == "Starting the ranks: 1/4 up"
    assert startup_text({"world": 4, "launched": 4, "heard": 4, "training": 2}) == \
        "Building the model on every rank: 2/4 ready"
    assert startup_text({"world": 4, "launched": 4, "heard": 4, "training": 4}) == "Running the first step…"


# ---- 8: closing leaves no prediction worker starting behind ------------------------------------


def test_closing_the_prediction_kills_its_worker_and_starts_no_other():
    """A worker left starting after the app exited found the pool's semaphores gone and
    printed a FileNotFoundError traceback in the terminal (closing the window mid-run)."""
    import threading

    from paralab.core.config import RunConfig
    from paralab.gui.prediction import Cancelled, PredictionProcess

    prediction = PredictionProcess()
    prediction.task = lambda cfg: (time.sleep, (60,))
    outcome: list[str] = []

    def ask() -> None:
        try:
            prediction(RunConfig())
            outcome.append("finished")
        except Cancelled:
            outcome.append("cancelled")

    thread = threading.Thread(target=ask)
    thread.start()
    deadline = time.time() + 60
    while not prediction.pids() and time.time() < deadline:
        time.sleep(0.05)
    pids = prediction.pids()
    assert pids
    prediction.close()
    thread.join(10)
    assert outcome == ["cancelled"]
    assert not any(psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE for p in pids)
    with pytest.raises(Cancelled):
        prediction(RunConfig())  # closed: no new worker
    assert prediction.pids() == []
