"""Helper processes end when the process that started them is gone, however it ended.

The forkserver (and through it the prediction process and the ranks), and the
resource tracker behind them, would otherwise outlive an app killed with SIGKILL:
nothing tells them.  A helper calls `arm()`: a daemon thread notices its parent is
gone (the process is re-parented, or the watched pid no longer exists) and ends it.
The forkserver arms itself: it imports this module first among its preloads.
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
import time

POLL_S = 0.5
_armed_in = 0
"""The pid that armed: a process forked from an armed one has the flag, not the thread."""


def arm(watch: int | None = None) -> None:
    """End this process (os._exit) when its parent, or `watch`, is gone.  Idempotent."""
    global _armed_in
    if _armed_in == os.getpid():
        return
    _armed_in = os.getpid()
    parent = os.getppid()

    def gone() -> bool:
        if os.getppid() != parent:
            return True
        if watch is None:
            return False
        try:
            os.kill(watch, 0)
        except ProcessLookupError:
            return True
        except PermissionError:
            return False
        return False

    def run() -> None:
        # Only sleep and getppid: the forkserver forks while this thread runs, and a lock
        # held here at that moment would stay held in the child.
        while not gone():
            time.sleep(POLL_S)
        os._exit(0)

    threading.Thread(target=run, daemon=True, name="paralab-lifeline").start()


RANK_NAME = "paralab-rank"


def name_process(name: str) -> None:
    """Linux: the name `ps`, `top` and psutil show for this process (15 bytes at most)."""
    with contextlib.suppress(Exception):
        import ctypes

        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(15, name.encode()[:15] + b"\0", 0, 0, 0)  # PR_SET_NAME


def helper(name: str, watch: int | None = None) -> None:
    """Initializer of a helper process (the prediction pool's): its name, and its lifeline."""
    name_process(name)
    arm(watch)


def _in_forkserver() -> bool:
    """Is this module being imported by multiprocessing's forkserver as one of its preloads?"""
    frame = sys._getframe(1)
    while frame is not None:
        if frame.f_code.co_name == "main" and frame.f_globals.get("__name__") == "multiprocessing.forkserver":
            return True
        frame = frame.f_back
    return False


if _in_forkserver():
    arm()
