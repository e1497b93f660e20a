"""The events file (.jsonl) of a run: written as events arrive, never the cause of a hang.

A write that fails (disk full, the file's disk gone) does not raise into the run: the
file keeps every whole line written before it (a torn last line is cut off), `problem`
says what happened in a sentence, and the run ends with it (core.run).  A file deleted
while the run goes on is noticed the same way: its later lines would go nowhere.

Long runs stay bounded: after FULL_STEPS step lines, step events are summarised, one
line per SUMMARY_S of the host's time, carrying the interval's `first_step` and
`loss_min` / `loss_mean` / `loss_max` beside the last step's fields.
"""

from __future__ import annotations

import errno
import json
import math
import os
from collections.abc import Iterable
from pathlib import Path
from time import monotonic

from .events import Event, RunEnded, StepDone, to_dict, to_json

FULL_STEPS = 10_000
"""Step lines written one per step before the file switches to summaries."""
SUMMARY_S = 1.0
"""Past FULL_STEPS: one step line per this many seconds, summarising the steps in it."""
DELETED_CHECK_S = 1.0


class EventsFile:
    """Appends events to a .jsonl file.  Opening it raises OSError (the caller says so);
    writing never does: check `problem` after each write."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._fd: int | None = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        self.problem = ""
        """Empty while every line reached the file; else why the rest did not."""
        self._good = 0
        """Bytes of whole lines in the file."""
        self.step_lines = 0
        self._interval: list[StepDone] = []
        self._interval_started = 0.0
        self._checked_at = monotonic()

    def write(self, events: Iterable[Event]) -> None:
        if self._fd is None:
            return
        lines = []
        for e in events:
            if isinstance(e, StepDone):
                lines.extend(self._step(e))
            elif isinstance(e, RunEnded) and self._interval:  # the steps held back come first
                lines.extend([self._summary(), to_json(e)])
            else:
                lines.append(to_json(e))
        if lines:
            self._append(("\n".join(lines) + "\n").encode())
        if self._fd is not None and monotonic() - self._checked_at > DELETED_CHECK_S:
            self._check_deleted()

    def close(self) -> None:
        if self._fd is not None:
            self._check_deleted()
        if self._fd is not None:
            fd, self._fd = self._fd, None
            try:
                os.close(fd)
            except OSError as e:  # NFS and friends report a failed write at close
                self._fail(e)

    # ---- internals ------------------------------------------------------------------------------

    def _step(self, e: StepDone) -> list[str]:
        if self.step_lines < FULL_STEPS:
            self.step_lines += 1
            return [to_json(e)]
        now = monotonic()
        if not self._interval:
            self._interval_started = now
        self._interval.append(e)
        if now - self._interval_started < SUMMARY_S:
            return []
        return [self._summary()]

    def _summary(self) -> str:
        steps, self._interval = self._interval, []
        self.step_lines += 1
        last = to_dict(steps[-1])
        finite = [s.loss for s in steps if math.isfinite(s.loss)]
        last.update(first_step=steps[0].step,
                    loss_min=min(finite) if finite else None,
                    loss_mean=sum(finite) / len(finite) if finite else None,
                    loss_max=max(finite) if finite else None)
        if not math.isfinite(last["loss"]):
            last["loss"] = None
        return json.dumps({k: (None if isinstance(v, float) and not math.isfinite(v) else v)
                           for k, v in last.items()}, separators=(",", ":"))

    def _append(self, data: bytes) -> None:
        fd = self._fd
        assert fd is not None
        view = memoryview(data)
        try:
            while view:
                n = self._write_some(fd, view)
                if n <= 0:
                    raise OSError(errno.EIO, "nothing was written")
                view = view[n:]
            self._good += len(data)
        except OSError as e:
            self._fail(e)

    @staticmethod
    def _write_some(fd: int, data: memoryview) -> int:
        return os.write(fd, data)  # one place to fail in tests (a full disk)

    def _check_deleted(self) -> None:
        self._checked_at = monotonic()
        try:
            gone = os.fstat(self._fd).st_nlink == 0
        except OSError:
            gone = False
        if gone:
            self.problem = (f"the events file {self.path} was deleted while the run went on: "
                            "its events after that are lost")
            self._drop()

    def _fail(self, e: OSError) -> None:
        if e.errno == errno.ENOSPC:
            why = "the disk is full"
        elif e.errno == errno.EDQUOT:
            why = "the disk quota is used up"
        else:
            why = e.strerror or str(e)
        self.problem = (f"cannot write the events file {self.path}: {why}; "
                        "it keeps every line written before")
        if self._fd is not None:
            try:  # cut a torn line: every line left in the file is whole
                os.ftruncate(self._fd, self._good)
            except OSError:
                pass
            self._drop()

    def _drop(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            try:
                os.close(fd)
            except OSError:
                pass


def any_problem(path: str | Path) -> str:
    """Why `path` cannot be an events file ('' when it can be created and written): checked
    before a run starts, so a bad --metrics is a sentence, not a traceback."""
    path = Path(path)
    if path.exists() and not path.is_file() and not path.is_dir() and str(path) != os.devnull:
        return f"--metrics {path} is not a regular file; give a file name, e.g. events.jsonl"
    if path.is_dir():
        return f"--metrics {path} is a directory; give a file name, e.g. {path / 'events.jsonl'}"
    parent = path.parent
    if not parent.exists():
        try:
            parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            return f"cannot create the folder for --metrics {path}: {e.strerror or e}"
    if not parent.is_dir():
        return f"--metrics {path}: {parent} is not a folder"
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    except OSError as e:
        return f"cannot write --metrics {path}: {e.strerror or e}"
    os.close(fd)
    return ""
