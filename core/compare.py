"""Compare recorded runs: what each one learned, held and cost, and how their configs differ.

A run is read from its events file (or from events already in memory, as the app holds
them): the `start` event carries the config, `step` events the loss and the rate, and
`memory` events each device's bytes by category at its step's highest total.  No Qt here:
the CLI prints and writes CSV from these figures, gui/compare_view.py draws them.
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from .config import field_docs, human_bytes
from .events import CATEGORIES, MemorySample, PhaseSpan, RunEnded, RunStarted, StepDone, from_dict

MIN_RUNS, MAX_RUNS = 2, 4
MAX_LINE = 1 << 24
"""No event line is near this long (16 MiB); a longer one is another kind of file."""
LETTERS = "ABCD"
IGNORED_KEYS = ("name", "description")
"""Titles, not settings: two runs of one preset under other names still train alike."""
CSV_COLUMNS = ["run", "file", "mode", "devices", "device", "label", "peak_bytes", *CATEGORIES,
               "capacity_bytes", "step", "phase", "op", "final_loss", "min_loss", "mean_step_s",
               "samples_per_s", "clock", "status"]


class CompareError(ValueError):
    """A file that cannot be compared; the message is a sentence for a person."""


@dataclass
class DevicePeak:
    """One device at its peak: the memory sample with the highest total of the run."""

    device: int
    label: str
    peak_bytes: int
    """The highest total the run reported for this device (its peak_bytes)."""
    bytes: dict[str, int]
    """By category, in the sample whose total was highest."""
    capacity_bytes: int
    step: int
    phase: str = ""
    op: str = ""


@dataclass
class RunSummary:
    name: str
    """'A', 'B'…: how the table and the plots call the run."""
    source: str
    """The events file, or what the run was in the app."""
    start: RunStarted
    steps: list[int] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    peaks: list[DevicePeak] = field(default_factory=list)
    end: RunEnded | None = None
    mean_step_s: float | None = None
    """Mean time per step in the run's clock (`clock`)."""
    samples_per_s: float | None = None
    timeline_step: int = 0
    """The step `timeline` shows: the last one whose phases were sampled."""
    timeline: list[tuple[int, str, float, float]] = field(default_factory=list)
    """(device, phase, start_s, end_s) of that step in the run's clock, from its first span."""

    @property
    def config(self) -> dict[str, Any]:
        return self.start.config

    @property
    def clock(self) -> str:
        return self.start.clock

    @property
    def final_loss(self) -> float | None:
        return self.losses[-1] if self.losses else None

    @property
    def min_loss(self) -> float | None:
        finite = [x for x in self.losses if math.isfinite(x)]
        return min(finite) if finite else None

    @property
    def status(self) -> str:
        return self.end.status if self.end else "unfinished"


# ---- reading --------------------------------------------------------------------------------


def read_file(path: str | Path) -> list:
    """The events of an events file, or CompareError saying why it is not one."""
    path = Path(path)
    if not path.exists():
        raise CompareError(f"{path} does not exist")
    if not path.is_file():
        raise CompareError(f"{path} is not a file; give an events file written by paralab run --metrics")
    events: list = []
    try:
        with open(path, encoding="utf-8") as f:
            # Lines are read at most MAX_LINE at a time: a huge file with no newline is not
            # swallowed whole (its first piece fails to parse and ends the reading).
            for n, line in enumerate(iter(lambda: f.readline(MAX_LINE), ""), 1):
                line = line.strip()
                if not line:
                    continue
                try:
                    events.append(from_dict(json.loads(line)))
                except (json.JSONDecodeError, KeyError, TypeError, AttributeError, RecursionError, ValueError):
                    if n == 1:  # a torn line later is a crash's trace; a bad first line is another file
                        break
    except UnicodeDecodeError:
        events = []
    except OSError as e:
        raise CompareError(f"cannot read {path}: {e.strerror or e}") from None
    if not events or not isinstance(events[0], RunStarted):
        raise CompareError(f"{path} is not a paralab events file (its first line is not a 'start' event)")
    return events


def summarize(events: Iterable, name: str, source: str = "") -> RunSummary:
    """Figures of one run from its events (the first must be its `start`)."""
    it = iter(events)
    start = next(it)
    if not isinstance(start, RunStarted):
        raise CompareError(f"{source or name} does not begin with a 'start' event")
    run = RunSummary(name, source, start)
    labels = {int(d.get("index", i)): str(d.get("label", f"device {i}")) for i, d in enumerate(start.devices)}
    batch = int(start.config.get("train", {}).get("batch_size", 0) or 0)
    best: dict[int, MemorySample] = {}
    highest: dict[int, int] = {}
    step_time = counted = 0.0
    previous = 0
    # The run's own clock: a simulated GPU's modelled spans where there are some.
    clock = "host" if start.clock == "host" else "modelled"
    spans: dict[int, list[PhaseSpan]] = {}
    for e in it:
        if isinstance(e, StepDone):
            run.steps.append(e.step)
            run.losses.append(float("nan") if e.loss is None else float(e.loss))
            # One step line may stand for several steps (log_every, long runs' summaries).
            n = max(e.step - previous, 1)
            previous = e.step
            if e.samples_per_s and e.samples_per_s > 0 and batch:
                step_time += n * batch / e.samples_per_s
                counted += n
        elif isinstance(e, MemorySample):
            total = sum(e.bytes.values())
            if e.device not in best or total > sum(best[e.device].bytes.values()):
                best[e.device] = e
            highest[e.device] = max(highest.get(e.device, 0), int(e.peak_bytes))
        elif isinstance(e, PhaseSpan) and e.clock == clock:
            spans.setdefault(e.step, []).append(e)
        elif isinstance(e, RunEnded):
            run.end = e
    if spans:
        run.timeline_step = max(spans)
        shown = spans[run.timeline_step]
        t0 = min(s.start_s for s in shown)
        run.timeline = [(s.device, s.phase, s.start_s - t0, s.end_s - t0) for s in shown]
    for device in sorted(best):
        s = best[device]
        run.peaks.append(DevicePeak(device, labels.get(device, f"device {device}"), highest[device],
                                    {c: int(s.bytes.get(c, 0)) for c in CATEGORIES}, int(s.capacity_bytes),
                                    s.step, s.phase, s.op))
    if counted:
        run.mean_step_s = step_time / counted
        run.samples_per_s = batch / run.mean_step_s
    return run


def load_runs(paths: list[str | Path]) -> list[RunSummary]:
    if not MIN_RUNS <= len(paths) <= MAX_RUNS:
        raise CompareError(f"compare takes {MIN_RUNS} to {MAX_RUNS} events files, not {len(paths)}")
    return [summarize(read_file(p), LETTERS[i], str(p)) for i, p in enumerate(paths)]


# ---- what differs ---------------------------------------------------------------------------


def flatten(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in config.items():
        if isinstance(value, dict):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _shown(value: Any) -> str:
    if isinstance(value, list):
        return ",".join(str(v) for v in value) or "(even)"
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def differences(base: dict[str, Any], other: dict[str, Any]) -> list[str]:
    """What `other` sets differently from `base`, in the order of RunConfig's fields:
    ["mode fsdp instead of ddp", "devices sim:4 instead of sim:2"]."""
    a, b = flatten(base), flatten(other)
    order = list(field_docs())
    keys = [k for k in order if k in a or k in b] + sorted((set(a) | set(b)) - set(order))
    out = []
    for key in keys:
        if key in IGNORED_KEYS or a.get(key) == b.get(key):
            continue
        if key not in a or key not in b:
            out.append(f"{key} {_shown(b[key]) if key in b else 'unset'}"
                       f" ({'not in' if key not in a else 'only in'} the first run's config)")
        else:
            out.append(f"{key} {_shown(b[key])} instead of {_shown(a[key])}")
    return out


def differences_text(runs: list[RunSummary]) -> list[str]:
    """One sentence per run after the first: 'B: mode fsdp instead of ddp; …'."""
    base = runs[0]
    lines = []
    for run in runs[1:]:
        diff = differences(base.config, run.config)
        lines.append(f"{run.name}: " + ("; ".join(diff) if diff else f"the same config as {base.name}"))
    return lines


def doc(key: str) -> str:
    """The config field's docstring (for tooltips next to a difference)."""
    return field_docs().get(key, "")


# ---- output ---------------------------------------------------------------------------------


def _num(x: float | None, fmt: str = "{:.4g}") -> str:
    return "–" if x is None or not math.isfinite(x) else fmt.format(x)


def table(runs: list[RunSummary]) -> str:
    """The comparison as text: one line per run, one per device, then the differences."""
    lines = [f"{'run':4} {'mode':15} {'devices':10} {'steps':>5} {'final loss':>10} {'min loss':>10} "
             f"{'step time':>11} {'samples/s':>10}  status   file"]
    for r in runs:
        step = _num(None if r.mean_step_s is None else r.mean_step_s * 1e3, "{:.3g} ms")
        lines.append(f"{r.name:4} {r.start.mode:15} {str(r.config.get('devices', '')):10} "
                     f"{(r.steps[-1] if r.steps else 0):>5} {_num(r.final_loss):>10} {_num(r.min_loss):>10} "
                     f"{step:>11} {_num(r.samples_per_s, '{:,.0f}'):>10}  {r.status:8} {r.source}")
    clocks = sorted({r.clock for r in runs})
    lines.append(f"(times in the run's clock: {'; '.join(clocks)})")
    lines.append("")
    lines.append("peak memory per device, by category, at the moment of its highest total:")
    lines.append(f"{'run':4} {'device':8} {'peak':>10} " + " ".join(f"{c:>11}" for c in CATEGORIES))
    for r in runs:
        for p in r.peaks:
            lines.append(f"{r.name:4} {p.label:8} {human_bytes(p.peak_bytes):>10} "
                         + " ".join(f"{human_bytes(p.bytes[c]):>11}" for c in CATEGORIES))
    lines.append("")
    lines.append(f"what differs from {runs[0].name}:")
    lines.extend(f"  {line}" for line in differences_text(runs))
    return "\n".join(lines)


def csv_rows(runs: list[RunSummary]) -> list[dict[str, Any]]:
    rows = []
    for r in runs:
        for p in r.peaks:
            rows.append({"run": r.name, "file": r.source, "mode": r.start.mode, "devices": r.config.get("devices", ""),
                         "device": p.device, "label": p.label, "peak_bytes": p.peak_bytes, **p.bytes,
                         "capacity_bytes": p.capacity_bytes, "step": p.step, "phase": p.phase, "op": p.op,
                         "final_loss": r.final_loss, "min_loss": r.min_loss, "mean_step_s": r.mean_step_s,
                         "samples_per_s": r.samples_per_s, "clock": r.clock, "status": r.status})
    return rows


def write_csv(runs: list[RunSummary], out: TextIO) -> None:
    w = csv.DictWriter(out, CSV_COLUMNS)
    w.writeheader()
    w.writerows(csv_rows(runs))
