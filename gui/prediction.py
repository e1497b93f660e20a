"""The prediction's process: `core.estimate` run in a child that can be killed.

Tracing a large model holds the interpreter lock for seconds (minutes for a huge one),
which in a thread of the app would stall the window; and a prediction nobody wants any
more (the settings changed) must not hold up the next one.  So each prediction runs in
a child process forked from the ranks' forkserver (torch already imported), and
`cancel` kills it.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from concurrent.futures import CancelledError, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Any

from ..core import lifeline
from ..core.config import RunConfig
from ..core.run import context as run_context


class Cancelled(Exception):
    """The prediction was cancelled (its process killed) before it finished."""


def _estimate_task(cfg: RunConfig) -> tuple[Callable, tuple]:
    from ..core.estimate import estimate

    return estimate, (cfg, "both")


class PredictionProcess:
    """Call it with a RunConfig (from a worker thread) for its Estimate; `cancel()` from
    any thread ends the one in flight, whose caller then gets `Cancelled`; `close()` ends
    it for good (the window is closing).

    A worker is started (submit) and killed (close) under one lock: a worker that close()
    did not see would go on starting after the app had exited and removed the pool's
    semaphores, and print a FileNotFoundError traceback in the terminal."""

    def __init__(self) -> None:
        self._pool: ProcessPoolExecutor | None = None
        self._lock = threading.Lock()
        self._busy = False
        self._cancelled = False
        self._closed = False
        self.task: Callable[[RunConfig], tuple[Callable, tuple]] = _estimate_task
        """What the child runs for a config: (function, args), both picklable."""

    def __call__(self, cfg: RunConfig) -> Any:
        function, args = self.task(cfg)
        with self._lock:
            if self._closed:
                raise Cancelled()
            if self._pool is None:
                # lifeline.helper names the worker and ends it should the app die (SIGKILL)
                self._pool = ProcessPoolExecutor(max_workers=1, mp_context=run_context(),
                                                 initializer=lifeline.helper, initargs=("paralab-predict", os.getpid()))
            pool = self._pool
            self._busy, self._cancelled = True, False
            try:
                future = pool.submit(function, *args)  # starts the worker: under the lock (see above)
            except RuntimeError:  # shut down meanwhile
                self._busy = False
                raise Cancelled() from None
        try:
            return future.result()
        except (BrokenProcessPool, CancelledError):
            with self._lock:
                cancelled = self._cancelled or self._closed
                if self._pool is pool:
                    self._pool = None
            if cancelled:
                raise Cancelled() from None
            raise RuntimeError("the prediction process ended unexpectedly") from None
        finally:
            with self._lock:
                self._busy = False

    def pids(self) -> list[int]:
        with self._lock:
            pool = self._pool
            return [p.pid for p in (getattr(pool, "_processes", None) or {}).values()] if pool else []

    @property
    def busy(self) -> bool:
        return self._busy

    def cancel(self) -> None:
        """Kill the prediction in flight, if any (an idle process is kept: it is warm)."""
        with self._lock:
            if not self._busy:
                return
            self._cancelled = True
        self._end()

    def close(self) -> None:
        """For good: kill the worker, and start no other."""
        with self._lock:
            self._closed = True
        self._end()

    def _end(self) -> None:
        with self._lock:
            pool, self._pool = self._pool, None
            if pool is None:
                return
            processes = list((getattr(pool, "_processes", None) or {}).values())
            pool.shutdown(wait=False, cancel_futures=True)
        for p in processes:  # a trace under way is not worth waiting for
            p.kill()
            p.join(timeout=2)
