"""MainWindow: the settings on the left, the live views in the middle, controls on top.

The window only wires things together: ConfigPanel builds the RunConfig, RunController
runs it, RunData keeps what arrived, and the views draw RunData on their own timer.
A failure (out of memory, a crashed rank, a bad file) becomes a dismissible banner that
names the device; the window stays usable and the next run starts clean.
"""

from __future__ import annotations

import time
from importlib import resources
from typing import Any

from PySide6.QtCore import QSettings, Qt, QTimer
from PySide6.QtGui import QAction, QActionGroup, QCloseEvent, QColor, QKeySequence, QPalette
from PySide6.QtWidgets import (
    QAbstractSpinBox,
    QApplication,
    QDockWidget,
    QDoubleSpinBox,
    QFrame,
    QHBoxLayout,
    QLabel,
    QMainWindow,
    QPushButton,
    QStackedWidget,
    QVBoxLayout,
    QWidget,
)

from ..core import checkpoint, presets
from ..core.config import ConfigError, RunConfig
from ..core.events import RunEnded, RunStarted
from .buffers import RunData
from .compare_dialog import CompareDialog, SessionRun
from .config_panel import ConfigPanel
from .controller import RunController
from .dashboard import Dashboard, rate_text
from .files import Files
from .lessons import LessonMode
from .mesh_grid import preview_plan
from .recordings import Recordings
from .replay import Replay, ReplayBar
from .welcome import Welcome

THEMES = ("light", "dark")
FAILURE_TITLES = {"oom": "Out of memory", "error": "A rank failed"}
STOP_CLOSE_TIMEOUT_MS = 20_000


class LearningRateBox(QDoubleSpinBox):
    """A learning rate written as 0.01 or 3e-05, not 0.01000000; steps by a tenth of its decade."""

    def __init__(self) -> None:
        super().__init__()
        self.setDecimals(10)
        self.setRange(1e-8, 100.0)
        self.setStepType(QAbstractSpinBox.StepType.AdaptiveDecimalStepType)
        self.setKeyboardTracking(False)  # one change per finished number, not per keystroke
        self.setMinimumWidth(90)

    def textFromValue(self, value: float) -> str:  # noqa: N802 (Qt's name)
        return f"{value:.6g}"


class Banner(QFrame):
    """A strip above the plots that says what went wrong; the person dismisses it."""

    def __init__(self) -> None:
        super().__init__(objectName="banner")
        self.label = QLabel(wordWrap=True, objectName="bannerText")
        self.label.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        close = QPushButton("Dismiss", objectName="bannerDismiss")
        close.clicked.connect(self.hide)
        row = QHBoxLayout(self)
        row.addWidget(self.label, 1)
        row.addWidget(close, 0, Qt.AlignmentFlag.AlignTop)
        self.hide()

    def show_message(self, text: str) -> None:
        self.label.setText(text)
        self.show()

    def text(self) -> str:
        return self.label.text() if self.isVisible() else ""


class MainWindow(Files, Recordings, QMainWindow):
    def __init__(self, cfg: RunConfig | None = None, settings: QSettings | None = None) -> None:
        super().__init__()
        self.setWindowTitle("paralab")
        self.settings = settings if settings is not None else QSettings("paralab", "paralab")
        self.data = RunData()
        self.controller = RunController(self)
        self._closing = False
        self._running_cfg: RunConfig | None = None
        """The config of the run going now (the form may differ while paused)."""
        self._switch_to: RunConfig | None = None
        """A switch under way: the config the saved state goes on in."""
        self._forced = False
        self._state = "idle"
        self._started_at = 0.0
        self._progress_timer = QTimer(self)
        self._progress_timer.setInterval(250)
        self._progress_timer.timeout.connect(self._show_progress)

        self.panel = ConfigPanel()
        self.dock = QDockWidget("Run settings")
        self.dock.setObjectName("settingsDock")
        self.dock.setFeatures(QDockWidget.DockWidgetFeature.DockWidgetMovable
                              | QDockWidget.DockWidgetFeature.DockWidgetFloatable)
        self.dock.setWidget(self.panel)
        self.dock.setMinimumWidth(340)
        self.addDockWidget(Qt.DockWidgetArea.LeftDockWidgetArea, self.dock)

        # The dashboard holds the gauges (DeviceView), the plots and the Timeline.
        self.dashboard = Dashboard()
        self.dashboard.bind(self.data)
        self.banner = Banner()
        self.replay: Replay | None = None
        self.session_runs: list[SessionRun] = []
        """The runs of this session (finished runs, recordings opened), for Compare runs…."""
        self.compare_dialog: CompareDialog | None = None
        self.replay_bar = ReplayBar()
        self.replay_bar.closed.connect(self.close_replay)
        self._build_center()
        self._build_actions()
        self._build_status()
        self.lessons = LessonMode(self)

        self.panel.config_changed.connect(self._on_config_changed)
        self.panel.estimate_ready.connect(self._on_estimate)
        c = self.controller
        c.started.connect(self._on_started)
        c.events.connect(self._on_events)
        c.ended.connect(self._on_ended)
        c.failed.connect(self._on_failed)
        c.finished.connect(self._on_finished)

        self._restore(cfg)
        self.lessons.dock.hide()  # restoreState brings back the dock of a lesson left open at quit
        self._update_actions()

    # ---- layout ----------------------------------------------------------------------------

    def _build_center(self) -> None:
        center = QWidget()
        v = QVBoxLayout(center)
        v.setContentsMargins(6, 6, 6, 0)
        v.addWidget(self.banner)
        v.addWidget(self.replay_bar)
        self.welcome = Welcome()
        self.welcome.chosen.connect(self._on_welcome_preset)
        self.welcome.dismissed.connect(self.show_dashboard)
        self.pages = QStackedWidget()
        self.pages.addWidget(self.welcome)
        self.pages.addWidget(self.dashboard)
        v.addWidget(self.pages, 1)
        self.setCentralWidget(center)

    def show_dashboard(self) -> None:
        self.pages.setCurrentWidget(self.dashboard)

    def _on_welcome_preset(self, name: str) -> None:
        self.load_preset(name)
        self.show_dashboard()

    def _action(self, text: str, slot: Any, shortcut: str | None = None, tip: str = "") -> QAction:
        a = QAction(text, self)
        a.triggered.connect(slot)
        if shortcut:
            a.setShortcut(QKeySequence(shortcut))
        if tip:
            a.setToolTip(tip)
            a.setStatusTip(tip)
        return a

    def _build_actions(self) -> None:
        self.start_action = self._action("Start", self.start_run, "Ctrl+R", "Start a run of these settings")
        self.pause_action = self._action("Pause", self.pause_run, None, "Pause every rank at its next step")
        self.resume_action = self._action("Resume", self.resume_run, None, "Go on training")
        self.stop_action = self._action("Stop", self.stop_run, "Ctrl+.", "End the run; every rank exits")
        self.switch_action = self._action(
            "Switch layout", self.switch_run, None,
            "While paused: go on from this step with the form's mode, devices or mesh; the weights and "
            "optimizer state carry over (torch.distributed.checkpoint reshards them)")
        self.again_action = self._action("Run again with this change", lambda: self.start_run(ghost=True),
                                         "Ctrl+Shift+R", "Start these settings; the last run stays as a faint line")
        self.compare_action = self._action("Compare runs…", self.open_compare, "Ctrl+Shift+C",
                                           "Compare 2 to 4 runs of this session side by side")
        bar = self.addToolBar("Run")
        bar.setObjectName("runToolbar")
        bar.setMovable(False)
        for a in (self.start_action, self.pause_action, self.resume_action, self.switch_action, self.stop_action,
                  self.again_action, self.compare_action):
            bar.addAction(a)
        bar.addSeparator()
        bar.addWidget(QLabel(" Learning rate "))
        self.lr_box = LearningRateBox()
        self.lr_box.setToolTip("Change the learning rate while the run goes; ranks adopt it at their next sync.")
        self.lr_box.valueChanged.connect(self._on_lr)
        bar.addWidget(self.lr_box)

        menu = self.menuBar()
        file = menu.addMenu("&File")
        self.open_action = self._action("Open config…", self._open_config_dialog, "Ctrl+O")
        file.addAction(self.open_action)
        file.addAction(self._action("Save config…", self._save_config_dialog, "Ctrl+S"))
        file.addSeparator()
        self.open_run_action = self._action("Open run…", self._open_run_dialog, "Ctrl+Shift+O",
                                            "Play a recorded events file (.jsonl) in these views")
        file.addAction(self.open_run_action)
        self.open_session_action = self._action("Open session…", self._open_session_dialog, None,
                                                "Settings, seed and a recorded run, from a session file")
        file.addAction(self.open_session_action)
        file.addAction(self._action("Save session…", self._save_session_dialog, "Ctrl+Shift+S",
                                    "Save these settings (seed included) and the run on screen to one file"))
        file.addSeparator()
        file.addAction(self._action("Export plots to PNG…", self._export_png_dialog))
        file.addAction(self._action("Export events to CSV…", lambda: self._export_events_dialog("csv")))
        file.addAction(self._action("Export events to JSONL…", lambda: self._export_events_dialog("jsonl")))
        file.addSeparator()
        file.addAction(self._action("Quit", self.close, "Ctrl+Q"))

        run = menu.addMenu("&Run")
        for a in (self.start_action, self.pause_action, self.resume_action, self.switch_action, self.stop_action):
            run.addAction(a)
        run.addSeparator()
        run.addAction(self.again_action)
        run.addAction(self.compare_action)

        self.presets_menu = menu.addMenu("&Presets")
        for name in presets.names():
            self.presets_menu.addAction(self._action(name, lambda _=False, n=name: self.load_preset(n)))

        view = menu.addMenu("&View")
        self.theme_actions: dict[str, QAction] = {}
        group = QActionGroup(self)
        for name in THEMES:
            a = self._action(f"{name.capitalize()} theme", lambda _=False, n=name: self.apply_theme(n))
            a.setCheckable(True)
            group.addAction(a)
            view.addAction(a)
            self.theme_actions[name] = a
        view.addSeparator()
        view.addAction(self.dock.toggleViewAction())

    def _build_status(self) -> None:
        self.state_label = QLabel("Ready")
        self.step_label = QLabel("")
        self.loss_label = QLabel("")
        self.rate_label = QLabel("")
        sb = self.statusBar()
        sb.addWidget(self.state_label, 1)
        for w in (self.step_label, self.loss_label, self.rate_label):
            w.setMinimumWidth(110)
            sb.addPermanentWidget(w)

    # ---- settings --------------------------------------------------------------------------

    def _restore(self, cfg: RunConfig | None) -> None:
        s = self.settings
        if cfg is None:
            text = s.value("config", "")
            if text:
                try:
                    cfg = RunConfig.loads(str(text), source="the remembered config")
                except ConfigError:
                    cfg = None  # an old or damaged entry: start from the first preset
        if cfg is None:
            cfg = presets.load(presets.names()[0])
        self.panel.set_config(cfg)
        geometry = s.value("geometry")
        room = self.screen().availableGeometry()
        if geometry:
            self.restoreGeometry(geometry)
        else:
            self.resize(min(room.width(), 1600), min(room.height(), 1000))
        self.fit_to_screen()
        state = s.value("state")
        if state:
            self.restoreState(state)
        else:  # the form needs about this much; the plots want the rest
            self.resizeDocks([self.dock], [380], Qt.Orientation.Horizontal)
        theme = str(s.value("theme", "light"))
        self.apply_theme(theme if theme in THEMES else "light")

    def fit_to_screen(self) -> None:
        """Keep the window on its screen: a remembered size from a larger screen (or from
        an old version whose window grew with the devices) is cut down to what fits."""
        room = self.screen().availableGeometry()
        frame = self.frameGeometry()
        extra_w, extra_h = frame.width() - self.width(), frame.height() - self.height()
        w = min(self.width(), room.width() - extra_w)
        h = min(self.height(), room.height() - extra_h)
        if (w, h) != (self.width(), self.height()):
            self.resize(w, h)
        x = min(max(frame.x(), room.left()), room.right() - w - extra_w + 1)
        y = min(max(frame.y(), room.top()), room.bottom() - h - extra_h + 1)
        if (x, y) != (frame.x(), frame.y()):
            self.move(x, y)

    def _remember(self) -> None:
        cfg = self.panel.config()
        if cfg is not None:
            self.settings.setValue("config", cfg.dumps())
        self.settings.setValue("geometry", self.saveGeometry())
        self.settings.setValue("state", self.saveState())
        self.settings.sync()

    def apply_theme(self, name: str) -> None:
        """Light or dark: the palette (the plots read it) plus the style sheet."""
        app = QApplication.instance()
        qss = resources.files("paralab.resources").joinpath(f"{name}.qss").read_text(encoding="utf-8")
        app.setPalette(_palette(name, app))
        app.setStyleSheet(qss)
        self.theme = name
        self.theme_actions[name].setChecked(True)
        self.settings.setValue("theme", name)

    # ---- run controls ----------------------------------------------------------------------

    def start_run(self, ghost: bool = False) -> bool:
        """Start the form's run; `ghost` keeps the last run's loss and rate as faint lines."""
        cfg = self.panel.config()
        if cfg is None or self.panel.problems() or self.controller.running:
            return False
        self.dashboard.set_ghost(self.data if ghost else None, self._run_title(self.data) if ghost else "")
        self.close_replay()
        self.banner.hide()
        self.statusBar().clearMessage()  # the last run's verdict would hide the start-up progress
        self._remember()
        # Nothing of the last run stays: capacity, prediction lines, ranges, an OOM's red.
        self.dashboard.clear()
        self.data.reset(None)
        self.dashboard.refresh(force=True)
        self.lr_box.blockSignals(True)
        self.lr_box.setValue(cfg.train.lr)
        self.lr_box.blockSignals(False)
        self.step_label.setText("")
        self.loss_label.setText("")
        self.rate_label.setText("")
        self._launch(cfg)
        return True

    def _launch(self, cfg: RunConfig, resume: str | None = None) -> None:
        self._total_steps = cfg.train.steps
        self._running_cfg = cfg
        self.show_dashboard()
        self.controller.start(cfg, resume=resume)
        self._started_at = time.monotonic()
        self._set_state("starting")
        self._progress_timer.start()

    def _show_progress(self) -> None:
        """Until the first step: what the run is doing, and for how long so far."""
        if self._state != "starting":
            self._progress_timer.stop()
            return
        self.state_label.setText(f"{startup_text(self.controller.progress())} ({time.monotonic() - self._started_at:.0f} s)")

    def pause_run(self) -> None:
        if self._state == "running":
            self.controller.pause()
            self.data.mark("pause", "paused")
            self._set_state("paused")

    def resume_run(self) -> None:
        if self._state == "paused":
            if self._running_cfg is not None and self.panel.config() != self._running_cfg:
                self.panel.set_config(self._running_cfg)  # the form shows what runs, not an unused edit
            self.controller.resume()
            self._set_state("running")

    def switch_problem(self, cfg: RunConfig | None) -> str:
        """Why the paused run cannot go on in `cfg`'s layout; '' when it can."""
        running = self._running_cfg
        if cfg is None or running is None or self.panel.problems():
            return "the form has problems to fix first" if running is not None else "no run to switch"
        if cfg.model != running.model:
            return "a switch keeps the model; change the mode, the devices, the mesh or the batch"
        if cfg.train.steps <= (self.data.last_step.step if self.data.last_step else 0):
            return "give more steps than the run has done, to go on"
        return checkpoint.switch_problem(running) or checkpoint.switch_problem(cfg)

    def switch_run(self) -> bool:
        """Save the paused run where it is and go on with the form's layout."""
        cfg = self.panel.config()
        if self._state != "paused" or (problem := self.switch_problem(cfg)):
            if self._state == "paused":
                self.banner.show_message(f"Cannot switch: {problem}")
            return False
        self.banner.hide()
        self._switch_to = cfg
        self.controller.switch()
        self._set_state("stopping")
        self.state_label.setText("Saving the state to switch layout…")
        return True

    def stop_run(self) -> None:
        if self.controller.running:
            self.controller.stop()
            self._set_state("stopping")

    def _on_lr(self, value: float) -> None:
        if self._state in ("running", "paused"):
            self.controller.set_lr(value)
            self.statusBar().showMessage(f"learning rate set to {value:.6g}", 3000)

    def load_preset(self, name: str) -> None:
        self.lessons.leave()  # the form no longer holds the lesson's step
        try:
            self.panel.set_config(presets.load(name))
        except ConfigError as e:
            self.banner.show_message(f"Bad preset: {e}")

    def _set_state(self, state: str) -> None:
        self._state = state
        self.state_label.setText({"idle": "Ready", "starting": "Starting the ranks…", "running": "Running",
                                  "paused": "Paused", "stopping": "Stopping…", "replay": "Replaying a recording"}[state])
        self._update_actions()

    def _update_actions(self) -> None:
        state, busy = self._state, self.controller.running
        ok = self.panel.config() is not None and not self.panel.problems()
        self.start_action.setEnabled(ok and not busy and not self._closing)
        self.again_action.setEnabled(self.start_action.isEnabled() and self.data.last_step is not None)
        self.compare_action.setEnabled(sum(r.available() for r in self.session_runs) >= 2)
        self.pause_action.setEnabled(state == "running")
        self.resume_action.setEnabled(state == "paused")
        self.stop_action.setEnabled(busy and state != "stopping")
        self.switch_action.setEnabled(state == "paused")
        self.lr_box.setEnabled(state in ("running", "paused"))
        self.panel.set_locked(busy and state != "paused")  # paused: the form takes a new layout
        self.presets_menu.setEnabled(not busy)  # the form is the running run's until it ends
        self.open_action.setEnabled(not busy)
        self.open_run_action.setEnabled(not busy)
        self.open_session_action.setEnabled(not busy)
        self.lessons.set_busy(busy)

    # ---- controller signals ----------------------------------------------------------------

    def _on_config_changed(self, cfg: RunConfig | None, _problems: list[str]) -> None:
        if not self.controller.running and self.data.start is None:  # before a run: the form's mesh
            self.dashboard.devices.set_mesh(preview_plan(cfg))
        if cfg is not None and not self.controller.running:
            self.lr_box.blockSignals(True)  # the toolbar shows the form's rate, not its own minimum
            self.lr_box.setValue(cfg.train.lr)
            self.lr_box.blockSignals(False)
        self._update_actions()

    def _on_estimate(self, est: Any) -> None:
        # The form is locked during a run, so a prediction arriving then is the run's own.
        self._set_prediction(est)

    def _set_prediction(self, est: Any) -> None:
        pred = {d.device: {"peak_bytes": d.peak_bytes, "bytes": dict(d.bytes), "label": d.label,
                           "capacity_bytes": d.capacity_bytes} for d in est.devices} if est else {}
        self.dashboard.set_prediction(pred)

    def _on_started(self, start: RunStarted) -> None:
        if start.first_step > 1 and self.data.last_step is not None:
            self.data.go_on(start)  # a switched run: the curves go on, the devices are new
        else:
            self.data.reset(start)
        self._set_prediction(self.panel.estimate)
        self.dashboard.start()

    def _on_events(self, batch: list) -> None:
        self.data.add(batch)
        last = self.data.last_step
        if last is not None and self._state == "starting":
            self._set_state("running")  # the ranks are up and training
        if last is not None and self._state == "replay" and not self.again_action.isEnabled():
            self._update_actions()  # a recording's steps can be the ghost of Run again
        if last is not None:
            self.step_label.setText(f"step {last.step}/{self._total_steps}")
            self.loss_label.setText(f"loss {last.loss:.4g}")
            self.rate_label.setText(rate_text(self.data))

    def _on_ended(self, end: RunEnded) -> None:
        if end.status in FAILURE_TITLES:
            self.banner.show_message(self._failure_text(end))
        text = {"ok": f"Finished: {end.message}", "stopped": f"Stopped after step {end.steps}"}.get(
            end.status, f"Failed ({end.status}) after step {end.steps}")
        if "to switch layout" in end.message:
            text = f"Switching layout after step {end.steps}: the new layout's run goes on from there"
        self.statusBar().showMessage(text, 15000)

    def _failure_text(self, end: RunEnded) -> str:
        where = ""
        if end.device is not None:
            labels = self.data.labels
            where = f" on {labels[end.device]}" if end.device < len(labels) else f" on device {end.device}"
        return f"{FAILURE_TITLES[end.status]}{where}: {end.message}"

    def _on_failed(self, message: str) -> None:
        self.banner.show_message(f"The run failed: {message}")

    def _on_finished(self) -> None:
        end, target = self.controller.last_end, self._switch_to
        self._switch_to = None
        c = self.controller
        if target is not None and end is not None and "to switch layout" in end.message and not self._closing:
            self._launch(target, resume=c.last_checkpoint)  # the plots go on (RunData.go_on)
            return
        if c.last_start is not None and c.last_end is not None and c.metrics_path is not None:
            self._add_session_run(SessionRun(self._run_title(self.data, len(self.session_runs) + 1),
                                              path=c.metrics_path))
        self.dashboard.stop()
        self._set_state("idle")
        if self._closing:
            self.close()

    # ---- closing ---------------------------------------------------------------------------

    def closeEvent(self, event: QCloseEvent) -> None:  # noqa: N802 (Qt's name)
        self._remember()
        if self.controller.running and not self._forced:
            # Stop first and close when every rank has ended; the window stays responsive.
            event.ignore()
            if not self._closing:
                self._closing = True
                self.stop_run()
                self.state_label.setText("Stopping the run before closing…")
                QTimer.singleShot(STOP_CLOSE_TIMEOUT_MS, self.force_close)
            return
        self.dashboard.stop()
        self.panel.shutdown()
        self.controller.cleanup()  # the temporary events file: nothing can export it any more
        event.accept()

    def force_close(self) -> None:
        """Close now: ranks that have not ended within a moment are killed."""
        if self.controller.running:
            self.controller.shutdown(timeout_s=2.0)  # kills what is left
        self._forced = True
        self.close()


def startup_text(progress: dict[str, int] | None) -> str:
    """From Start to the first step: ranks started n/N, building the model, first step."""
    if not progress:
        return "Starting the run…"
    world = progress["world"]
    if progress["launched"] < world or progress["heard"] < world:
        return f"Starting the ranks: {progress['heard']}/{world} up"
    if progress["training"] < world:
        return f"Building the model on every rank: {progress['training']}/{world} ready"
    return "Running the first step…"


def _palette(name: str, app: QApplication) -> QPalette:
    if name == "light":
        return app.style().standardPalette()
    p = QPalette()
    role = QPalette.ColorRole
    for r, color in ((role.Window, "#1e1f22"), (role.WindowText, "#e6e6e6"), (role.Base, "#16171a"),
                     (role.AlternateBase, "#23252a"), (role.Text, "#e6e6e6"), (role.Button, "#2b2d31"),
                     (role.ButtonText, "#e6e6e6"), (role.ToolTipBase, "#2b2d31"), (role.ToolTipText, "#e6e6e6"),
                     (role.Highlight, "#3d7bd9"), (role.HighlightedText, "#ffffff"), (role.Link, "#6ea8fe"),
                     (role.PlaceholderText, "#8a8d93")):
        p.setColor(r, QColor(color))
    for r in (role.WindowText, role.Text, role.ButtonText):
        p.setColor(QPalette.ColorGroup.Disabled, r, QColor("#6b6e74"))
    return p
