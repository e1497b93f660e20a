"""The strategy API: what a mode's `apply_*` is given and what it returns.

A strategy (core.parallel.*) gets a RankContext (the config, this rank's devices, its
ledger and process group) and a Probe (phases, spans and memory on sampled steps), and
returns a Trainer.  The rank's runtime (core.worker) and the estimate's trace
(core.trace) both build these and call the strategy the same way; neither is imported by
the strategies, so dependencies point one way: runtime and estimate → strategies → here.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass, field
from time import perf_counter
from typing import TYPE_CHECKING, Any

from .config import RunConfig
from .devices import Device
from .events import PhaseSpan
from .modelled import ModelledClock
from .modes import mode

if TYPE_CHECKING:  # torch is imported by the rank, not by whoever only names these types
    import torch


@dataclass
class RankJob:
    """Everything a rank needs; picklable."""

    config: dict[str, Any]
    devices: list[Device]
    rank: int
    world: int
    t0: float
    """perf_counter() at the controller's start (CLOCK_MONOTONIC: shared by the processes of one machine).
    A remote rank is sent the seconds since that start instead and turns them into its own clock."""
    controller_pid: int
    store_host: str = "127.0.0.1"
    store_port: int = 0
    backend: str = "gloo"
    fault: str = ""
    """Test-only fault injection, 'KIND@STEP' on this rank: hang@5 (sleep forever), crash@5 (SIGKILL itself)."""
    remote: bool = False
    """Started by torchrun (core.remote): rendezvous from its environment, controller over a socket."""
    local_world: int = 0
    """Ranks on this machine (torchrun's LOCAL_WORLD_SIZE); 0: all of them."""
    log_path: str = ""
    """The controller's log file (core.log): a forkserver's ranks do not see its environment."""
    checkpoint: str = ""
    """Where to save the state for a switch of layout (core.checkpoint); '' never."""
    save_at_end: bool = False
    """Save there when the run finishes too, not only when asked to switch."""
    resume: str = ""
    """A switched run: load the state saved there before the first step."""
    first_step: int = 1
    """A switched run goes on from the step after the last one saved."""


class _Mark:
    """Inactive phase: remembers where the step is (so an OOM can name it), nothing else."""

    __slots__ = ("probe", "phase", "device")

    def __init__(self, probe: Probe, device: int, phase: str) -> None:
        self.probe, self.device, self.phase = probe, device, phase

    def __enter__(self) -> None:
        self.probe.where = (self.device, self.phase)

    def __exit__(self, *exc: Any) -> None:
        return None


class Probe:
    """Spans and memory on sampled steps; on other steps only a cheap marker."""

    def __init__(self, ctx: RankContext) -> None:
        self.ledger = ctx.ledger
        self.t0 = ctx.job.t0
        self.active = False
        self.step = 0
        self.where: tuple[int, str] = (ctx.local_devices[0].index, "setup")
        self.spans: list[PhaseSpan] = []
        self._marks: dict[tuple[int, str], _Mark] = {}
        self.ledger.where = lambda: self.where  # an allocation belongs to the device at work
        self.ledger.recompute = self._recompute
        self.clock = ModelledClock(ctx, lambda: self.where)

    @contextlib.contextmanager
    def at(self, device: int, phase: str):
        """Work on `device` that the strategy times itself (copies between devices): what it
        allocates belongs to that device."""
        before, self.where = self.where, (device, phase)
        try:
            yield
        finally:
            self.where = before

    @contextlib.contextmanager
    def _recompute(self, device: int):
        """A checkpointed block run again inside backward: its ops are modelled, and its
        span drawn, as the recompute, not as backward."""
        start = perf_counter()
        try:
            with self.at(device, "recompute"):
                yield
        finally:  # torch ends a recompute early by raising, once backward has what it needs
            self.span(device, "recompute", start, perf_counter())

    def phase(self, device: int, phase: str) -> Any:
        if self.active:
            return self._record(device, phase)
        mark = self._marks.get((device, phase))
        if mark is None:
            mark = self._marks[(device, phase)] = _Mark(self, device, phase)
        return mark

    @contextlib.contextmanager
    def _record(self, device: int, phase: str):
        self.where = (device, phase)
        start = perf_counter()
        if phase == "forward":
            with self.ledger.recording(device):
                yield
        else:
            yield
        end = perf_counter()
        self.spans.append(PhaseSpan(device, phase, start - self.t0, end - self.t0, self.step))
        self.ledger.checkpoint(phase)

    def span(self, device: int, phase: str, start: float, end: float) -> None:
        """A span timed by the strategy itself (communication, idle)."""
        if self.active:
            self.spans.append(PhaseSpan(device, phase, start - self.t0, end - self.t0, self.step))

    def other(self, device: int, *tensors: Any) -> None:
        if self.active:
            self.ledger.set_other(device, tensors)


@dataclass
class RankContext:
    job: RankJob
    cfg: RunConfig
    local_devices: list[Device]
    ledger: Any
    group: Any = None
    """torch.distributed default group when world > 1."""
    control_group: Any = None
    """A gloo group beside the training's: controls, and the modelled clock's op lists."""

    @property
    def rank(self) -> int:
        return self.job.rank

    @property
    def world(self) -> int:
        return self.job.world

    @property
    def devices(self) -> list[Device]:
        return self.job.devices


@dataclass
class Trainer:
    step: Callable[[int, Probe], torch.Tensor | None]
    """Runs training step `step` (1-based); returns the loss (or None on a rank that has none)."""
    optimizers: list[torch.optim.Optimizer] = field(default_factory=list)
    summary: Callable[[], str] | None = None
    """What the model learned, in words, for the end of the run (small models only)."""
    model: Any = None
    """The whole model as this rank holds it (a replica, shards, slices) under build_model's
    names, for a switch of layout (core.checkpoint); None where it is held in pieces."""


def local_devices(job: RankJob, cfg: RunConfig) -> list[Device]:
    if mode(cfg.mode).one_process_per_device:
        return [job.devices[job.rank]]
    return list(job.devices)
