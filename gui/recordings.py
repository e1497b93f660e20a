"""What the main window does with recorded runs: the session's runs and their comparison,
replaying a recording, and session files.

A mixin of MainWindow (it uses the window's panel, data, dashboard, controller, banner and
replay bar), kept apart so that the window's own file stays about running and showing a run.
"""

from __future__ import annotations

from pathlib import Path

from PySide6.QtWidgets import QFileDialog

from ..core.config import ConfigError, RunConfig
from ..core.events import RunStarted
from .buffers import RunData
from .compare_dialog import CompareDialog, SessionRun
from .controller import KEEP_RUNS
from .replay import Replay


class Recordings:
    """Session runs, Compare runs…, Open run… (replay), Save/Open session…."""

    # ---- the session's runs -------------------------------------------------------------------

    @staticmethod
    def _run_title(data: RunData, number: int | None = None) -> str:
        """'#3 fsdp on sim:2, 150 steps, ok' (without the number: the ghost's label)."""
        start, end = data.start, data.end
        if start is None:
            return "previous run"
        steps = data.last_step.step if data.last_step else 0
        status = end.status if end else "unfinished"
        prefix = f"#{number} " if number is not None else ""
        return f"{prefix}{start.mode} on {start.config.get('devices', '?')}, {steps} steps, {status}"

    def _add_session_run(self, run: SessionRun) -> None:
        if run.events is not None and any(r.events is not None and r.title == run.title
                                          and len(r.events) == len(run.events) for r in self.session_runs):
            return  # the same recording opened again (or scrubbed from a session): listed once
        self.session_runs.append(run)
        # The last KEEP_RUNS: older runs' files are gone, and recordings are held in memory.
        self.session_runs = [r for r in self.session_runs if r.available()][-KEEP_RUNS:]
        if self.compare_dialog is not None and self.compare_dialog.isVisible():
            self.compare_dialog.set_runs(self.session_runs)
        self._update_actions()

    def open_compare(self) -> bool:
        """Show the session's runs side by side (the last ones ticked)."""
        if sum(r.available() for r in self.session_runs) < 2:
            self.statusBar().showMessage("Finish two runs (or open two recordings) to compare them.", 5000)
            return False
        if self.compare_dialog is None:  # made once: its plots are reused
            self.compare_dialog = CompareDialog(self)
        self.compare_dialog.set_runs(self.session_runs)
        self.compare_dialog.show()
        self.compare_dialog.raise_()
        return True

    # ---- replay ----------------------------------------------------------------------------

    def open_run(self, source: str | Path | list, speed: float = 1.0, name: str = "") -> bool:
        """Play a recorded run (an events file, or its events) in the dashboard."""
        from ..core.compare import CompareError, read_file

        if self.controller.running:
            self.banner.show_message("A run is going: stop it before opening a recording.")
            return False
        try:
            events = read_file(source) if not isinstance(source, list) else source
        except CompareError as e:
            self.banner.show_message(f"Cannot open the run: {e}")
            return False
        self.close_replay()
        self.banner.hide()
        self.dashboard.set_ghost(None)  # a ghost belongs to the live run it was kept for
        self.replay = Replay(events, speed, name or (Path(source).name if not isinstance(source, list) else ""), self)
        self.replay.started.connect(self._on_replay_started)
        self.replay.events.connect(self._on_events)
        self.replay.ended.connect(self._on_ended)
        self.replay.finished.connect(self.dashboard.stop)
        self.replay.finished.connect(self._update_actions)  # Run again: the recording as the ghost
        self._add_session_run(SessionRun(f"recording {self.replay.source or 'opened'}", events=events))
        try:  # the form shows what was recorded, when this version and the form can hold it
            recorded = RunConfig.from_dict(events[0].config)
            if not self.panel.beyond_the_form(recorded):
                self.panel.set_config(recorded)
        except (ConfigError, TypeError, AttributeError):
            pass
        self.replay_bar.bind(self.replay)
        self.show_dashboard()
        self.replay.play()
        self.replay_bar._update()
        return True

    def close_replay(self) -> None:
        replay, self.replay = self.replay, None
        if replay is None:
            return
        replay.stop()
        replay.deleteLater()
        self.replay_bar.hide()
        self.dashboard.stop()
        self._set_state("idle")

    def _on_replay_started(self, start: RunStarted) -> None:
        # A start again (scrubbing back) empties the views, as Start does for a live run.
        self.dashboard.clear()
        self.data.reset(start)
        self._total_steps = int(start.config.get("train", {}).get("steps", 0) or 0)
        for label in (self.step_label, self.loss_label, self.rate_label):
            label.setText("")
        self._set_state("replay")
        self.dashboard.start()

    # ---- session files ---------------------------------------------------------------------

    def shown_events(self) -> list | None:
        """The events of the run on screen: the recording played, or the last run's file."""
        if self.replay is not None:
            return [self.replay.start_event, *self.replay.rest]
        path = self.controller.metrics_path
        if self.controller.running or self.controller.last_end is None or path is None or not path.exists():
            return None
        from ..core.compare import CompareError, read_file

        try:
            return read_file(path)
        except CompareError:
            return None

    def save_session(self, path: str | Path, with_run: bool = True) -> bool:
        from ..core import session

        cfg = self.panel.config()
        if cfg is None:
            self.banner.show_message("Cannot save: " + "; ".join(self.panel.problems()))
            return False
        try:
            session.save(path, cfg, self.shown_events() if with_run else None, lesson=self.lessons.position())
        except OSError as e:
            self.banner.show_message(f"Cannot save {path}: {e.strerror or e}")
            return False
        return True

    def open_session(self, path: str | Path) -> bool:
        """Restore a session's settings, and show its recorded run (whole; Play replays it)."""
        from ..core.session import SessionError, load

        if self.controller.running:
            self.banner.show_message("A run is going: stop it before opening a session.")
            return False
        try:
            opened = load(path)
            beyond = self.panel.beyond_the_form(opened.config)
            if beyond:
                raise SessionError(f"{path}: {beyond}")
        except SessionError as e:
            self.banner.show_message(f"Cannot open the session: {e}")
            return False
        if opened.events and self.open_run(opened.events, name=Path(path).name):
            self.replay.pause()
            self.replay.seek(self.replay.duration)
        if opened.lesson is not None:  # the lesson where it was, then the form as it was saved
            self.lessons.open(*opened.lesson)
        self.panel.set_config(opened.config)  # after the run: its start names its own config
        return True

    def _open_session_dialog(self) -> None:
        path, _ = QFileDialog.getOpenFileName(self, "Open session", "", "paralab session (*.json);;All files (*)")
        if path:
            self.open_session(path)

    def _save_session_dialog(self) -> None:
        path, _ = QFileDialog.getSaveFileName(self, "Save session", "paralab-session.json",
                                              "paralab session (*.json)")
        if path:
            self.save_session(path)

    def _open_run_dialog(self) -> None:
        path, _ = QFileDialog.getOpenFileName(self, "Open run", "", "paralab events (*.jsonl);;All files (*)")
        if path:
            self.open_run(path)
