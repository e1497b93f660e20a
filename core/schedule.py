"""One sampled step laid out on modelled GPU streams, across every rank, deterministically.

Each device has a compute stream and a communication stream.  Compute runs in program
order, each operation once its inputs are ready.  A collective starts when every member
has issued it (a device issues it where its compute stream is at that point in the
program, as NCCL's stream waits on the compute stream) and its stream is free; a
receive pairs with its send.  Work waits for a collective only where it reads what the
collective wrote.  So DDP's bucket all-reduces overlap backward, FSDP's gathers run
ahead of the layers that need them, and pipeline stages wait for their neighbours.
The result depends only on the op lists (core.clock), never on the host's clock.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

from .clock import Op, bus_factor
from .spans import covered, gaps, merged, overlap


class ScheduleError(RuntimeError):
    """The ranks' op lists do not pair up (a collective or a transfer without its partner)."""


@dataclass
class Timeline:
    step_s: float
    compute: dict[int, list[tuple[str, float, float]]] = field(default_factory=dict)
    """Per device: (phase, start, end) of its compute, merged where back to back."""
    comm: dict[int, list[tuple[str, float, float, int, int]]] = field(default_factory=dict)
    """Per device: (collective, start, end, bytes, ranks taking part)."""
    flops: dict[int, float] = field(default_factory=dict)
    host: dict[int, list[tuple[str, float, float]]] = field(default_factory=dict)
    """Per device: (phase, start, end) of its host's work for it (CPU offload's optimizer)."""

    def host_s(self, device: int) -> float:
        return sum(e - s for _, s, e in self.host.get(device, []))

    def busy_share(self, device: int) -> float:
        """The share of the step its compute stream is busy (never communication or waiting):
        the modelled utilization, core.spans' compute share."""
        busy = covered((s, e) for _, s, e in self.compute.get(device, []))
        return busy / self.step_s if self.step_s > 0 else 0.0

    def comm_figures(self, device: int) -> dict[str, float]:
        """Communication of one device: seconds (its stream busy), bytes, bus bandwidth as
        nccl-tests defines it (bytes × the algorithm's bus factor / time), and the share of
        its communication time hidden under compute (overlap)."""
        spans = self.comm.get(device, [])
        comm_s = covered((s, e) for _, s, e, _, _ in spans)
        hidden = sum(overlap(a, b) for a in merged((s, e) for _, s, e, _, _ in spans)
                     for b in [(s, e) for _, s, e in self.compute.get(device, [])])
        bus = sum(n * bus_factor(name, ranks) for name, _, _, n, ranks in spans)
        return {"comm_s": comm_s, "comm_bytes": float(sum(n for *_, n, _ in spans)),
                "busbw_gbs": bus / comm_s / 1e9 if comm_s > 0 else 0.0,
                "overlap": hidden / comm_s if comm_s > 0 else 0.0}


def schedule(logs: dict[int, list[Op]]) -> Timeline:
    """`logs`: each rank's ops in program order (ranks of one run, or one process)."""
    compute_free: dict[int, float] = defaultdict(float)
    host_free: dict[int, float] = defaultdict(float)
    comm_free: dict[tuple[int, str], float] = defaultdict(float)  # (device, stream)
    ready: dict[tuple[int, int], float] = {}
    cursor = dict.fromkeys(logs, 0)
    seq: dict[tuple[int, str], int] = defaultdict(int)
    arrived: dict[tuple[str, int], dict[int, tuple[Op, float]]] = defaultdict(dict)
    tl = Timeline(0.0)
    compute: dict[int, list[tuple[str, float, float]]] = defaultdict(list)
    comm: dict[int, list[tuple[str, float, float, int]]] = defaultdict(list)
    host: dict[int, list[tuple[str, float, float]]] = defaultdict(list)

    def inputs_ready(rank: int, op: Op) -> float:
        return max((ready.get((rank, s), 0.0) for s in op.reads), default=0.0)

    pending: dict[tuple[int, int], tuple[str, int]] = {}  # (rank, storage) a transfer will write

    progress = True
    while progress:
        progress = False
        for rank, ops in logs.items():
            while cursor[rank] < len(ops):
                op = ops[cursor[rank]]
                if any((rank, s) in pending for s in op.reads):
                    break  # it reads what a transfer still in flight will write
                if op.kind == "comm" and op.group:
                    # Issued and left to run (NCCL is asynchronous, p2p ops are grouped):
                    # the rank goes on, and whatever reads the result waits above.
                    key = (op.group, seq[(rank, op.group)])
                    seq[(rank, op.group)] += 1
                    arrived[key][rank] = (op, max(compute_free[op.device], inputs_ready(rank, op)))
                    for s in op.writes:
                        pending[(rank, s)] = key
                    if _complete(arrived[key], op, logs):
                        done = arrived.pop(key)
                        _resolve(done, comm_free, ready, comm)
                        for member, (member_op, _) in done.items():
                            for s in member_op.writes:
                                if pending.get((member, s)) == key:
                                    del pending[(member, s)]
                    cursor[rank] += 1
                    progress = True
                    continue
                if op.kind == "comm":  # a copy between two devices of one process
                    start = max(comm_free[(op.device, "copy")], inputs_ready(rank, op))
                    end = comm_free[(op.device, "copy")] = start + op.seconds
                    comm[op.device].append((op.name, start, end, op.bytes, 2))
                elif op.kind == "compute":
                    start = max(compute_free[op.device], inputs_ready(rank, op))
                    end = compute_free[op.device] = start + op.seconds
                    _merge(compute[op.device], op.phase, start, end)
                    tl.flops[op.device] = tl.flops.get(op.device, 0.0) + op.flops
                elif op.kind == "host":
                    # The host steps once the device's work so far is done (FSDP waits for the
                    # gradients' copies), in program order, beside the GPU's streams.
                    start = max(host_free[op.device], compute_free[op.device], inputs_ready(rank, op))
                    end = host_free[op.device] = start + op.seconds
                    _merge(host[op.device], op.phase, start, end)
                else:  # a wait: the result is used from here on
                    end = inputs_ready(rank, op)
                for s in op.writes:
                    ready[(rank, s)] = max(ready.get((rank, s), 0.0), end)
                cursor[rank] += 1
                progress = True
    for parts in arrived.values():  # a collective some member never issued (a rank traced alone)
        _resolve(parts, comm_free, ready, comm)
    stuck = {rank: len(ops) - cursor[rank] for rank, ops in logs.items() if cursor[rank] < len(ops)}
    if stuck:  # the ranks' programs do not pair up: say so rather than invent a timeline
        raise ScheduleError(f"ops left unscheduled per rank: {stuck}")
    ends = [e for spans in (*compute.values(), *host.values()) for _, _, e in spans] + \
        [e for c in comm.values() for _, _, e, _, _ in c]
    tl.step_s = max(ends, default=0.0)
    tl.compute, tl.comm, tl.host = dict(compute), dict(comm), dict(host)
    return tl


def _ranks(op: Op) -> tuple[int, ...]:
    if op.name in ("send", "recv"):
        src, dst = op.group.split("->")
        return int(src), int(dst)
    return op.members


def _stream(op: Op) -> str:
    return "-".join(sorted(op.group.split("->"))) if op.name in ("send", "recv") else op.group


def _complete(arrived: dict[int, tuple[Op, float]], op: Op, present: Any) -> bool:
    """Every member has issued it (members whose ops are not given count as issued)."""
    return all(m in arrived for m in _ranks(op) if m in present)


def _resolve(arrived: dict[int, tuple[Op, float]], comm_free: dict[int, float],
             ready: dict[tuple[int, int], float], comm: dict) -> None:
    """Every member's part of one collective (or a send and its receive) runs together, on
    the stream of its communicator (NCCL: one per process group, one per pair for p2p)."""
    start = max(max(issue, comm_free[(op.device, _stream(op))]) for op, issue in arrived.values())
    seconds = max(op.seconds for op, _ in arrived.values())
    end = start + seconds
    for rank, (op, _) in arrived.items():
        comm_free[(op.device, _stream(op))] = end
        comm[op.device].append((op.name, start, end, op.bytes, max(2, len(op.members))))
        for s in op.writes:
            ready[(rank, s)] = end


def _merge(spans: list[tuple[str, float, float]], phase: str, start: float, end: float) -> None:
    if spans and spans[-1][0] == phase and start - spans[-1][2] < 1e-9:
        spans[-1] = (phase, spans[-1][1], end)
    else:
        spans.append((phase, start, end))


def idle(tl: Timeline, device: int) -> list[tuple[float, float]]:
    """Where a device's step neither computes nor communicates (core.spans' idle)."""
    work = [(s, e) for _, s, e in tl.compute.get(device, [])]
    work += [(s, e) for _, s, e, _, _ in tl.comm.get(device, [])]
    return gaps(work, 0.0, tl.step_s)
