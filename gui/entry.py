"""The `paralab` console script: core's CLI plus the `gui` command (the default).

Qt is imported only when the app is opened, so `paralab run` never loads it."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from ..core import cli


def _setup(p: argparse.ArgumentParser) -> None:
    """open the app (the default command)"""
    cli.add_config_args(p, overrides=True)
    p.add_argument("--start", action="store_true", help="start the run at launch (demo mode)")
    p.add_argument("--lesson", metavar="NAME",
                   help="open a lesson at its first step (the Lessons menu lists them)")


def _run(args: argparse.Namespace) -> int:
    from .app import main as app_main

    # The bare `paralab` command opens the app without the gui subcommand's arguments.
    named = any(getattr(args, name, None) for name in ("preset", "config", "overrides"))
    lesson = _lesson(args, named)
    cfg = cli.load_config(args) if named else None
    return app_main(cfg, start=getattr(args, "start", False), lesson=lesson)


def _lesson(args: argparse.Namespace, named: bool) -> Any:
    """The lesson --lesson names, loaded and checked before any window opens (exit 2 otherwise)."""
    name = getattr(args, "lesson", None)
    if name is None:
        return None
    if named:
        raise cli.BadInput("--lesson brings its own settings; leave out --preset, --config and --set")
    from ..core import lessons
    from ..core.config import ConfigError

    try:
        return lessons.load(name)
    except ConfigError as e:
        raise cli.BadInput(str(e)) from None


def _setup_replay(p: argparse.ArgumentParser) -> None:
    """play a recorded events file in the app: pause, scrub, faster or slower"""
    p.add_argument("file", metavar="RUN.jsonl", help="an events file written by paralab run --metrics (or the app)")
    p.add_argument("--speed", type=float, default=1.0, metavar="N",
                   help="play N times as fast as recorded (default 1; 0.5 is half speed)")


def _run_replay(args: argparse.Namespace) -> int:
    from ..core.compare import CompareError, read_file

    if not args.speed > 0:
        raise cli.BadInput(f"--speed must be more than 0, not {args.speed:g}")
    try:  # read before the window opens: a bad file is a sentence on stderr, exit 2
        events = read_file(args.file)
    except CompareError as e:
        raise cli.BadInput(str(e)) from None
    from pathlib import Path

    from .app import main as app_main

    return app_main(None, replay=(events, args.speed, Path(args.file).name))


def _setup_open(p: argparse.ArgumentParser) -> None:
    """open a session file in the app: its settings and its recorded run"""
    p.add_argument("file", metavar="FILE", help="a session file saved with File › Save session…")


def _run_open(args: argparse.Namespace) -> int:
    from ..core.session import SessionError, load

    try:  # checked before the window opens: a bad file is a sentence on stderr, exit 2
        load(args.file)
    except SessionError as e:
        raise cli.BadInput(str(e)) from None
    from .app import main as app_main

    return app_main(None, session=args.file)


def _png(runs: list, path: str) -> None:
    from .compare_view import render_png

    render_png(runs, path)


def main(argv: list[str] | None = None) -> int:
    return cli.main(argv, extra={"gui": (_setup, _run), "replay": (_setup_replay, _run_replay),
                                   "open": (_setup_open, _run_open)}, default="gui", png=_png)


if __name__ == "__main__":
    sys.exit(main())
