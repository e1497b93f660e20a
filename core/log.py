"""Where the full traceback goes when a failure reaches the person as one sentence.

The person sees the sentence (a banner, stderr, the events file's `end`); the traceback
behind it is appended to a log file, so whoever debugs can read what the sentence
summed up: $PARALAB_LOG, or ~/.cache/paralab/paralab.log.  Ranks append to the same
file.  Logging never fails a run: a file that cannot be opened is skipped.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

_logger = logging.getLogger("paralab")
_logger.addHandler(logging.NullHandler())  # never Python's last-resort handler on stderr
_opened: str | None = None


def path() -> Path:
    return Path(os.environ.get("PARALAB_LOG") or Path.home() / ".cache" / "paralab" / "paralab.log")


def failure(sentence: str, exc: BaseException) -> None:
    """Log `sentence` with the full traceback of `exc`."""
    _open()
    _logger.error(sentence, exc_info=(type(exc), exc, exc.__traceback__))


def _open() -> None:
    global _opened
    target = str(path())
    if _opened == target:
        return
    for h in [h for h in _logger.handlers if isinstance(h, logging.FileHandler)]:
        _logger.removeHandler(h)
        h.close()
    try:
        Path(target).parent.mkdir(parents=True, exist_ok=True)
        handler = logging.FileHandler(target, encoding="utf-8", delay=True)
    except OSError:
        return
    handler.setFormatter(logging.Formatter("%(asctime)s pid %(process)d %(levelname)s %(message)s"))
    _logger.addHandler(handler)
    _logger.setLevel(logging.INFO)
    _opened = target
