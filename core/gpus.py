"""The GPU models a simulated device can be timed as (sim.gpu): the shipped ones in
resources/gpus.toml (figures from the vendors' datasheets, each naming its source) and a
person's own in ~/.config/paralab/gpus.toml, in the same form."""

from __future__ import annotations

import importlib.resources
from dataclasses import MISSING, dataclass, fields
from pathlib import Path
from typing import Any

import tomllib

USER_GPUS = Path.home() / ".config" / "paralab" / "gpus.toml"


@dataclass(frozen=True)
class GpuModel:
    name: str
    fp32_tflops: float
    tf32_tflops: float
    bf16_tflops: float
    fp16_tflops: float
    memory_bandwidth_gbs: float
    memory_gib: float
    launch_us: float
    link: str
    link_gbs: float
    link_latency_us: float
    source: str = ""
    pcie_gbs: float = 32.0
    """Host <-> GPU copies (CPU offload), GB/s per direction: the PCIe link's theoretical
    rate (4.0 x16 when a model does not say)."""

    def peak_flops(self, dtype: Any, tf32: bool = False) -> float:
        """Peak FLOP/s for a torch dtype (named, so this module needs no torch)."""
        if str(dtype) == "torch.bfloat16":
            return self.bf16_tflops * 1e12
        if str(dtype) == "torch.float16":
            return self.fp16_tflops * 1e12
        return (self.tf32_tflops if tf32 else self.fp32_tflops) * 1e12

    def describe(self, n: int) -> str:
        return f"modelled: {n} × {self.name} over {self.link}"


def gpu_models() -> dict[str, GpuModel]:
    """The shipped models (resources/gpus.toml), then the person's own (same form)."""
    text = importlib.resources.files("paralab.resources").joinpath("gpus.toml").read_text(encoding="utf-8")
    tables = tomllib.loads(text)
    if USER_GPUS.is_file():
        try:
            tables.update(tomllib.loads(USER_GPUS.read_text(encoding="utf-8")))
        except (OSError, tomllib.TOMLDecodeError, UnicodeDecodeError):
            pass  # validation names the problem; the shipped models still work
    names = {f.name for f in fields(GpuModel)} - {"name"}
    required = {f.name for f in fields(GpuModel) if f.default is MISSING} - {"name"}
    return {name: GpuModel(name=name, **{k: v for k, v in t.items() if k in names})
            for name, t in tables.items() if isinstance(t, dict) and required <= set(t)}
