"""A session file: the settings of a lab session, and optionally the run it recorded.

One JSON document, so it can be mailed, versioned and opened on another machine:

    {"format": "paralab-session", "version": 1,
     "config": {... RunConfig.to_dict(), the seed included ...},
     "events": [{"event": "start", ...}, ...],        (optional: a recorded run)
     "lesson": {"name": "pipeline-bubble", "step": 2}}  (optional: where a lesson was)

The config is what the form held when it was saved; the events carry their own config in
their `start` (the run may have been made before the last change to the form).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .config import ConfigError, RunConfig
from .events import RunStarted, from_dict, to_json

FORMAT = "paralab-session"
VERSION = 1
MAX_BYTES = 1 << 30
"""A session holds a config and at most one run's events: larger is something else."""


class SessionError(ValueError):
    """A file that is not a session paralab can open; the message is a sentence."""


@dataclass
class Session:
    config: RunConfig
    events: list | None = None
    """A recorded run (its first event the `start`), or None."""
    lesson: tuple[str, int] | None = None
    """(lesson name, step index) of the lesson open when it was saved, or None."""

    @property
    def seed(self) -> int:
        return self.config.seed


def save(path: str | Path, config: RunConfig, events: list | None = None,
         lesson: tuple[str, int] | None = None) -> None:
    """Write a session file (OSError if it cannot be written)."""
    doc: dict[str, Any] = {"format": FORMAT, "version": VERSION, "config": config.to_dict()}
    if lesson:
        doc["lesson"] = {"name": lesson[0], "step": lesson[1]}
    if events:
        doc["events"] = [json.loads(to_json(e)) for e in events]  # to_json writes a NaN loss as null
    text = json.dumps(doc, separators=(",", ":"))
    Path(path).write_text(text + "\n", encoding="utf-8")


def load(path: str | Path) -> Session:
    """Read a session file; SessionError with a sentence when it cannot be."""
    path = Path(path)
    if path.is_dir():
        raise SessionError(f"{path} is a folder; give a session file (.json)")
    if path.exists() and not path.is_file():  # /dev/zero, a pipe: it would never end
        raise SessionError(f"{path} is not a file; give a session file (.json)")
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_BYTES + 1)
    except FileNotFoundError:
        raise SessionError(f"{path} does not exist") from None
    except OSError as e:
        raise SessionError(f"cannot read {path}: {e.strerror or e}") from None
    if len(raw) > MAX_BYTES:
        raise SessionError(f"{path} is larger than {MAX_BYTES >> 20} MiB: not a paralab session")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise SessionError(f"{path} is not a paralab session (it is not text)") from None
    try:
        doc = json.loads(text)
    except (ValueError, RecursionError):  # JSONDecodeError is a ValueError
        doc = None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        if text.lstrip().startswith('{"event":"start"'):  # a run's events file, not a session
            raise SessionError(f"{path} is an events file, not a session: play it with paralab replay {path}")
        raise SessionError(f"{path} is not a paralab session (saved with File › Save session…)")
    if not isinstance(doc.get("version"), int) or doc["version"] > VERSION:
        raise SessionError(f"{path} was saved by a newer paralab (session version {doc.get('version')!r})")
    try:
        config = RunConfig.from_dict(doc.get("config") or {})
    except ConfigError as e:
        raise SessionError(f"{path}: {e}") from None
    lesson = _lesson(doc.get("lesson"), path)
    events = doc.get("events")
    if events is None:
        return Session(config, lesson=lesson)
    try:
        parsed = [from_dict(e) for e in events]
    except (KeyError, TypeError, AttributeError, ValueError):
        raise SessionError(f"{path}: its recorded run cannot be read (an event is damaged)") from None
    if not parsed or not isinstance(parsed[0], RunStarted):
        raise SessionError(f"{path}: its recorded run does not begin with a 'start' event")
    return Session(config, parsed, lesson)


def _lesson(entry: Any, path: Path) -> tuple[str, int] | None:
    if entry is None:
        return None
    if (not isinstance(entry, dict) or not isinstance(entry.get("name"), str)
            or not isinstance(entry.get("step"), int) or isinstance(entry.get("step"), bool) or entry["step"] < 0):
        raise SessionError(f"{path}: its lesson entry is damaged (it needs a lesson name and a step from 0)")
    return entry["name"][:200], entry["step"]
