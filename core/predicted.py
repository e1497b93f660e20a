"""What a prediction says about one device: the estimate's result type, shared by the
formula, the trace and whoever shows them (core.estimate puts them side by side)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


class EstimateError(RuntimeError):
    """The trace could not run; the message says why."""


@dataclass
class DeviceEstimate:
    device: int
    label: str
    peak_bytes: int
    bytes: dict[str, int]
    capacity_bytes: int
    method: str
    phase: str = ""
    """Trace: the phase in which the peak was reached."""
    modelled: dict[str, Any] | None = None
    """Trace, on a GPU model: the step as that GPU would take it (step_s, busy share,
    communication figures, spans of (phase, start, end) in seconds)."""
    host: dict[str, int] = field(default_factory=dict)
    """Trace, placement.cpu_offload: what the device keeps in host memory instead, by
    category, at the host's highest (not in `bytes` or `peak_bytes`)."""

    @property
    def fits(self) -> bool:
        return self.peak_bytes <= self.capacity_bytes

    def to_json(self) -> dict[str, Any]:
        return {"device": self.device, "label": self.label, "peak_bytes": self.peak_bytes,
                "bytes": dict(self.bytes), "capacity_bytes": self.capacity_bytes, "fits": self.fits,
                "phase": self.phase, "modelled": self.modelled, "host": dict(self.host)}
