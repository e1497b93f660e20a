"""The parallel layout as a value: the device mesh's axes and their degrees.

Every run is a mesh of four axes, outermost first as torchtitan lays them out:

  pp     pipeline stages (consecutive layers per stage)
  dp     replicas (data parallel; with shard > 1, HSDP's replicate axis)
  shard  parameter, gradient and optimizer shards (FSDP)
  tp     the split of each block's weight matrices (tensor parallel)

Their product is the number of ranks.  A one-axis mode is a shortcut (`ddp` on 4 devices
is dp = 4, `fsdp` is shard = 4); `mode = mesh` takes the degrees from `mesh.*`.  Rank r
sits at the row-major coordinate of r in (pp, dp, shard, tp), as init_device_mesh lays
ranks out, so the ranks of one pipeline stage are consecutive and a tp group is the
innermost (on one machine, the fastest link).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from .config import RunConfig
from .modes import REGISTRY


@dataclass(frozen=True)
class Axis:
    """One axis of the mesh, in the panel's words."""

    name: str
    label: str
    """The panel's name for its degree."""
    groups: str
    """What each group of this axis (the ranks that differ only along it) does together."""


AXIS: dict[str, Axis] = {a.name: a for a in (  # outermost first
    Axis("pp", "Pipeline stages",
         "pipeline: each group is one pipeline, its stages passing activations forward and gradients back"),
    Axis("dp", "Replicas", "replicas: each group holds the same shard and all-reduces its gradients"),
    Axis("shard", "Shards", "FSDP: each group shares out every parameter, all-gathering it to compute and "
         "reduce-scattering its gradients"),
    Axis("tp", "Tensor parallel", "tensor parallel: each group splits every block's weight matrices and "
         "all-reduces inside each block"),
)}
AXES = tuple(AXIS)


@dataclass(frozen=True)
class Plan:
    pp: int = 1
    dp: int = 1
    shard: int = 1
    tp: int = 1

    @classmethod
    def of(cls, cfg: RunConfig, n_devices: int) -> Plan:
        """The mesh of `cfg` on n devices (single-process modes: one rank, no mesh)."""
        if cfg.mode == "mesh":
            return cls(**{a: getattr(cfg.mesh, a) for a in AXES})
        known = REGISTRY.get(cfg.mode)
        if known is None or not known.axis:
            return cls()
        return cls(**{known.axis: n_devices})

    @property
    def world(self) -> int:
        return self.pp * self.dp * self.shard * self.tp

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(getattr(self, a) for a in AXES)

    @property
    def batch_ways(self) -> int:
        """How many ways the global batch is split: one share per replica and per shard."""
        return self.dp * self.shard

    def coordinate(self, rank: int) -> dict[str, int]:
        out, rest = {}, rank
        for axis in reversed(AXES):
            out[axis], rest = rest % getattr(self, axis), rest // getattr(self, axis)
        return {a: out[a] for a in AXES}

    def batch_index(self, rank: int) -> int:
        """Which share of the global batch rank `rank` trains on (its tp group shares it)."""
        c = self.coordinate(rank)
        return c["dp"] * self.shard + c["shard"]

    def loss_ranks(self) -> set[int]:
        """Ranks that have a loss: those of the last pipeline stage (every rank without one)."""
        per_stage = self.world // self.pp
        return set(range(self.world - per_stage, self.world))

    def describe(self) -> str:
        """'pp2 × tp2' — the axes in use, outermost first ('one device' when none)."""
        used = [f"{a}{getattr(self, a)}" for a in AXES if getattr(self, a) > 1]
        return " × ".join(used) or "one device"


def mesh_problems(cfg: RunConfig, n: int) -> list[str]:
    """The degrees themselves: positive, and multiplying to the device count."""
    degrees = {a: getattr(cfg.mesh, a) for a in AXES}
    bad = [f"mesh.{a}" for a, v in degrees.items() if not 1 <= v <= 4096]
    if bad:
        return [f"{', '.join(bad)} must be from 1 to 4096"]
    if cfg.mode != "mesh":
        set_ = [f"mesh.{a}={v}" for a, v in degrees.items() if v > 1]
        return ([f"{', '.join(set_)} composes axes only with mode=mesh (mode {cfg.mode} is its own layout); "
                 "set mode=mesh, or leave the mesh degrees at 1"] if set_ else [])
    product = math.prod(degrees.values())
    if product != n:
        shown = " × ".join(f"mesh.{a} {v}" for a, v in degrees.items() if v > 1) or "mesh.* all 1"
        return [f"{shown} = {product} ranks, but the run has {n} device{'s' if n != 1 else ''}; "
                f"the degrees must multiply to the device count"]
    return []
