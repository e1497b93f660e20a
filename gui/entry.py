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

    cfg = cli.load_config(args) if (args.preset or args.config or args.overrides) else None
    return app_main(cfg, start=args.start)


def main(argv: list[str] | None = None) -> int:
    return cli.main(argv, extra={"gui": (_setup, _run)}, default="gui")


if __name__ == "__main__":
    sys.exit(main())
