"""Replay: a recorded events file played into the live views, at its own pace or faster.

`Replay` has the signals of a RunController (started, events, ended, finished), so the
main window feeds RunData and the dashboard from it exactly as from a live run.  Each
event is due at the host time it was recorded at (a step's `host_s`, a sample's `time_s`,
a host span's end); the modelled spans of a simulated GPU carry another clock, so they
come with the event recorded before them.  A 30 ms timer hands over what is due; the
position follows the wall clock times the speed, so a slow tick never slows the replay.

`ReplayBar` is the strip of controls: play/pause, a slider to scrub, slower/faster.
"""

from __future__ import annotations

import bisect
import time

from PySide6.QtCore import QObject, Qt, QTimer, Signal
from PySide6.QtGui import QKeySequence
from PySide6.QtWidgets import QHBoxLayout, QLabel, QPushButton, QSlider, QWidget

from ..core.events import MemorySample, PhaseSpan, RunEnded, RunStarted, StepDone, UtilizationSample

TICK_MS = 30
SCRUB_MS = 80
MIN_SPEED, MAX_SPEED = 1 / 16, 1024.0


def event_times(events: list) -> list[float]:
    """When each event was recorded, in seconds of the host's clock since the run began
    (never decreasing: events that carry no host time come with the one before them)."""
    now, out = 0.0, []
    for e in events:
        t = None
        if isinstance(e, StepDone):
            t = e.host_s if e.host_s is not None else e.time_s
        elif isinstance(e, (MemorySample, UtilizationSample, RunEnded)):
            t = e.time_s
        elif isinstance(e, PhaseSpan) and e.clock == "host":
            t = e.end_s
        if t is not None and t > now:
            now = float(t)
        out.append(now)
    return out


class Replay(QObject):
    """Plays `events` (the first a RunStarted) with RunController's signals."""

    started = Signal(object)
    events = Signal(list)
    ended = Signal(object)
    finished = Signal()
    moved = Signal(float)
    """The position, in seconds of the recording, after each tick or seek."""

    def __init__(self, events: list, speed: float = 1.0, source: str = "", parent: QObject | None = None) -> None:
        super().__init__(parent)
        if not events or not isinstance(events[0], RunStarted):
            raise ValueError("a replay begins with the run's start event")
        self.start_event: RunStarted = events[0]
        self.rest = events[1:]
        self.times = event_times(self.rest)
        self.source = source
        self.duration = self.times[-1] if self.times else 0.0
        self.speed = min(max(float(speed), MIN_SPEED), MAX_SPEED)
        self.position = 0.0
        self._next = 0
        """Index in `rest` of the first event not handed over yet."""
        self._began = False
        self._wall = self._anchor = 0.0
        self._timer = QTimer(self)
        self._timer.setInterval(TICK_MS)
        self._timer.timeout.connect(self._tick)

    @property
    def playing(self) -> bool:
        return self._timer.isActive()

    @property
    def at_end(self) -> bool:
        return self._next >= len(self.rest)

    def play(self) -> None:
        if not self._began:
            self._began = True
            self.started.emit(self.start_event)
        if self.at_end:
            return
        self._wall = time.monotonic()
        self._anchor = self.position
        self._timer.start()

    def pause(self) -> None:
        if self.playing:
            self._tick()
            self._timer.stop()

    def set_speed(self, speed: float) -> None:
        """Play `speed` times as fast as recorded (from here on)."""
        if self.playing:
            self._tick()
            self._wall, self._anchor = time.monotonic(), self.position
        self.speed = min(max(float(speed), MIN_SPEED), MAX_SPEED)

    def seek(self, position: float) -> None:
        """Show the run as it was `position` seconds in; backwards starts the views afresh."""
        position = min(max(float(position), 0.0), self.duration)
        if position < self.position or not self._began:
            self._began = True
            self._next = 0
            self.started.emit(self.start_event)  # the window resets its buffers on a start
        self.position = position
        if self.playing:
            self._wall, self._anchor = time.monotonic(), position
        self._hand_over(position)

    def stop(self) -> None:
        self._timer.stop()

    # ---- internals ------------------------------------------------------------------------------

    def _tick(self) -> None:
        self.position = min(self._anchor + (time.monotonic() - self._wall) * self.speed, self.duration)
        self._hand_over(self.position)

    def _hand_over(self, position: float) -> None:
        stop = bisect.bisect_right(self.times, position, lo=self._next)
        if position >= self.duration:
            stop = len(self.rest)
        batch = self.rest[self._next:stop]
        self._next = stop
        if batch:
            self.events.emit(batch)
        self.moved.emit(position)
        if self.at_end and batch:
            self._timer.stop()
            end = batch[-1]
            if isinstance(end, RunEnded):
                self.ended.emit(end)
            self.finished.emit()


class ReplayBar(QWidget):
    """Play/pause, a slider over the recording, slower/faster, close: drives a Replay."""

    closed = Signal()

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent, objectName="replayBar")
        self.replay: Replay | None = None
        self.title = QLabel("")
        self.play_button = QPushButton("Pause")
        self.play_button.clicked.connect(self.toggle)
        self.slower = QPushButton("Slower")
        self.slower.clicked.connect(lambda: self._scale(0.5))
        self.faster = QPushButton("Faster")
        self.faster.clicked.connect(lambda: self._scale(2.0))
        self.speed_label = QLabel("")
        self.slider = QSlider(Qt.Orientation.Horizontal)
        self.slider.setToolTip("Drag to any moment of the recording")
        self.slider.sliderMoved.connect(self._scrub)
        # Scrubbing back replays everything up to there (a long recording: most of a second),
        # so drags are applied at most every SCRUB_MS, the last position always.
        self._scrub_to: float | None = None
        self._scrub_timer = QTimer(self, singleShot=True, interval=SCRUB_MS)
        self._scrub_timer.timeout.connect(self._apply_scrub)
        self.time_label = QLabel("")
        self.play_button.setShortcut(QKeySequence(Qt.Key.Key_Space))  # as in any player
        self.play_button.setToolTip("Play or pause the recording (Space)")
        close = QPushButton("Close replay")
        close.clicked.connect(self.closed.emit)
        row = QHBoxLayout(self)
        row.setContentsMargins(0, 0, 0, 0)
        for w in (self.title, self.play_button, self.slower, self.speed_label, self.faster):
            row.addWidget(w)
        row.addWidget(self.slider, 1)
        row.addWidget(self.time_label)
        row.addWidget(close)
        self.hide()

    def bind(self, replay: Replay) -> None:
        self.replay = replay
        self.title.setText(f"Replay of {replay.source}" if replay.source else "Replay")
        self.slider.setRange(0, max(1, int(replay.duration * 1000)))
        replay.moved.connect(self._moved)
        replay.finished.connect(self._update)
        self._update()
        self.show()

    def toggle(self) -> None:
        r = self.replay
        if r is None:
            return
        if r.playing:
            r.pause()
        elif r.at_end:  # from the start again
            r.seek(0.0)
            r.play()
        else:
            r.play()
        self._update()

    def _scale(self, factor: float) -> None:
        if self.replay is not None:
            self.replay.set_speed(self.replay.speed * factor)
            self._update()

    def _scrub(self, value: int) -> None:
        self._scrub_to = value / 1000
        if not self._scrub_timer.isActive():
            self._scrub_timer.start()

    def _apply_scrub(self) -> None:
        to, self._scrub_to = self._scrub_to, None
        if self.replay is not None and to is not None:
            self.replay.seek(to)

    def _moved(self, position: float) -> None:
        if not self.slider.isSliderDown():
            self.slider.setValue(int(position * 1000))
        duration = self.replay.duration if self.replay else 0.0
        self.time_label.setText(f"{position:.1f} / {duration:.1f} s")
        self._update()  # paused, played or ended from elsewhere (a menu, a test, the end)

    def _update(self) -> None:
        r = self.replay
        if r is None:
            return
        self.play_button.setText("Pause" if r.playing else ("Play again" if r.at_end else "Play"))
        self.speed_label.setText(f"×{r.speed:g}")
