"""The `paralab` command line: run, estimate, compare, devices, presets (and gui, replay, open,
added by paralab.gui).

Exit status: 0 finished, 1 the run failed (out of memory, crashed rank), 2 bad input
(the problem on stderr, no traceback), 130 stopped by Ctrl-C, 143 stopped by SIGTERM.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TextIO

from .config import ConfigError, RunConfig, field_docs, human_bytes

EXIT_OK, EXIT_FAILED, EXIT_BAD_INPUT = 0, 1, 2


class BadInput(Exception):
    """Raised for input problems; main() prints the sentence and exits 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # argparse's own errors: one line, exit 2
        raise BadInput(f"{message} (see paralab {self.prog.split()[-1]} --help)" if " " in self.prog else message)


def add_config_args(p: argparse.ArgumentParser, overrides: bool = True) -> None:
    src = p.add_mutually_exclusive_group()
    src.add_argument("--preset", metavar="NAME", help="start from a preset (see: paralab presets)")
    src.add_argument("--config", metavar="FILE", help="start from a TOML config file")
    if overrides:
        p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                       help="override a setting, e.g. --set train.lr=0.01; keys: "
                            + ", ".join(field_docs()))


def load_config(args: argparse.Namespace, check: bool = True) -> RunConfig:
    """The config an invocation names, overrides applied and checked (BadInput otherwise)."""
    from . import presets

    try:
        if getattr(args, "preset", None) is not None:
            cfg = presets.load(args.preset)
        elif getattr(args, "config", None):
            cfg = RunConfig.load(args.config)
        else:
            cfg = RunConfig()
        cfg = cfg.with_overrides(getattr(args, "overrides", []) or [])
    except ConfigError as e:
        raise BadInput(str(e)) from None
    from . import validation  # imports torch: not for --help

    problems = validation.problems(cfg) if check else []
    if problems:
        raise BadInput("\n".join(problems))
    return cfg


def build_parser(extra: dict[str, Callable[[argparse.ArgumentParser], None]] | None = None) -> argparse.ArgumentParser:
    parser = _Parser(prog="paralab", description="A desktop lab for multi-GPU parallelism in PyTorch.")
    sub = parser.add_subparsers(dest="command", parser_class=_Parser)
    for name, setup in (extra or {}).items():  # the setup's docstring is the command's help
        setup(sub.add_parser(name, help=(setup.__doc__ or "").strip() or None))
    p = sub.add_parser("run", help="train headless, printing progress and writing events")
    add_config_args(p)
    p.add_argument("--metrics", metavar="FILE.jsonl", help="write every event to this file as it happens")
    p.add_argument("--quiet", action="store_true", help="print only the result")
    p.add_argument("--listen", metavar="HOST:PORT",
                   help="start no ranks: wait for ranks that torchrun starts, on this or other machines, "
                        "to connect here (port 0 picks a free one; prints the torchrun command)")
    p.add_argument("--ranks", type=int, metavar="N", help="with --listen: how many ranks torchrun starts in all")
    p.add_argument("--save-state", metavar="DIR",
                   help="when the run finishes, save its weights and optimizer state there (for --resume)")
    p.add_argument("--resume", metavar="DIR",
                   help="go on from the state a run saved in DIR, in this config's layout (another mode or "
                        "device count: torch.distributed.checkpoint reshards it); train.steps counts from the start")
    p = sub.add_parser("estimate", help="predict each device's peak memory by category")
    add_config_args(p)
    p.add_argument("--json", action="store_true", help="print JSON")
    p.add_argument("--method", choices=("both", "formula", "trace"), default="both",
                   help="formula, trace one step on fake tensors, or both (default)")
    p = sub.add_parser("compare", help="compare 2 to 4 recorded runs (events files): loss, memory, speed, config")
    p.add_argument("files", nargs="+", metavar="RUN.jsonl", help="events files written by paralab run --metrics")
    p.add_argument("--png", metavar="FILE", help="also draw the comparison into this PNG")
    p.add_argument("--csv", metavar="FILE", help="write one row per run and device: its peak by category")
    p = sub.add_parser("devices", help="list the GPUs and what 'auto' means here")
    p.add_argument("--json", action="store_true", help="print JSON")
    sub.add_parser("presets", help="list the presets")
    return parser


PngRenderer = Callable[[list[Any], str], None]


def main(argv: list[str] | None = None,
         extra: dict[str, tuple[Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int]]] | None = None,
         default: str = "run", png: PngRenderer | None = None) -> int:
    """Entry point; `extra` adds subcommands (name: (set up parser, run)) from outside core,
    `png` draws `compare --png` (core has no Qt; paralab.gui passes its renderer)."""
    extra = extra or {}
    parser = build_parser({name: setup for name, (setup, _) in extra.items()})
    try:
        args = parser.parse_args(sys.argv[1:] if argv is None else argv)
        command = args.command or default
        if command in extra:
            return extra[command][1](args)
        if command == "run":
            return cmd_run(args)
        if command == "estimate":
            return cmd_estimate(args)
        if command == "compare":
            return cmd_compare(args, png)
        if command == "devices":
            return cmd_devices(args)
        if command == "presets":
            return cmd_presets(args)
        parser.print_help()
        return EXIT_BAD_INPUT
    except BadInput as e:
        for line in str(e).splitlines():
            print(f"paralab: {line}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:  # Ctrl-C before a run has its handlers (imports, checks)
        print("\nparalab: stopped before the run started", file=sys.stderr)
        return 130


# ---- run ---------------------------------------------------------------------------------------


def cmd_run(args: argparse.Namespace) -> int:
    from .events import MemorySample, RunEnded, RunStarted, StepDone
    from .run import Run, prewarm

    listen = args.listen
    if (listen is None) != (args.ranks is None):
        raise BadInput("--listen HOST:PORT and --ranks N go together: wait here for N ranks that torchrun starts")
    # Listening, the devices are the ranks' (checked by the Run), not this machine's.
    cfg = load_config(args, check=listen is None)
    if args.metrics is not None:  # '' included: a Run would take it for "no file"
        from .eventsfile import any_problem

        if problem := any_problem(args.metrics):
            raise BadInput(problem)
    try:  # checks what only a run needs (host memory, --metrics); starts nothing
        run = Run(cfg, metrics=args.metrics, listen=listen, ranks=args.ranks or 0,
                  resume=args.resume, save_at_end=args.save_state)
    except ConfigError as e:
        raise BadInput(str(e)) from None
    if listen is None:
        prewarm()  # only once the input is good: bad input starts nothing
    if run.listener is not None:
        from .remote import instructions

        print(instructions(run.listener.address, run.world, run.authkey, run.authkey_generated),
              file=sys.stderr, flush=True)
        run.listener.on_turned_away = lambda why: print(f"paralab: {why}", file=sys.stderr, flush=True)
    signals = {"count": 0, "code": 0}

    def on_signal(signum: int, _frame: Any) -> None:
        signals["count"] += 1
        signals["code"] = 128 + signum
        if signals["count"] > 1:
            raise KeyboardInterrupt
        print("\nparalab: stopping (press Ctrl-C again to stop at once)…", file=sys.stderr)
        run.stop()

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    progress = Progress(cfg, sys.stdout, quiet=args.quiet)
    ended: RunEnded | None = None
    host: dict[int, int] = {}  # placement.cpu_offload: each device's highest host bytes
    try:
        for event in run.events():
            if isinstance(event, StepDone):
                progress.step(event)
            elif isinstance(event, MemorySample) and event.host:
                host[event.device] = max(host.get(event.device, 0), sum(event.host.values()))
            elif isinstance(event, RunStarted):
                progress.start(event)
            elif isinstance(event, RunEnded):
                ended = event
    except KeyboardInterrupt:
        ended = run.ended
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    progress.close()
    code = _report(ended, signals["code"], args.metrics)
    if host:
        print("paralab: offloaded to host: " + ", ".join(f"device {d} {human_bytes(b)}" for d, b in sorted(host.items())),
              file=sys.stderr)
    if run.events_problem and (ended is None or run.events_problem not in ended.message):
        print(f"paralab: {run.events_problem}", file=sys.stderr)  # noticed only as the file closed
        return EXIT_FAILED if code == EXIT_OK else code
    return code


def _host(e: Any) -> float:
    return e.host_s if e.host_s is not None else e.time_s


def _report(ended: Any, signal_code: int, metrics: str | None) -> int:
    where = f" (events in {metrics})" if metrics else ""
    if ended is None or ended.status == "stopped":
        print(f"paralab: stopped after step {ended.steps if ended else 0}{where}", file=sys.stderr)
        return signal_code or 130
    if ended.status == "ok":
        print(f"paralab: {ended.message} in {ended.time_s:.1f} s{where}", file=sys.stderr)
        return EXIT_OK
    print(f"paralab: run failed ({ended.status}): {ended.message}{where}", file=sys.stderr)
    return EXIT_FAILED


class Progress:
    """A progress bar on a terminal, plain lines (one a second at most) otherwise.  Pace and
    ETA are the host's; step times and samples/s are in the run's clock, which on simulated
    devices with a GPU model is the modelled one (the first line says so)."""

    def __init__(self, cfg: RunConfig, out: TextIO, quiet: bool = False) -> None:
        self.total = cfg.train.steps
        self.out = out
        self.quiet = quiet
        self.tty = out.isatty()
        self.last_print = -1e9
        self.last: Any = None
        self.first: Any = None
        self.modelled = False
        self.tokens = cfg.model.seq_len if cfg.model.kind == "transformer" else 0
        """Tokens per sample (a transformer's sequence), for tokens/s."""

    def start(self, e: Any) -> None:
        """The run's clock, said once: what its times are."""
        self.modelled = e.clock.startswith("modelled")
        if self.modelled and not self.quiet:
            self.out.write(f"clock: {e.clock} (step times and samples/s as that GPU would take them; "
                           "the host's time is in each step event's host_s)\n")
            self.out.flush()

    def step(self, e: Any) -> None:
        self.last = e
        self.first = self.first or e
        if self.quiet:
            return
        now = _host(e)
        if self.tty:
            if now - self.last_print >= 0.1 or e.step == self.total:
                self.last_print = now
                self.out.write("\r" + self.line(e, bar=True) + "\x1b[K")
                self.out.flush()
        elif now - self.last_print >= 1.0 or e.step == self.total:
            self.last_print = now
            self.out.write(self.line(e, bar=False) + "\n")
            self.out.flush()

    def line(self, e: Any, bar: bool) -> str:
        frac = e.step / self.total
        span = _host(e) - _host(self.first)
        steps_per_s = (e.step - self.first.step) / span if span > 0 else 0.0
        eta = f"{(self.total - e.step) / steps_per_s:.0f} s" if steps_per_s > 0 else "…"
        loss = f"{e.loss:.4g}" if e.loss == e.loss else "nan"
        drawn = ""
        if bar:
            filled = int(frac * 24)
            drawn = "▕" + "█" * filled + "░" * (24 - filled) + "▏ "
        clock = " (modelled)" if self.modelled else ""
        tokens = f" {_si(e.samples_per_s * self.tokens)} tokens/s" if self.tokens else ""
        return (f"step {e.step:>{len(str(self.total))}}/{self.total} {drawn}loss {loss}  "
                f"{_si(e.samples_per_s)} samples/s{tokens}{clock}  ETA {eta}")

    def close(self) -> None:
        if self.tty and not self.quiet and self.last is not None:
            self.out.write("\n")
            self.out.flush()


def _si(x: float) -> str:
    for unit, size in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if x >= size:
            return f"{x / size:.1f}{unit}"
    return f"{x:.0f}"


# ---- estimate ----------------------------------------------------------------------------------


def cmd_estimate(args: argparse.Namespace) -> int:
    from .estimate import EstimateError, estimate

    cfg = load_config(args)
    try:
        result = estimate(cfg, method=args.method)
    except ConfigError as e:
        raise BadInput(str(e)) from None
    except EstimateError as e:  # --method trace alone, and the trace could not run
        print(f"paralab: {e}", file=sys.stderr)
        return EXIT_FAILED
    if args.json:
        print(json.dumps(result.to_json(), indent=2))
    else:
        print(result.table())
    return EXIT_OK


# ---- compare -----------------------------------------------------------------------------------


def cmd_compare(args: argparse.Namespace, png: PngRenderer | None) -> int:
    from .compare import CompareError, load_runs, table, write_csv

    if args.png and png is None:
        raise BadInput("--png draws with the app's plotting library: run it as `paralab compare`")
    for option in ("csv", "png"):
        target = getattr(args, option)
        if target is not None and (not target or Path(target).is_dir()):
            raise BadInput(f"--{option} takes a file name, e.g. compare.{option}")
    try:
        runs = load_runs(args.files)
    except CompareError as e:
        raise BadInput(str(e)) from None
    print(table(runs))
    try:
        if args.csv:
            with open(args.csv, "w", newline="", encoding="utf-8") as f:
                write_csv(runs, f)
            print(f"paralab: per-device peaks written to {args.csv}", file=sys.stderr)
        if args.png:
            png(runs, args.png)
            print(f"paralab: comparison drawn in {args.png}", file=sys.stderr)
    except OSError as e:
        raise BadInput(f"cannot write {e.filename or 'the output'}: {e.strerror or e}") from None
    return EXIT_OK


# ---- devices and presets ----------------------------------------------------------------------


def cmd_devices(args: argparse.Namespace) -> int:
    from . import nvml
    from .devices import resolve

    gpus = nvml.list_gpus()
    auto = resolve("auto", RunConfig().sim.memory, gpus)
    if args.json:
        print(json.dumps({
            "gpus": [{"index": g.index, "name": g.name, "total_bytes": g.total_bytes} for g in gpus],
            "nvml": None if nvml.available() else nvml.unavailable_reason(),
            "auto": [d.label for d in auto],
        }, indent=2))
        return EXIT_OK
    if gpus:
        for g in gpus:
            print(f"cuda:{g.index}  {g.name}  {human_bytes(g.total_bytes)}")
    else:
        print(f"no GPU: {nvml.unavailable_reason() or 'NVML sees none'}")
    print(f"auto = {', '.join(d.label for d in auto)}" + ("" if gpus else " (simulated, computing on the CPU)"))
    return EXIT_OK


def cmd_presets(_args: argparse.Namespace) -> int:
    from . import presets

    for name in presets.names():
        cfg = presets.load(name)
        print(f"{name:24s} {cfg.mode:16s} {cfg.name}")
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
