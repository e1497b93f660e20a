"""RunController: drives one core.run.Run at a time from a QThread, as Qt signals.

The thread only iterates `Run.events()` (which blocks while it waits on the ranks) and
appends to a deque; a 50 ms QTimer in the GUI thread drains it and emits one
`events(list)` per tick.  Draining on the GUI side keeps the batching cadence even
while the run is paused or quiet, when the generator yields nothing for a while.

Controls (pause, resume, stop, set_lr) go straight to the Run's shared memory: they
are plain writes, safe from any thread, and never wait on the training thread.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import tempfile
from collections import deque
from pathlib import Path

from PySide6.QtCore import QObject, QThread, QTimer, Signal

from ..core import log
from ..core.config import ConfigError, RunConfig
from ..core.events import RunEnded, RunStarted
from ..core.run import Run
from . import collector

BATCH_MS = 50
KEEP_RUNS = 8
"""Events files kept in the runs folder (the session's runs, for comparing); older ones go."""
RANK_NICENESS = 5
"""Local ranks run this much nicer than the window: on a machine with few cores they
would otherwise take the CPU the event loop needs to draw (stalls of tens of ms); they
still get every cycle the window does not use."""


class _RunThread(QThread):
    """Owns the Run: builds it, iterates its events, lets its teardown end every rank."""

    def __init__(self, cfg: RunConfig, metrics: Path, parent: QObject, resume: str | None = None) -> None:
        super().__init__(parent)
        self.cfg, self.metrics, self.resume = cfg, metrics, resume
        self.queue: deque = deque()
        self.run_obj: Run | None = None
        self.stop_early = False
        self.error: str | None = None

    def run(self) -> None:  # the thread's body
        try:
            run = Run(self.cfg, metrics=self.metrics, resume=self.resume)
            self.run_obj = run
            if self.stop_early:  # Stop pressed while the Run was being built
                run.stop()
            for event in run.events():
                self.queue.append(event)
        except ConfigError as e:
            self.error = str(e)
        except Exception as e:  # noqa: BLE001 -- every failure reaches the person as a sentence
            self.error = f"{type(e).__name__}: {e}"
            log.failure(f"the run broke off: {self.error}", e)


class RunController(QObject):
    """Start a run, forward its events as batches, take controls.  One run at a time."""

    started = Signal(object)
    """RunStarted: the run's devices and config; comes before its first events batch."""
    events = Signal(list)
    """A batch of events (every kind except RunStarted), in order, about every 50 ms."""
    ended = Signal(object)
    """RunEnded: the verdict (ok, oom, error, stopped)."""
    failed = Signal(str)
    """The run could not start or broke off without a verdict (bad config, internal error)."""
    finished = Signal()
    """The thread is done and every rank has ended: a new run may start."""

    def __init__(self, parent: QObject | None = None, runs_dir: str | Path | None = None) -> None:
        super().__init__(parent)
        collector.install()  # the run's thread must never collect a widget
        self._own_dir = runs_dir is None
        self.runs_dir = Path(runs_dir) if runs_dir else Path(tempfile.mkdtemp(prefix="paralab-runs-"))
        self.metrics_path: Path | None = None
        """The events (.jsonl) of the current or last run."""
        self._kept: deque[Path] = deque()
        self.last_start: RunStarted | None = None
        self.last_end: RunEnded | None = None
        self.last_checkpoint: str | None = None
        """Where the last switch saved the state (switch())."""
        self._thread: _RunThread | None = None
        self._count = 0
        self._paused = False
        self._timer = QTimer(self)
        self._timer.setInterval(BATCH_MS)
        self._timer.timeout.connect(self._drain)
        self._niced: set[tuple[int, int]] = set()
        self._drains = 0

    # ---- state -----------------------------------------------------------------------------

    @property
    def running(self) -> bool:
        """A run is going (or still tearing down): Start must wait."""
        return self._thread is not None

    @property
    def paused(self) -> bool:
        return self._paused

    @property
    def run(self) -> Run | None:
        return self._thread.run_obj if self._thread else None

    def progress(self) -> dict[str, int] | None:
        """The starting run's progress (core.run.Run.progress), None before it has ranks."""
        run = self.run
        try:
            return run.progress() if run else None
        except RuntimeError:  # its dicts changed under us (the run's thread): ask again next time
            return None

    def pids(self) -> list[int]:
        run = self.run
        return run.pids() if run else []

    # ---- controls --------------------------------------------------------------------------

    def start(self, cfg: RunConfig, resume: str | None = None) -> bool:
        """Start a run of cfg (going on from the state saved at `resume`, a switch); False
        (and nothing started) while one is still going."""
        if self._thread is not None:
            return False
        self._count += 1
        self.metrics_path = self.runs_dir / f"run-{self._count}.jsonl"
        self._kept.append(self.metrics_path)
        while len(self._kept) > KEEP_RUNS:  # the session compares its last few runs, not all
            self._kept.popleft().unlink(missing_ok=True)
        self.last_start = self.last_end = None
        self._paused = False
        self._niced.clear()
        self._drains = 0
        self._thread = _RunThread(cfg, self.metrics_path, self, resume)
        self._thread.finished.connect(self._on_thread_finished)
        self._thread.start()
        self._timer.start()
        return True

    def pause(self) -> None:
        if self.run:
            self.run.pause()
            self._paused = True

    def resume(self) -> None:
        if self.run:
            self.run.resume()
            self._paused = False

    def stop(self) -> None:
        thread = self._thread
        if thread is None:
            return
        thread.stop_early = True
        if thread.run_obj is not None:
            thread.run_obj.stop()  # a paused rank sees it too: pausing waits on stop
        self._paused = False

    def switch(self) -> str | None:
        """Save the running run's state and stop it, for a run of another layout to go on
        from; the path it saves to (None: no run)."""
        run = self.run
        if run is None:
            return None
        run.switch()
        self._paused = False
        self.last_checkpoint = run.checkpoint
        return run.checkpoint

    def set_lr(self, lr: float) -> None:
        """New learning rate for the running run (ranks adopt it at their next sync)."""
        if self.run:
            self.run.set_lr(float(lr))

    def shutdown(self, timeout_s: float = 15.0) -> None:
        """Stop and wait for the thread (blocking): for quitting.  Should the thread not
        finish in time, kill its ranks directly so none outlives the app."""
        thread = self._thread
        if thread is None:
            return
        self.stop()
        if not thread.wait(int(timeout_s * 1000)):
            for pid in self.pids():
                with contextlib.suppress(OSError):
                    os.kill(pid, signal.SIGKILL)
            thread.wait(3000)
        if self._thread is thread and thread.isFinished():
            self._on_thread_finished()

    def cleanup(self) -> None:
        """Remove the temporary events folder (at exit)."""
        if self._own_dir:
            shutil.rmtree(self.runs_dir, ignore_errors=True)

    # ---- delivery --------------------------------------------------------------------------

    def _drain(self) -> None:
        thread = self._thread
        if thread is None:
            return
        self._drains += 1
        if self._drains % 10 == 1:  # twice a second: ranks and threads that appeared since
            self._nice_ranks()
        queue = thread.queue
        batch: list = []
        end: RunEnded | None = None
        while queue:
            event = queue.popleft()
            if isinstance(event, RunStarted):
                self._flush(batch)
                batch = []
                self.last_start = event
                self.started.emit(event)
            else:
                batch.append(event)
                if isinstance(event, RunEnded):
                    end = event
        self._flush(batch)
        if end is not None:
            self.last_end = end
            self.ended.emit(end)

    def _nice_ranks(self) -> None:
        """Lower the ranks' priority, thread by thread (Linux's nice is per thread; threads
        a rank starts later inherit it from its main thread)."""
        if not hasattr(os, "setpriority"):
            return
        for pid in self.pids():
            try:
                tids = [int(t) for t in os.listdir(f"/proc/{pid}/task")]
            except OSError:
                tids = [pid]
            for tid in tids:
                if (pid, tid) in self._niced:
                    continue
                self._niced.add((pid, tid))
                with contextlib.suppress(OSError):
                    os.setpriority(os.PRIO_PROCESS, tid, max(os.getpriority(os.PRIO_PROCESS, tid), RANK_NICENESS))

    def _flush(self, batch: list) -> None:
        if batch:
            self.events.emit(batch)

    def _on_thread_finished(self) -> None:
        thread = self._thread
        if thread is None:
            return
        self._drain()
        self._timer.stop()
        self._thread = None
        self._paused = False
        thread.deleteLater()
        if self.last_end is None:
            self.failed.emit(thread.error or "the run ended without a result")
        self.finished.emit()

