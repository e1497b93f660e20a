"""The form's "Predicted peak memory" box: the estimate of the settings being edited.

Each edit asks for a prediction of the new settings; a short pause lets a burst of edits
end first.  It runs in core.estimate's own process (gui.prediction), fed by one worker
thread that always takes the newest request, and a change of settings kills the one in
flight: a stale prediction is never shown and never holds up the next.
"""

from __future__ import annotations

import threading
import time
from typing import Any

from PySide6.QtCore import QObject, QTimer, Signal
from PySide6.QtWidgets import QGroupBox, QLabel, QVBoxLayout, QWidget

from ..core import log
from ..core.config import ConfigError, RunConfig, human_bytes
from . import collector
from .prediction import PredictionProcess

ESTIMATE_DELAY_MS = 400
SLOW_PREDICTION_S = 2  # past this, "Predicting…" says for how long so far


class _Signals(QObject):
    done = Signal(int, object, str)  # generation, Estimate or None, error sentence


class PredictionBox(QGroupBox):
    """`request(cfg)` after each edit (None: the settings have problems); `ready` carries
    the Estimate (or None when it could not be made)."""

    ready = Signal(object)

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__("Predicted peak memory", parent)
        collector.install()  # its worker thread must never collect a widget
        lay = QVBoxLayout(self)
        self.label = QLabel(wordWrap=True, objectName="estimate")
        self.warning = QLabel(wordWrap=True, objectName="estimateWarning")
        lay.addWidget(self.label)
        lay.addWidget(self.warning)
        self.estimate: Any = None
        self.process = PredictionProcess()
        self._config: RunConfig | None = None
        self._generation = 0
        self._lock = threading.Lock()
        self._next: tuple[int, RunConfig | None] | None = None
        self._busy = False
        self._started = 0.0
        self._clock = QTimer(self, interval=1000)
        self._clock.timeout.connect(self._show_elapsed)
        self._signals = _Signals(self)
        self._signals.done.connect(self._on_done)
        self._delay = QTimer(self, singleShot=True, interval=ESTIMATE_DELAY_MS)
        self._delay.timeout.connect(self._start)

    def request(self, cfg: RunConfig | None) -> None:
        self._generation += 1
        self._config = cfg
        # A new configuration makes the prediction in flight worthless: end its process
        # now rather than wait for it (a huge model can take minutes to trace).
        self.process.cancel()
        self.estimate = None  # it was the old settings' (a run started now must not show it)
        self.warning.hide()  # it was about the settings before this change
        if cfg is None:
            self._delay.stop()
            self._clock.stop()
            self.label.setText("Fix the problems above to see the prediction.")
            return
        self.label.setText("Predicting…")
        self._started = time.monotonic()
        self._clock.start()
        self._delay.start()

    def shutdown(self) -> None:
        """End the prediction process (the window is closing)."""
        self.process.close()

    def _show_elapsed(self) -> None:
        seconds = int(time.monotonic() - self._started)
        if seconds >= SLOW_PREDICTION_S:
            self.label.setText(f"Predicting… {seconds} s so far: tracing a large model takes a while. "
                               "Changing a setting cancels it; Start does not wait for it.")

    def _start(self) -> None:
        # One worker thread at a time; it always takes the newest request, so a burst of
        # edits costs at most one stale prediction.
        with self._lock:
            self._next = (self._generation, self._config)
            if self._busy:
                return
            self._busy = True
        threading.Thread(target=self._loop, name="paralab-estimate", daemon=True).start()

    def _loop(self) -> None:
        while True:
            with self._lock:
                job, self._next = self._next, None
                if job is None or job[1] is None:
                    self._busy = False
                    return
            generation, cfg = job
            result, error = None, ""
            try:
                result = self.process(cfg)
            except ConfigError as e:
                error = str(e)
            except Exception as e:  # noqa: BLE001 -- a failed prediction must not break the form
                error = f"could not predict: {type(e).__name__}: {e}"
                log.failure(error, e)
            try:
                self._signals.done.emit(generation, result, error)
            except RuntimeError:  # the panel is gone (the app is closing)
                return

    def _on_done(self, generation: int, result: Any, error: str) -> None:
        if generation != self._generation:
            return  # the settings changed since; a newer prediction is on its way
        self._clock.stop()
        self.estimate = result
        self.ready.emit(result)
        if result is None:
            self.label.setText(error)
            self.warning.hide()
            return
        lines, full = [], []
        for d in result.devices:
            share = d.peak_bytes / d.capacity_bytes if d.capacity_bytes else 0.0
            lines.append(f"{d.label}: {human_bytes(d.peak_bytes)} of {human_bytes(d.capacity_bytes)} "
                         f"({share:.0%})")
            if not d.fits:
                full.append(d.label)
        self.label.setText("\n".join(lines))
        if full:
            self.warning.setText(
                f"⚠ {', '.join(full)} will run out of memory: use more devices, a smaller model or batch, "
                "or a mode that shards (fsdp, tensor-parallel).")
            self.warning.show()
        else:
            self.warning.hide()
