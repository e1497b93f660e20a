"""Logical devices: what the person assigns work to.

A logical device is backed by a whole GPU (`cuda:1`), by a share of one GPU
(`cuda:0x4`: four logical devices on GPU 0, each process capped at a quarter with
`torch.cuda.set_per_process_memory_fraction`), or simulated on the CPU (`sim:4`).
Simulated devices compute for real on the CPU; only their capacity is a setting.

GPUs are discovered through NVML, never through torch.cuda, so the calling process
(the GUI, the CLI) never creates a CUDA context.  NVML numbers GPUs in PCI bus order;
rank processes set CUDA_DEVICE_ORDER=PCI_BUS_ID so `cuda:N` means the same GPU in both.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from . import nvml
from .config import ConfigError, human_bytes, shown
from .nvml import GpuInfo


class DeviceError(ConfigError):
    """A device spec that is malformed or names hardware that is not there."""


@dataclass(frozen=True, slots=True)
class Device:
    index: int
    """Logical index, 0..N-1: the device's place in the run."""
    kind: str
    """'sim' or 'cuda'."""
    capacity_bytes: int
    gpu: int | None = None
    """Physical GPU index for 'cuda' devices."""
    share: int = 1
    """How many logical devices share this GPU (1: the whole GPU)."""
    gpu_name: str = ""

    @property
    def torch_device(self) -> str:
        return "cpu" if self.kind == "sim" else f"cuda:{self.gpu}"

    @property
    def label(self) -> str:
        if self.kind == "sim":
            return f"sim{self.index}"
        if self.share > 1:
            return f"cuda:{self.gpu}/{self.index % self.share}"
        return f"cuda:{self.gpu}"

    def describe(self) -> str:
        if self.kind == "sim":
            return f"simulated device {self.index} ({human_bytes(self.capacity_bytes)}, computes on the CPU)"
        share = f", 1/{self.share} share" if self.share > 1 else ""
        return f"GPU {self.gpu} {self.gpu_name}{share} ({human_bytes(self.capacity_bytes)})"


@dataclass(frozen=True, slots=True)
class DeviceSpec:
    kind: str  # 'auto' | 'sim' | 'cuda'
    count: int = 0
    gpus: tuple[int, ...] = ()
    share: int = 1


def parse_spec(text: str) -> DeviceSpec:
    """Syntax only: 'auto', 'sim:N', 'cuda:0,1', 'cuda:0xN'."""
    spec = text.strip().lower()
    if spec == "auto":
        return DeviceSpec("auto")
    if m := re.fullmatch(r"sim(?::(\d+))?", spec):
        count = int(m.group(1) or 1)
        if not 1 <= count <= 64:
            raise DeviceError(f"devices {shown(text)}: a run takes 1 to 64 simulated devices")
        return DeviceSpec("sim", count=count)
    if m := re.fullmatch(r"cuda:(\d+)x(\d+)", spec):
        share = int(m.group(2))
        if not 1 <= share <= 16:
            raise DeviceError(f"devices {shown(text)}: one GPU can be shared by 1 to 16 logical devices")
        return DeviceSpec("cuda", count=share, gpus=(int(m.group(1)),), share=share)
    if m := re.fullmatch(r"cuda(?::(\d+(?:\s*,\s*\d+)*))?", spec):
        gpus = tuple(int(g) for g in re.split(r"\s*,\s*", m.group(1))) if m.group(1) else (0,)
        if len(set(gpus)) != len(gpus):
            raise DeviceError(f"devices {shown(text)} names a GPU twice; to share one GPU write cuda:0x2")
        return DeviceSpec("cuda", count=len(gpus), gpus=gpus)
    raise DeviceError(
        f"devices {shown(text)} is not a device spec; write auto, sim:4, cuda:0,1 or cuda:0x4 "
        "(simulated and CUDA devices cannot be mixed in one run)"
    )


def resolve(text: str, sim_memory: int, gpus: list[GpuInfo] | None = None) -> list[Device]:
    """The logical devices a spec names on this machine, or DeviceError with a sentence."""
    spec = parse_spec(text)
    if gpus is None:
        gpus = list_gpus()
    if spec.kind == "auto":
        if not gpus:
            return [Device(i, "sim", int(sim_memory)) for i in range(2)]
        return [Device(g.index, "cuda", g.total_bytes, g.index, 1, g.name) for g in gpus]
    if spec.kind == "sim":
        return [Device(i, "sim", int(sim_memory)) for i in range(spec.count)]
    by_index = {g.index: g for g in gpus}
    for g in spec.gpus:
        if g not in by_index:
            have = (f"this machine has {len(gpus)} GPU{'s' if len(gpus) != 1 else ''} "
                    f"({', '.join(f'cuda:{i}' for i in sorted(by_index))})" if gpus
                    else "this machine has no GPU that NVML can see; use sim:N for simulated devices")
            raise DeviceError(f"there is no GPU cuda:{g}: {have}")
    if spec.share > 1:
        g = by_index[spec.gpus[0]]
        cap = g.total_bytes // spec.share
        return [Device(i, "cuda", cap, g.index, spec.share, g.name) for i in range(spec.share)]
    return [Device(i, "cuda", by_index[g].total_bytes, g, 1, by_index[g].name) for i, g in enumerate(spec.gpus)]


def count(text: str) -> int | None:
    """How many logical devices a spec names, without discovery (None for 'auto')."""
    spec = parse_spec(text)
    return None if spec.kind == "auto" else spec.count


def list_gpus() -> list[GpuInfo]:
    """GPUs as NVML sees them; an empty list when there is no driver or no GPU."""
    return nvml.list_gpus()
