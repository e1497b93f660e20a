"""Typed events: what a run tells the world.

They are small picklable dataclasses that cross process boundaries, and each turns
into one JSON object per line with an "event" field (the events-file contract).
Times (`time_s`, `start_s`, `end_s`) are seconds since the run started.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, ClassVar, TextIO

CATEGORIES = ("params", "grads", "optimizer", "activations", "temporaries", "other")
PHASES = ("forward", "backward", "recompute", "optimizer", "communication", "idle")
"""recompute: a checkpointed block run again inside backward (train.activation_checkpointing)."""
END_STATUSES = ("ok", "oom", "error", "stopped")


@dataclass(slots=True)
class RunStarted:
    kind: ClassVar[str] = "start"
    mode: str
    devices: list[dict[str, Any]]
    """One entry per logical device: index, label, kind, capacity_bytes, description."""
    config: dict[str, Any]
    world_size: int = 1
    params: int = 0
    time: float = 0.0
    """Wall-clock start (Unix time)."""
    clock: str = "host"
    """Which clock the run's times are in: 'host', or e.g. 'modelled: 2 × H100 SXM over NVLink 4'."""
    gpu: dict[str, Any] = field(default_factory=dict)
    """The GPU model's figures when the clock is modelled."""
    first_step: int = 1
    """Above 1: this run goes on from another layout's, switched after step first_step - 1."""


@dataclass(slots=True)
class StepDone:
    kind: ClassVar[str] = "step"
    step: int
    loss: float
    time_s: float
    samples_per_s: float
    """In the run's clock (modelled on simulated devices with a GPU model)."""
    lr: float = 0.0
    modelled_s: float | None = None
    """Simulated devices with a GPU model: the modelled clock at the end of this step."""
    host_s: float | None = None
    """The host's time (time_s is the run's clock: the modelled one when there is one)."""


@dataclass(slots=True)
class MemorySample:
    kind: ClassVar[str] = "memory"
    step: int
    device: int
    bytes: dict[str, int]
    """By category, at the moment of this step's highest total."""
    peak_bytes: int
    """The highest total of the run so far."""
    capacity_bytes: int
    time_s: float = 0.0
    phase: str = ""
    """The phase in which this step's highest total was reached."""
    op: str = ""
    """Simulated devices: the operation whose allocation reached it (e.g. 'mm')."""
    extra: dict[str, int] = field(default_factory=dict)
    """CUDA only: reserved, non_torch (NVML used - reserved)."""
    host: dict[str, int] = field(default_factory=dict)
    """placement.cpu_offload: what this device keeps in host memory instead (its parameter
    shards, their gradients, the optimizer state, the optimizer step's scratch), by the same
    categories, at the host's highest this step; not in `bytes` or `peak_bytes`.  Empty when
    nothing is offloaded."""


@dataclass(slots=True)
class UtilizationSample:
    kind: ClassVar[str] = "utilization"
    device: int
    percent: float | None
    time_s: float = 0.0
    source: str = ""
    """'nvml' (share of time a kernel ran), 'spans' (share of time computing), 'cpu'."""
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass(slots=True)
class PhaseSpan:
    kind: ClassVar[str] = "span"
    device: int
    phase: str
    start_s: float
    end_s: float
    step: int = 0
    clock: str = "host"
    """'host' (measured) or 'modelled'; a simulated device with a GPU model sends both."""
    bytes: int = 0
    """Communication: the message size."""
    name: str = ""
    """Communication: the collective (all-reduce, all-gather, reduce-scatter, send, recv, copy)."""


@dataclass(slots=True)
class RunEnded:
    kind: ClassVar[str] = "end"
    status: str
    message: str = ""
    device: int | None = None
    time_s: float = 0.0
    steps: int = 0
    """Steps completed."""
    phase: str = ""
    """Where it failed, for oom and error."""


Event = RunStarted | StepDone | MemorySample | UtilizationSample | PhaseSpan | RunEnded
EVENT_TYPES: dict[str, type] = {t.kind: t for t in (RunStarted, StepDone, MemorySample, UtilizationSample, PhaseSpan, RunEnded)}


def to_dict(event: Event) -> dict[str, Any]:
    return {"event": event.kind, **asdict(event)}


def from_dict(data: dict[str, Any]) -> Event:
    cls = EVENT_TYPES[data["event"]]
    names = {f.name for f in fields(cls)}
    return cls(**{k: v for k, v in data.items() if k in names})


def _clean(value: Any) -> Any:
    # JSON has no NaN or Infinity; a diverged loss is written as null.
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_clean(v) for v in value]
    return value


def to_json(event: Event) -> str:
    return json.dumps(_clean(to_dict(event)), separators=(",", ":"))


def from_json(line: str) -> Event:
    return from_dict(json.loads(line))


class EventWriter:
    """Appends events to a .jsonl file as they arrive, flushed per batch, so a crash of
    the writer's process leaves every earlier line readable."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file: TextIO | None = open(self.path, "w", encoding="utf-8")  # noqa: SIM115

    def write(self, events: Iterable[Event]) -> None:
        if self._file is None:
            return
        self._file.write("".join(to_json(e) + "\n" for e in events))
        self._file.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def read_events(path: str | Path) -> Iterator[Event]:
    """Events of a .jsonl file; a torn last line (the writer was killed mid-write) is skipped."""
    with open(path, encoding="utf-8") as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            try:
                yield from_json(line)
            except (json.JSONDecodeError, KeyError, TypeError):
                continue
