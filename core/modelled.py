"""A rank's modelled clock: on sampled steps the recorder's op list (core.clock) is laid
out across every rank (core.schedule), and the step's spans, utilization and duration
are taken from that layout in modelled seconds.  Every step, sampled or not, advances
the clock by the last modelled step time: shapes are fixed from step to step, and so
are the modelled durations.  Host time is untouched: a simulated device sends both.
"""

from __future__ import annotations

import warnings
from typing import Any

from .clock import OpLog, mfu
from .events import PHASES, PhaseSpan, UtilizationSample
from .gpus import GpuModel, gpu_models
from .schedule import ScheduleError, Timeline, idle, schedule


class ModelledClock:
    def __init__(self, ctx: Any, where: Any) -> None:
        cfg = ctx.cfg
        simulated = all(d.kind == "sim" for d in ctx.local_devices)
        self.gpu: GpuModel | None = None
        if simulated and cfg.sim.gpu != "host":
            self.gpu = gpu_models().get(cfg.sim.gpu)
        self.ctx, self.where, self.tf32 = ctx, where, cfg.sim.tf32
        self.now = 0.0
        """Modelled seconds since the run started, at the end of the last step."""
        self.step_s = 0.0
        self._laid: tuple[float, Timeline] | None = None
        self._known: tuple[int, Timeline] | None = None
        """(signature of the last exchanged step's ops, its timeline)."""

    def start(self) -> OpLog | None:
        offload = self.ctx.cfg.placement.cpu_offload
        return OpLog(self.gpu, self.where, self.tf32, offload) if self.gpu is not None else None

    def lay_out(self, log: OpLog | None) -> None:
        """The step's ops, with every rank's, on modelled streams."""
        if log is None:
            return
        group = self.ctx.control_group
        several = self.ctx.world > 1 and group is not None
        mine = signature(log.ops)
        changed = self._known is None or self._known[0] != mine
        if several:  # the same answer on every rank: exchange again if any rank's ops changed
            import torch
            import torch.distributed as dist

            flag = torch.tensor([int(changed)])
            dist.all_reduce(flag, group=group)
            changed = bool(flag.item())
        if not changed:  # the same ops as last time: the same timeline (it is a function of them)
            self.step_s = self._known[1].step_s
            self._laid = (self.now, self._known[1])
            return
        logs = {self.ctx.rank: log.ops}
        if several:
            gathered: list[Any] = [None] * self.ctx.world
            dist.all_gather_object(gathered, log.ops, group=group)
            logs = dict(enumerate(gathered))
        try:
            timeline = schedule(logs)
        except ScheduleError as e:  # keep the last step time; a timeline made up would mislead
            log.ops.clear()
            self._known = None
            warnings.warn(f"paralab: no modelled timeline for this step: {e}", stacklevel=1)
            return
        self.step_s = timeline.step_s
        self._laid = (self.now, timeline)
        self._known = (mine, timeline)

    def advance(self) -> None:
        self.now += self.step_s

    def events(self, step: int, host_s: float) -> list[Any]:
        """This rank's devices' spans of the last laid-out step, and their utilization."""
        if self._laid is None:
            return []
        start, tl = self._laid
        self._laid = None
        out: list[Any] = []
        for d in self.ctx.local_devices:
            compute = tl.compute.get(d.index, [])
            for phase, s, e in compute:
                phase = phase if phase in PHASES else "forward"
                out.append(PhaseSpan(d.index, phase, start + s, start + e, step, "modelled"))
            for s, e in idle(tl, d.index):
                out.append(PhaseSpan(d.index, "idle", start + s, start + e, step, "modelled"))
            for name, s, e, nbytes, _ in tl.comm.get(d.index, []):
                out.append(PhaseSpan(d.index, "communication", start + s, start + e, step, "modelled", nbytes, name))
            flops = tl.flops.get(d.index, 0.0)
            out.append(UtilizationSample(d.index, 100 * tl.busy_share(d.index), host_s, "modelled", {
                "step_s": tl.step_s, "flops": flops, "mfu": mfu(flops, tl.step_s, self.gpu, tf32=self.tf32),
                **tl.comm_figures(d.index), "host_s": tl.host_s(d.index)}))
        return out


def signature(ops: list[Any]) -> int:
    """What the schedule depends on in a rank's ops, with storages numbered in order of
    appearance (their ids change from step to step; which op reads what another wrote does
    not): equal signatures on every rank give the same timeline."""
    numbers: dict[int, int] = {}

    def number(keys: tuple[int, ...]) -> tuple[int, ...]:
        return tuple(numbers.setdefault(k, len(numbers)) for k in keys)

    return hash(tuple((op.device, op.phase, op.kind, op.seconds, op.name, op.bytes, op.flops, op.group,
                       op.members, number(op.reads), number(op.writes)) for op in ops))
