"""The formula: bytes from the model's shapes and the mode's rule for who holds what
(replicated, sharded, split by layers).  Cheap and explainable, less exact than the trace.

Each mode's rule lives in its own module (`memory(rule)` under core.parallel, found through
the registry, core.modes); the shapes and the arithmetic they share are core.shapes.
"""

from __future__ import annotations

from .config import RunConfig
from .devices import Device
from .parallel import memory
from .predicted import DeviceEstimate
from .shapes import Rule


def formula(cfg: RunConfig, devices: list[Device]) -> list[DeviceEstimate]:
    """Bytes from shapes: who holds which parameters, and how many samples' activations.

    The peak is taken where a run's is: at the end of a forward, with the last step's
    gradients still alive (zero_grad comes after the forward), or in or after a backward."""
    out = memory(Rule.of(cfg, len(devices)))
    return [DeviceEstimate(d.index, d.label, sum(b.values()), b, d.capacity_bytes, "formula")
            for d, b in zip(devices, out)]

