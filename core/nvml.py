"""NVML behind a wall: every failure becomes 'not available', never an exception.

NVML reads the driver's view of each GPU without creating a CUDA context, so the GUI
and CLI processes can list GPUs and sample utilization safely.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

NA = None
"""What a query returns when NVML, the GPU or the query is not available."""

_lock = threading.Lock()
_state: dict[str, Any] = {"initialized": False, "error": None, "module": None}


def _module() -> Any:
    """The pynvml module after nvmlInit, or None (the reason kept in `unavailable_reason`)."""
    with _lock:
        if _state["initialized"]:
            return _state["module"]
        _state["initialized"] = True
        try:
            import pynvml

            pynvml.nvmlInit()
            _state["module"] = pynvml
        except Exception as e:  # ImportError, NVMLError_LibraryNotFound, DriverNotLoaded, ...
            _state["error"] = _reason(e)
        return _state["module"]


def _reason(e: Exception) -> str:
    text = str(e) or type(e).__name__
    if isinstance(e, ImportError):
        return "the nvidia-ml-py package is not installed"
    if "LibraryNotFound" in type(e).__name__ or "NVML Shared Library Not Found" in text:
        return "no NVIDIA driver (libnvidia-ml not found)"
    return f"NVML is not available: {text}"


def available() -> bool:
    return _module() is not None


def unavailable_reason() -> str | None:
    _module()
    return _state["error"]


def query(fn: Callable[..., Any] | str, *args: Any, default: Any = NA) -> Any:
    """Call a pynvml function by name (or object); any failure gives `default`."""
    nv = _module()
    if nv is None:
        return default
    try:
        func = getattr(nv, fn) if isinstance(fn, str) else fn
        return func(*args)
    except Exception:
        return default


def handle(index: int) -> Any:
    return query("nvmlDeviceGetHandleByIndex", index)


@dataclass(frozen=True, slots=True)
class GpuInfo:
    index: int
    name: str
    total_bytes: int


def list_gpus() -> list[GpuInfo]:
    count = query("nvmlDeviceGetCount", default=0) or 0
    gpus = []
    for i in range(count):
        h = handle(i)
        if h is None:
            continue
        name = query("nvmlDeviceGetName", h, default="GPU")
        if isinstance(name, bytes):
            name = name.decode(errors="replace")
        mem = query("nvmlDeviceGetMemoryInfo", h)
        gpus.append(GpuInfo(i, str(name), int(mem.total) if mem is not None else 0))
    return gpus


def reset_for_tests() -> None:
    """Forget the cached init so a test can make NVML (un)available."""
    with _lock:
        _state.update(initialized=False, error=None, module=None)
