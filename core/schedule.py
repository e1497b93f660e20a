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

from .clock import Op


@dataclass
class Timeline:
    step_s: float
    compute: dict[int, list[tuple[str, float, float]]] = field(default_factory=dict)
    """Per device: (phase, start, end) of its compute, merged where back to back."""
    comm: dict[int, list[tuple[str, float, float, int]]] = field(default_factory=dict)
    """Per device: (collective, start, end, bytes)."""
    flops: dict[int, float] = field(default_factory=dict)

    def busy_share(self, device: int) -> float:
        busy = sum(e - s for _, s, e in self.compute.get(device, []))
        return busy / self.step_s if self.step_s > 0 else 0.0


def schedule(logs: dict[int, list[Op]]) -> Timeline:
    """`logs`: each rank's ops in program order (ranks of one run, or one process)."""
    compute_free: dict[int, float] = defaultdict(float)
    comm_free: dict[int, float] = defaultdict(float)
    ready: dict[tuple[int, int], float] = {}
    cursor = dict.fromkeys(logs, 0)
    seq: dict[tuple[int, str], int] = defaultdict(int)
    arrived: dict[tuple[str, int], dict[int, tuple[Op, float]]] = defaultdict(dict)
    tl = Timeline(0.0)
    compute: dict[int, list[tuple[str, float, float]]] = defaultdict(list)
    comm: dict[int, list[tuple[str, float, float, int]]] = defaultdict(list)

    def inputs_ready(rank: int, op: Op) -> float:
        return max((ready.get((rank, s), 0.0) for s in op.reads), default=0.0)

    progress = True
    while progress:
        progress = False
        for rank, ops in logs.items():
            while cursor[rank] < len(ops):
                op = ops[cursor[rank]]
                if op.kind == "comm" and op.group:
                    key = (op.group, seq[(rank, op.group)])
                    if rank not in arrived[key]:
                        issue = max(compute_free[op.device], inputs_ready(rank, op))
                        arrived[key][rank] = (op, issue)
                    if not _complete(arrived[key], op):
                        break  # wait for the other members
                    _resolve(arrived.pop(key), comm_free, ready, comm)
                    for member in {m for m in _ranks(op) if m in cursor}:
                        seq[(member, op.group)] += 1
                        cursor[member] += 1
                    progress = True
                    continue
                if op.kind == "comm":  # a copy between two devices of one process
                    start = max(comm_free[op.device], inputs_ready(rank, op))
                    end = comm_free[op.device] = start + op.seconds
                    comm[op.device].append((op.name, start, end, op.bytes))
                elif op.kind == "compute":
                    start = max(compute_free[op.device], inputs_ready(rank, op))
                    end = compute_free[op.device] = start + op.seconds
                    _merge(compute[op.device], op.phase, start, end)
                    tl.flops[op.device] = tl.flops.get(op.device, 0.0) + op.flops
                else:  # a wait: the result is used from here on
                    end = inputs_ready(rank, op)
                for s in op.writes:
                    ready[(rank, s)] = max(ready.get((rank, s), 0.0), end)
                cursor[rank] += 1
                progress = True
    # Whatever could not be matched (a rank traced alone) still counts on its own streams.
    for rank, ops in logs.items():
        for op in ops[cursor[rank]:]:
            start = max(comm_free[op.device], compute_free[op.device])
            end = comm_free[op.device] = start + op.seconds
            comm[op.device].append((op.name, start, end, op.bytes))
    ends = [e for spans in compute.values() for _, _, e in spans] + [e for c in comm.values() for *_, e, _ in c]
    tl.step_s = max(ends, default=0.0)
    tl.compute, tl.comm = dict(compute), dict(comm)
    return tl


def _ranks(op: Op) -> tuple[int, ...]:
    if op.name in ("send", "recv"):
        src, dst = op.group.split("->")
        return int(src), int(dst)
    return op.members


def _complete(arrived: dict[int, tuple[Op, float]], op: Op) -> bool:
    return all(m in arrived for m in _ranks(op))


def _resolve(arrived: dict[int, tuple[Op, float]], comm_free: dict[int, float],
             ready: dict[tuple[int, int], float], comm: dict) -> None:
    """Every member's part of one collective (or a send and its receive) runs together."""
    start = max(max(issue, comm_free[op.device]) for op, issue in arrived.values())
    seconds = max(op.seconds for op, _ in arrived.values())
    end = start + seconds
    for rank, (op, _) in arrived.items():
        comm_free[op.device] = end
        comm[op.device].append((op.name, start, end, op.bytes))
        for s in op.writes:
            ready[(rank, s)] = end


def _merge(spans: list[tuple[str, float, float]], phase: str, start: float, end: float) -> None:
    if spans and spans[-1][0] == phase and start - spans[-1][2] < 1e-9:
        spans[-1] = (phase, spans[-1][1], end)
    else:
        spans.append((phase, start, end))


def idle(compute: list[tuple[str, float, float]], until: float) -> list[tuple[float, float]]:
    """The gaps of a compute stream between 0 and `until`."""
    out, t = [], 0.0
    for _, s, e in compute:
        if s > t + 1e-12:
            out.append((t, s))
        t = max(t, e)
    if until > t + 1e-12:
        out.append((t, until))
    return out
