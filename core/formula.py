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
    gradients still alive (zero_grad comes after the forward), or after a backward."""
    out = memory(Rule.of(cfg, len(devices)))
    if offloaded(cfg):  # the shards, their gradients and the optimizer state are the host's
        out = [{**b, "params": 0, "grads": 0, "optimizer": 0} for b in out]
    return [DeviceEstimate(d.index, d.label, sum(b.values()), b, d.capacity_bytes, "formula")
            for d, b in zip(devices, out)]


def offloaded(cfg: RunConfig) -> bool:
    """placement.cpu_offload: FSDP keeps the parameter shards, their gradients and the
    optimizer state in host memory; the device keeps what it gathers and computes with."""
    return cfg.placement.cpu_offload and (cfg.mode == "fsdp" or (cfg.mode == "mesh" and cfg.mesh.shard > 1))
