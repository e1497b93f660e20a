"""Predict each device's peak memory by category, before a run: by formula and by trace.

The two ways live in their own modules, core/trace.py and core/formula.py:

trace    runs the mode's own strategy (`apply_<mode>` and two training steps) on fake
         tensors (FakeTensorMode: shapes, dtypes and aliasing, no data), with the same
         MemoryLedger and Probe a rank uses.  The numbers are therefore what a run would
         report, category by category, without allocating the memory.  Multi-process
         modes are traced one rank at a time on torch's fake process group, whose
         collectives do nothing: each rank's own tensors are all the ledger counts.
formula  counts bytes from the model's shapes and the mode's rule for who holds what
         (replicated, sharded, split by layers).  Cheap and explainable, less exact.

A CUDA device is traced as a simulated one of the same capacity: the ledger's categories
are the same, the allocator's extra (reserved, non_torch) is not predicted.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from . import validation
from .config import ConfigError, RunConfig, human_bytes
from .devices import Device, resolve
from .events import CATEGORIES, MemorySample
from .formula import formula
from .predicted import DeviceEstimate, EstimateError
from .trace import trace

METHODS = ("both", "formula", "trace")


@dataclass
class Estimate:
    method: str
    """What was asked: both, formula or trace."""
    by_method: dict[str, list[DeviceEstimate]]
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0
    gpu: str = ""
    """The GPU model the traced step is timed on (sim.gpu)."""

    @property
    def devices(self) -> list[DeviceEstimate]:
        """The best prediction there is: the trace, or the formula where there is no trace."""
        return self.by_method.get("trace") or self.by_method["formula"]

    @property
    def fits(self) -> bool:
        return all(d.fits for d in self.devices)

    def to_json(self) -> dict[str, Any]:
        return {"devices": [d.to_json() for d in self.devices],
                "method": "trace" if "trace" in self.by_method else "formula",
                "requested": self.method,
                "methods": {m: [d.to_json() for d in ds] for m, ds in self.by_method.items()},
                "fits": self.fits, "notes": list(self.notes), "seconds": round(self.seconds, 3),
                "gpu": self.gpu}

    def table(self) -> str:
        cols = ("device", "method", *CATEGORIES, "peak", "capacity", "")
        rows = []
        for method, ds in self.by_method.items():
            for d in ds:
                rows.append((d.label, method, *(human_bytes(d.bytes[c]) for c in CATEGORIES),
                             human_bytes(d.peak_bytes), human_bytes(d.capacity_bytes),
                             "fits" if d.fits else "OUT OF MEMORY"))
        rows.sort(key=lambda r: (int("".join(ch for ch in r[0] if ch.isdigit()) or 0), r[1]))
        widths = [max(len(str(r[i])) for r in (cols, *rows)) for i in range(len(cols))]
        lines = ["  ".join(str(v).rjust(w) if i >= 2 else str(v).ljust(w)
                           for i, (v, w) in enumerate(zip(r, widths))).rstrip() for r in (cols, *rows)]
        verdict = ("every device fits" if self.fits
                   else "won't fit: " + ", ".join(d.label for d in self.devices if not d.fits))
        host = ", ".join(f"{d.label} {human_bytes(sum(d.host.values()))}" for d in self.devices if d.host)
        offloaded = [f"offloaded to host (placement.cpu_offload, not in the peaks above): {host}"] if host else []
        return "\n".join([*lines, "", verdict, *offloaded, *self.time_lines(), *(f"note: {n}" for n in self.notes)])

    def time_lines(self) -> list[str]:
        """The traced step on the GPU model: its time and each device's busy share."""
        timed = [d for d in self.by_method.get("trace", []) if d.modelled]
        if not timed:
            return []
        step = timed[0].modelled["step_s"]
        busy = ", ".join(f"{d.label} {100 * d.modelled['busy']:.0f}%" for d in timed)
        comm = ", ".join(f"{d.label} {human_bytes(int(d.modelled['comm_bytes']))}" for d in timed
                         if d.modelled["comm_bytes"])
        return [f"modelled step: {1e3 * step:.3f} ms on {self.gpu}; compute busy: {busy}",
                *([f"communication per step: {comm}"] if comm else [])]


def estimate(cfg: RunConfig, method: str = "both", devices: list[Device] | None = None) -> Estimate:
    """Per-device predicted peak memory of a run of `cfg`.

    "both" gives the formula and the trace side by side; when the trace cannot run (a
    mode without a strategy yet, an op fake tensors lack) the formula stands alone and
    `notes` says why.  "trace" alone raises EstimateError instead."""
    if method not in METHODS:
        raise ConfigError(f"estimate method {method!r} is not one of: {', '.join(METHODS)}")
    problems = validation.problems(cfg, resolve_devices=devices is None)
    if problems:
        raise ConfigError("; ".join(problems))
    devices = devices if devices is not None else resolve(cfg.devices, cfg.sim.memory)
    start = time.perf_counter()
    result = Estimate(method, {}, gpu=cfg.sim.gpu)
    if method in ("both", "formula"):
        result.by_method["formula"] = formula(cfg, devices)
    if method in ("both", "trace"):
        try:
            result.by_method["trace"] = trace(cfg, devices)
        except EstimateError as e:
            if method == "trace":
                raise
            result.notes.append(f"no trace, formula only: {e}")
    result.seconds = time.perf_counter() - start
    return result




# ---- after a run -------------------------------------------------------------------------------


def measured_peaks(events: Iterable[Any]) -> dict[int, int]:
    """Each device's peak as the run measured it: the highest `peak_bytes` it reported."""
    out: dict[int, int] = {}
    for e in events:
        if isinstance(e, MemorySample):
            out[e.device] = max(out.get(e.device, 0), e.peak_bytes)
    return out


def compare(est: Estimate, events: Iterable[Any]) -> list[dict[str, Any]]:
    """Per device: predicted peak (trace, formula), measured peak, and each error in %
    ((predicted − measured) / measured; None where a number is missing)."""
    measured = measured_peaks(events)
    by = {m: {d.device: d for d in ds} for m, ds in est.by_method.items()}
    rows = []
    for d in est.devices:
        got = measured.get(d.device)
        row: dict[str, Any] = {"device": d.device, "label": d.label, "measured": got}
        for m in ("trace", "formula"):
            pred = by.get(m, {}).get(d.device)
            row[m] = pred.peak_bytes if pred else None
            row[f"{m}_error_pct"] = (100.0 * (pred.peak_bytes - got) / got if pred and got else None)
        rows.append(row)
    return rows

