"""The `paralab` console script: core's CLI plus the `gui` command (the default).

Qt is imported only when the app is opened, so `paralab run` never loads it."""

from __future__ import annotations

import argparse
import sys

from ..core import cli


def _setup(p: argparse.ArgumentParser) -> None:
    cli.add_config_args(p, overrides=True)
    p.add_argument("--start", action="store_true", help="start the run at launch (demo mode)")


def _run(args: argparse.Namespace) -> int:
    from .app import main as app_main

    # The bare `paralab` command opens the app without the gui subcommand's arguments.
    named = any(getattr(args, name, None) for name in ("preset", "config", "overrides"))
    cfg = cli.load_config(args) if named else None
    return app_main(cfg, start=getattr(args, "start", False))


def _png(runs: list, path: str) -> None:
    from .compare_view import render_png

    render_png(runs, path)


def main(argv: list[str] | None = None) -> int:
    return cli.main(argv, extra={"gui": (_setup, _run)}, default="gui", png=_png)


if __name__ == "__main__":
    sys.exit(main())
