"""Which device is busy when: the one definition of busy, idle and their shares of a step.

Every place that says how busy a device was reads it from here: the telemetry's busy
meter (a simulated device's utilization in host time), the modelled schedule (its
utilization and idle spans), the app's timeline (each device's idle share), and the
strategies that record idle spans (model-parallel's turns, the pipeline's bubble).

A device *computes* in forward, backward (and the recompute of checkpointed blocks inside
it) and the optimizer step; it *works* while it
computes or communicates (a running NCCL kernel is what NVML's utilization counts too);
it is *idle* for the rest of the step.  A step runs from its first span to its last on any
device, since the ranks share one clock.  Overlapping spans count once.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Protocol

COMPUTE = ("forward", "backward", "recompute", "optimizer")
WORK = (*COMPUTE, "communication")

Interval = tuple[float, float]


class Span(Protocol):
    """What a phase span has (core.events.PhaseSpan)."""

    device: int
    phase: str
    start_s: float
    end_s: float
    step: int


def merged(intervals: Iterable[Interval]) -> list[Interval]:
    """The union of intervals as sorted, disjoint intervals."""
    out: list[Interval] = []
    for s, e in sorted(intervals):
        if out and s <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], e))
        else:
            out.append((s, e))
    return out


def covered(intervals: Iterable[Interval]) -> float:
    """The length of the union of intervals (overlapping spans count once)."""
    return sum(e - s for s, e in merged(intervals))


def overlap(a: Interval, b: Interval) -> float:
    return max(0.0, min(a[1], b[1]) - max(a[0], b[0]))


def minus(intervals: Iterable[Interval], holes: Iterable[Interval]) -> list[Interval]:
    """What of `intervals` the holes do not cover."""
    holes = merged(holes)
    out = []
    for a, b in merged(intervals):
        for h0, h1 in holes:
            if h1 <= a or h0 >= b:
                continue
            if h0 > a:
                out.append((a, h0))
            a = max(a, h1)
        if b > a:
            out.append((a, b))
    return out


def gaps(intervals: Iterable[Interval], start: float, end: float) -> list[Interval]:
    """The stretches of [start, end] no interval covers: where a device idles."""
    return [(s, e) for s, e in minus([(start, end)], intervals) if e - s > 1e-12]


def shares(spans: Iterable[Span]) -> dict[int, tuple[float, float]]:
    """Per device, the share of its steps' time it computed and the share it idled, over
    every step the spans cover (each step as long as its first to last span anywhere)."""
    steps: dict[int, list[Span]] = {}
    for s in spans:
        steps.setdefault(s.step, []).append(s)
    wall, compute, work = 0.0, {}, {}
    for ss in steps.values():
        wall += max(s.end_s for s in ss) - min(s.start_s for s in ss)
        for d in {s.device for s in ss}:
            mine = [s for s in ss if s.device == d]
            compute[d] = compute.get(d, 0.0) + covered((s.start_s, s.end_s) for s in mine if s.phase in COMPUTE)
            work[d] = work.get(d, 0.0) + covered((s.start_s, s.end_s) for s in mine if s.phase in WORK)
    if wall <= 0:
        return {}
    return {d: (min(1.0, compute[d] / wall), max(0.0, 1.0 - work[d] / wall)) for d in compute}


def bubble(spans: Iterable[Span]) -> dict[int, float]:
    """Per device, the pipeline's bubble: the share of each step's forward-backward window
    (its first forward to its last backward on any device) in which the device runs neither,
    over every step the spans cover."""
    steps: dict[int, list[Span]] = {}
    for s in spans:
        steps.setdefault(s.step, []).append(s)
    window: dict[int, float] = {}
    ran: dict[int, float] = {}
    for ss in steps.values():
        passes = [s for s in ss if s.phase in ("forward", "backward", "recompute")]
        if not passes:
            continue
        lo, hi = min(s.start_s for s in passes), max(s.end_s for s in passes)
        for d in {s.device for s in ss}:
            window[d] = window.get(d, 0.0) + hi - lo
            ran[d] = ran.get(d, 0.0) + covered((s.start_s, s.end_s) for s in passes if s.device == d)
    return {d: 1.0 - ran[d] / w for d, w in window.items() if w > 0}


def ideal_bubble(stages: int, micro_batches: int) -> float:
    """GPipe's and 1F1B's bubble with equal stages and free communication, (p − 1)/(m + p − 1):
    the share of a step each stage waits (Huang et al. 2019, GPipe)."""
    return (stages - 1) / (micro_batches + stages - 1)
