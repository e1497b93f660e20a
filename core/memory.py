"""Memory accounting: bytes by category per logical device, counted from the tensors.

params       the parameters a device holds (a replica counts on every device that has one)
grads        their .grad tensors
optimizer    the optimizer's state tensors (Adam's moments, SGD's momentum)
activations  tensors autograd saved for backward, counted while they are alive
other        batches, outputs, losses and buffers the strategy registers; on CUDA also
             whatever else the allocator holds (allocated − the categories above)

A simulated device's memory *is* this count, and passing its capacity raises
DeviceOutOfMemory, the counterpart of torch.cuda.OutOfMemoryError.  On CUDA the same
categories are read from the tensors, and the allocator adds peak, reserved, and NVML
adds non_torch (used − reserved: the CUDA context, NCCL buffers).

Totals are taken at phase boundaries (after setup, forward, backward, optimizer) on
sampled steps; the peak is the largest total seen at those points.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Iterable, Iterator
from typing import Any

import torch

from .config import human_bytes
from .devices import Device
from .events import CATEGORIES


class _Packed:
    """A saved tensor as autograd's graph holds it."""

    __slots__ = ("tensor", "__weakref__")

    def __init__(self, tensor: torch.Tensor) -> None:
        self.tensor = tensor


class DeviceOutOfMemory(RuntimeError):
    """A simulated device went past its capacity (the counterpart of CUDA's OOM)."""

    def __init__(self, device: Device, phase: str, category: str, total: int, breakdown: dict[str, int]) -> None:
        self.device = device
        self.phase = phase
        self.category = category
        self.total = total
        self.breakdown = breakdown
        super().__init__(
            f"{device.label} ran out of memory in {phase}: {category} pushed it to "
            f"{human_bytes(total)} of its {human_bytes(device.capacity_bytes)} capacity"
        )


def _storage_key(t: torch.Tensor) -> tuple[int, str] | None:
    """The identity of the storage behind t (shared by its views), or None for tensors
    without storage and empty ones.  The storage object's address, not its data pointer:
    fake tensors (core.estimate traces on them) have storages but no data."""
    try:
        s = t.untyped_storage()
    except (RuntimeError, NotImplementedError):  # tensor subclasses without storage
        return None
    return (s._cdata, str(t.device)) if s.nbytes() else None


def tensor_bytes(tensors: Iterable[torch.Tensor | None]) -> int:
    """Bytes of the distinct storages behind these tensors (views are counted once)."""
    seen: set[tuple[int, str]] = set()
    total = 0
    for t in tensors:
        if t is None:
            continue
        t = _local(t)
        key = _storage_key(t)
        if key is None or key in seen:
            continue
        seen.add(key)
        total += t.untyped_storage().nbytes()
    return total


def _local(t: torch.Tensor) -> torch.Tensor:
    """The local shard of a DTensor, or the tensor itself."""
    local = getattr(t, "_local_tensor", None)
    return local if isinstance(local, torch.Tensor) else t


def _is_parameter(t: torch.Tensor) -> bool:
    """A parameter, or a view of one (Linear saves weight.t()).  It catches parameters
    the ledger was not given, such as FSDP's all-gathered full weights: those are
    parameters saved for backward, never activations."""
    return isinstance(t, torch.nn.Parameter) or isinstance(t._base, torch.nn.Parameter)


class MemoryLedger:
    """Bytes by category for the logical devices one process drives."""

    def __init__(self, devices: list[Device]) -> None:
        self.devices = {d.index: d for d in devices}
        self._params: dict[int, list[torch.nn.Parameter]] = {d.index: [] for d in devices}
        self._optimizers: list[torch.optim.Optimizer] = []
        self._saved: dict[int, dict[tuple[int, str], tuple[int, list[weakref.ref]]]] = {d.index: {} for d in devices}
        self._other: dict[int, list[torch.Tensor]] = {d.index: [] for d in devices}
        self._param_keys: set[tuple[int, str]] = set()
        self.peak: dict[int, int] = {d.index: 0 for d in devices}
        self.peak_phase: dict[int, str] = {d.index: "" for d in devices}
        self._last: dict[int, dict[str, int]] = {d.index: dict.fromkeys(CATEGORIES, 0) for d in devices}
        self._step_peak: dict[int, tuple[int, dict[str, int], str]] = {d.index: (0, self._last[d.index], "") for d in devices}

    # ---- what lives where ---------------------------------------------------------------------

    def add_params(self, params: Iterable[torch.nn.Parameter], device: int) -> None:
        self._params[device].extend(params)
        self._refresh_param_keys()

    def set_params(self, params: Iterable[torch.Tensor], device: int) -> None:
        """Replace what `device` holds: replicas made anew each step (nn.DataParallel)
        are counted while they live and not kept alive by the ledger afterwards."""
        self._params[device] = list(params)
        self._refresh_param_keys()

    def add_optimizer(self, optimizer: torch.optim.Optimizer) -> None:
        self._optimizers.append(optimizer)

    def set_other(self, device: int, tensors: Iterable[torch.Tensor]) -> None:
        """Tensors of this step that are neither params nor saved activations (batch, output, loss).
        Kept detached: the ledger must not keep an output's autograd graph alive."""
        self._other[device] = [t.detach() for t in tensors if isinstance(t, torch.Tensor)]

    def _refresh_param_keys(self) -> None:
        self._param_keys = {k for ps in self._params.values() for p in ps if (k := _storage_key(_local(p)))}

    @contextlib.contextmanager
    def recording(self, device: int) -> Iterator[None]:
        """Count the tensors autograd saves for backward as `device`'s activations.

        Each saved tensor is wrapped in a small object that only autograd's graph
        holds; when the graph frees it (after backward), the activation is gone."""
        saved = self._saved[device]
        param_keys = self._param_keys

        def pack(t: torch.Tensor) -> Any:
            local = _local(t)
            key = _storage_key(local)
            if key is None or key in param_keys or _is_parameter(t):
                return t
            packed = _Packed(t)
            entry = saved.get(key)
            if entry is not None and all(r() is None for r in entry[1]):
                entry = None  # a freed storage's address, reused by a new one
            if entry is None:
                entry = saved[key] = (local.untyped_storage().nbytes(), [])
            entry[1].append(weakref.ref(packed))
            return packed

        def unpack(packed: Any) -> torch.Tensor:
            return packed.tensor if isinstance(packed, _Packed) else packed

        with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
            yield

    # ---- reading ------------------------------------------------------------------------------

    def live_activations(self, device: int) -> int:
        saved = self._saved[device]
        dead = [k for k, (_, refs) in saved.items() if all(r() is None for r in refs)]
        for k in dead:
            del saved[k]
        return sum(n for n, _ in saved.values())

    def breakdown(self, device: int) -> dict[str, int]:
        params = self._params[device]
        state: list[torch.Tensor] = []
        ids = {id(p) for p in params}
        for opt in self._optimizers:
            for p, s in opt.state.items():
                if id(p) in ids:
                    state.extend(v for v in s.values() if isinstance(v, torch.Tensor) and v.dim() > 0)
        # Scalar step counters are 4-8 bytes; counting them would only add noise.
        return {
            "params": tensor_bytes(params),
            "grads": tensor_bytes(p.grad for p in params),
            "optimizer": tensor_bytes(state),
            "activations": self.live_activations(device),
                # A batch that autograd also saved is counted once, as an activation.
            "other": tensor_bytes(t for t in self._other[device]
                                  if _storage_key(_local(t)) not in self._saved[device]),
        }

    def checkpoint(self, phase: str) -> None:
        """Take totals now; raise DeviceOutOfMemory if a simulated device is past capacity."""
        for index, device in self.devices.items():
            now = self.breakdown(index)
            total = sum(now.values())
            if total > self.peak[index]:
                self.peak[index], self.peak_phase[index] = total, phase
            if total > self._step_peak[index][0]:
                self._step_peak[index] = (total, now, phase)
            before = self._last[index]
            self._last[index] = now
            if device.kind == "sim" and total > device.capacity_bytes:
                grew = max(CATEGORIES, key=lambda c: now[c] - before[c])
                raise DeviceOutOfMemory(device, phase, grew, total, now)

    def step_peak(self, device: int) -> tuple[dict[str, int], str]:
        """The breakdown at the highest total since `begin_step`, and the phase it ended."""
        _, breakdown, phase = self._step_peak[device]
        return dict(breakdown), phase

    def begin_step(self) -> None:
        for index in self._step_peak:
            self._step_peak[index] = (0, self._last[index], "")

    def cuda_extra(self, device: Device) -> tuple[int, dict[str, Any]]:
        """(allocator peak, {reserved, allocated}) for a CUDA device; (0, {}) otherwise."""
        if device.kind != "cuda" or not torch.cuda.is_available():
            return 0, {}
        dev = torch.device(device.torch_device)
        return torch.cuda.max_memory_allocated(dev), {
            "reserved": torch.cuda.memory_reserved(dev),
            "allocated": torch.cuda.memory_allocated(dev),
        }
