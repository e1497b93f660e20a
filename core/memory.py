"""Memory accounting: bytes by category per logical device, counted allocation by allocation.

params       the parameters a device holds (a replica counts on every device that has one)
grads        their .grad tensors
optimizer    the optimizer's state tensors (Adam's moments and step counters, SGD's momentum)
activations  tensors autograd saved for backward, while they are alive
temporaries  everything else a step allocates and frees within itself: gradients of
             activations, the logits' gradient, FSDP's all-gathered parameters, optimizer scratch
other        what the strategy names: the batch, outputs, the loss, DDP's buckets, pipeline buffers

On a simulated device this count *is* its memory.  On sampled steps core.recorder sees every
storage an operation creates (and FSDP's storage resizes), as an allocator would, and
tells the ledger; the weak reference to each storage tells it when the storage is freed.
The total after every allocation is checked against the capacity: passing it raises
DeviceOutOfMemory, the counterpart of torch.cuda.OutOfMemoryError, naming the operation.
A storage's category is settled with hindsight at the end of the step (a new tensor in
backward becomes `grads` if it ends up as a .grad), so the breakdown at the step's peak
says what each byte was.

On CUDA the allocator is the truth: the categories are read from the tensors at phase
ends, and whatever else it holds at that same instant counts as `other`.

The host (placement.cpu_offload): FSDP can keep a device's parameter shards, their
gradients and the optimizer state in host memory and step there.  Those bytes leave the
device (its total, its capacity check, its categories) and are counted apart, by the same
categories, as the device's `host` bytes.  On a simulated device host and device are the
same CPU memory, so the ledger is told what is the host's: the shards and the optimizer
state, whatever the optimizer step allocates, and each gradient from the moment FSDP hands
it over (`to_host`, where a GPU would copy it out).  On CUDA they are CPU tensors.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch

from .config import human_bytes
from .devices import Device
from .events import CATEGORIES


class DeviceOutOfMemory(RuntimeError):
    """A simulated device went past its capacity (the counterpart of CUDA's OOM)."""

    def __init__(self, device: Device, phase: str, category: str, total: int, breakdown: dict[str, int],
                 op: str = "") -> None:
        self.device, self.phase, self.category, self.op = device, phase, category, op
        self.total, self.breakdown = total, breakdown
        where = f"{phase}, in {op}" if op else phase
        super().__init__(
            f"{device.label} ran out of memory in {where}: {category} pushed it to "
            f"{human_bytes(total, exact_against=device.capacity_bytes)} of its "
            f"{human_bytes(device.capacity_bytes, exact_against=total)} capacity"
        )


def _inner(t: torch.Tensor) -> torch.Tensor:
    """The tensor that holds t's memory: a wrapper subclass's one inner tensor (DTensor's
    local shard, the AsyncCollectiveTensor that wraps a functional collective's output),
    or t itself.

    A wrapper subclass (`_make_wrapper_subclass`) has a storage of its own with the full
    nbytes but no data (its data pointer is invalid): nothing was allocated for it.
    Counting it would count the collective's output again for the wrapper, and once more
    for each view of the wrapper (AsyncCollectiveTensor answers aten.view with a new
    wrapper), which no GPU allocates; the fake trace, where functional collectives wait at
    once and wrap nothing, would not see them."""
    while type(t) is not torch.Tensor and hasattr(t, "__tensor_flatten__"):
        names, _ = t.__tensor_flatten__()  # DTensor names its mesh too
        inner = [x for x in (getattr(t, n) for n in names) if isinstance(x, torch.Tensor)]
        if len(inner) != 1:
            break  # no such subclass in paralab: counted by its own (empty) storage
        t = inner[0]
    return t


def storage_of(t: torch.Tensor | torch.UntypedStorage) -> torch.UntypedStorage | None:
    """The storage behind t (shared by its views, and by wrappers of it); None for tensors
    without one."""
    if isinstance(t, torch.UntypedStorage):
        return t
    try:
        return _inner(t).untyped_storage()
    except (RuntimeError, NotImplementedError):  # tensor subclasses without storage
        return None


def tensor_bytes(tensors: Iterable[torch.Tensor | None]) -> int:
    """Bytes of the distinct storages behind these tensors (views are counted once)."""
    seen: dict[int, int] = {}
    for t in tensors:
        if t is not None and (s := storage_of(t)) is not None:
            seen[id(s)] = s.nbytes()
    return sum(seen.values())


def _is_parameter(t: torch.Tensor) -> bool:
    """A parameter, or a view of one (Linear saves weight.t()), FSDP's gathered ones included."""
    return isinstance(t, torch.nn.Parameter) or isinstance(t._base, torch.nn.Parameter)


class _Block:
    """One allocation: a storage's bytes from `born` to `died` (sequence numbers)."""

    __slots__ = ("device", "nbytes", "kind", "key", "born", "died", "host_from")

    def __init__(self, device: int, nbytes: int, kind: str | None, key: int, born: int) -> None:
        self.device, self.nbytes, self.kind, self.key, self.born = device, nbytes, kind, key, born
        self.died: int | None = None
        self.host_from: int | None = None
        """From this sequence number on the block is in host memory (CPU offload), off the device."""

    def on_device(self, seq: int) -> bool:
        return self.born <= seq and (self.died is None or self.died > seq) and \
            (self.host_from is None or self.host_from > seq)

    def on_host(self, seq: int) -> bool:
        return self.host_from is not None and self.host_from <= seq and (self.died is None or self.died > seq)


class MemoryLedger:
    """Bytes by category for the logical devices one process drives."""

    def __init__(self, devices: list[Device]) -> None:
        self.devices = {d.index: d for d in devices}
        self._params: dict[int, list[torch.Tensor]] = {d.index: [] for d in devices}
        self._optimizers: list[torch.optim.Optimizer] = []
        self.where: Callable[[], tuple[int, str]] = lambda: (devices[0].index, "setup")
        """(device, phase) the process is working in now: who an allocation belongs to."""
        self.op = ""
        """The operation running now (set by the recorder)."""
        self.recompute: Callable[[int], Any] = lambda device: contextlib.nullcontext()
        """The context a checkpointed block runs again in, inside backward (core.parallel.levers);
        the probe makes it the `recompute` phase, so its ops and its time say what they are."""
        self.peak: dict[int, int] = {d.index: 0 for d in devices}
        self.peak_phase: dict[int, str] = {d.index: "" for d in devices}
        self._live: dict[int, tuple[weakref.ref, _Block]] = {}
        self._blocks: list[_Block] = []
        self._total: dict[int, int] = dict.fromkeys(self.devices, 0)
        self._seq = 0
        self._step_peak: dict[int, tuple[int, int, str, str]] = {}
        self._oom: tuple[_Block, str, str] | None = None
        self._cuda: dict[int, tuple[int, dict[str, int], str]] = {}
        self.recording_allocations = False
        self.offloaded: set[int] = set()
        """Devices whose params, grads and optimizer state are host memory (CPU offload)."""
        self._host: dict[int, int] = dict.fromkeys(self.devices, 0)
        self._host_peak: dict[int, tuple[int, int]] = {}

    # ---- what lives where ---------------------------------------------------------------------

    def add_params(self, params: Iterable[torch.Tensor], device: int) -> None:
        self._params[device].extend(params)

    def set_params(self, params: Iterable[torch.Tensor], device: int) -> None:
        """Replace what `device` holds: replicas made anew each step (nn.DataParallel)
        are counted while they live and not kept alive by the ledger afterwards."""
        self._params[device] = list(params)
        for p in self._params[device]:
            self.track(p, device, "params")

    def add_optimizer(self, optimizer: torch.optim.Optimizer) -> None:
        self._optimizers.append(optimizer)

    def offload(self, device: int) -> None:
        """This device's params, grads and optimizer state live in host memory, and its
        optimizer step runs there (FSDP's CPUOffloadPolicy)."""
        self.offloaded.add(device)

    def set_other(self, device: int, tensors: Iterable[Any]) -> None:
        """Name tensors of this step that are neither params nor saved activations (batch,
        output, loss, communication buffers); counted from now if no operation made them."""
        for t in tensors:
            if isinstance(t, (torch.Tensor, torch.UntypedStorage)):
                self.track(t, device, "other", keep_activation=True)

    def _optimizer_state(self, device: int) -> list[torch.Tensor]:
        ids = {id(p) for p in self._params[device]}
        return [v for opt in self._optimizers for p, s in opt.state.items() if id(p) in ids
                for v in s.values() if isinstance(v, torch.Tensor)]

    # ---- allocation by allocation (simulated devices, sampled steps) --------------------------

    def begin_step(self) -> None:
        """Start counting afresh: what exists now is params, grads and optimizer state."""
        self._live.clear()
        self._blocks = []
        self._total = dict.fromkeys(self.devices, 0)
        self._seq = 0
        self._oom = None
        self._cuda.clear()
        self._host = dict.fromkeys(self.devices, 0)
        self._host_peak = {}
        for d in self.devices:
            self._step_peak[d] = (0, 0, "", "")
            host = d in self.offloaded
            for p in self._params[d]:
                self.track(p, d, "params", host=host)
                self.track(p.grad, d, "grads", host=host)
            for t in self._optimizer_state(d):
                self.track(t, d, "optimizer", host=host)

    def track(self, t: torch.Tensor | None, device: int, kind: str | None,
              keep_activation: bool = False, host: bool = False) -> None:
        """Count t's storage on `device` (or in its host memory) from now, if not counted
        yet, as `kind`."""
        block = self._counted(t, device, kind, host)
        if block is None:
            return
        if kind is not None and not (keep_activation and block.kind == "activations"):
            block.kind = kind
        if block.device != device:  # made while another device was at work (a batch, a copy)
            totals = self._total if block.host_from is None else self._host
            totals[block.device] -= block.nbytes
            totals[device] += block.nbytes
            block.device = device

    def to_host(self, t: torch.Tensor | None, device: int) -> None:
        """t's storage leaves `device` for its host memory (CPU offload's copy to the host)."""
        block = self._counted(t, device, None, True) if self.recording_allocations else None
        if block is not None and block.host_from is None:
            self._seq += 1
            block.host_from = self._seq
            self._total[block.device] -= block.nbytes
            self._add_host(block)

    def _counted(self, t: torch.Tensor | None, device: int, kind: str | None, host: bool) -> _Block | None:
        """The block of t's storage if it is counted already; otherwise (a storage no
        operation made) it is counted from now, as `kind`, and there is no block to update."""
        if t is None or (s := storage_of(t)) is None:
            return None
        got = self._live.get(id(s))
        if got is None:
            self.allocated(s, device, kind, host=host)
            return None
        return got[1]

    def allocated(self, storage: torch.UntypedStorage, device: int | None = None, kind: str | None = None,
                  host: bool = False) -> None:
        """A storage that did not exist before (or was resized): count it on its device, or
        in its host memory (`host`; and all that an offloaded device's optimizer step makes)."""
        key = id(storage)
        if key in self._live:
            self._free(key)
        nbytes = storage.nbytes()
        if not nbytes:
            return
        if device is None:
            device = self.where()[0]
        self._seq += 1
        block = _Block(device, nbytes, kind, key, self._seq)
        self._live[key] = (weakref.ref(storage, lambda _r, k=key, b=block: self._freed(k, b)), block)
        self._blocks.append(block)
        if host or (device in self.offloaded and self.where()[1] == "optimizer"):
            block.host_from = self._seq
            self._add_host(block)
            return
        total = self._total[device] = self._total[device] + nbytes
        if total > self._step_peak[device][0]:
            self._step_peak[device] = (total, self._seq, self.where()[1], self.op)
            dev = self.devices[device]
            if dev.kind == "sim" and total > dev.capacity_bytes and self._oom is None:
                self._oom = (block, self.where()[1], self.op)

    def _add_host(self, block: _Block) -> None:
        total = self._host[block.device] = self._host[block.device] + block.nbytes
        if total > self._host_peak.get(block.device, (0, 0))[0]:
            self._host_peak[block.device] = (total, self._seq)

    def resized(self, storage: torch.UntypedStorage) -> None:
        """FSDP allocates and frees its gathered parameters by resizing their storages."""
        key = id(storage)
        got = self._live.get(key)
        self.op = "a storage resize (FSDP's gathered parameters)"
        self._free(key)
        if storage.nbytes():
            self.allocated(storage, got[1].device if got else None, got[1].kind if got else None)

    def _free(self, key: int) -> None:
        got = self._live.pop(key, None)
        if got is not None:
            self._freed(key, got[1])

    def _freed(self, key: int, block: _Block) -> None:
        if block.died is not None:
            return
        self._seq += 1
        block.died = self._seq
        (self._total if block.host_from is None else self._host)[block.device] -= block.nbytes
        got = self._live.get(key)
        if got is not None and got[1] is block:
            del self._live[key]

    def is_params(self, storage: torch.UntypedStorage | None) -> bool:
        """Whether this storage is counted as a device's parameters now."""
        got = self._live.get(id(storage)) if storage is not None else None
        return got is not None and got[1].kind == "params"

    def mark_saved(self, t: torch.Tensor) -> None:
        """Autograd saved t for backward: an activation (parameters excepted)."""
        if _is_parameter(t) or (s := storage_of(t)) is None:
            return
        got = self._live.get(id(s))
        if got is not None:
            if got[1].kind in (None, "other"):  # a replica's parameters stay parameters
                got[1].kind = "activations"
        else:
            self.allocated(s, None, "activations")

    def raise_pending(self) -> None:
        """An allocation passed a capacity: raise now that its category is known."""
        if self._oom is None:
            return
        block, phase, op = self._oom
        self._oom = None
        device = self.devices[block.device]
        now = self._breakdown_at(block.device, self._seq)
        raise DeviceOutOfMemory(device, phase, self._category(block, *self._settled()), sum(now.values()), now, op)

    def _settled(self) -> tuple[set[int], set[int]]:
        grads = {id(s) for ps in self._params.values() for p in ps
                 if p.grad is not None and (s := storage_of(p.grad)) is not None}
        state = {id(s) for d in self.devices for t in self._optimizer_state(d) if (s := storage_of(t)) is not None}
        return grads, state

    @staticmethod
    def _category(block: _Block, grads: set[int], state: set[int]) -> str:
        if block.kind is not None:
            return block.kind
        if block.key in grads and block.died is None:
            return "grads"
        if block.key in state and block.died is None:
            return "optimizer"
        return "temporaries"

    def _breakdown_at(self, device: int, seq: int) -> dict[str, int]:
        grads, state = self._settled()
        out = dict.fromkeys(CATEGORIES, 0)
        for b in self._blocks:
            if b.device == device and b.on_device(seq):
                out[self._category(b, grads, state)] += b.nbytes
        return out

    def _host_breakdown_at(self, device: int, seq: int) -> dict[str, int]:
        grads, state = self._settled()
        out = dict.fromkeys(CATEGORIES, 0)
        for b in self._blocks:
            if b.device == device and b.on_host(seq):
                out[self._category(b, grads, state)] += b.nbytes
        return out

    # ---- saved tensors --------------------------------------------------------------------------

    @contextlib.contextmanager
    def recording(self, device: int) -> Iterator[None]:
        """Count the tensors autograd saves for backward as activations (on sampled steps)."""
        if not self.recording_allocations:
            yield
            return

        def pack(t: torch.Tensor) -> torch.Tensor:
            self.mark_saved(t)
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            yield

    # ---- reading ------------------------------------------------------------------------------

    def breakdown(self, device: int) -> dict[str, int]:
        """Bytes by category now, on the device (what is offloaded to the host excepted)."""
        if self.recording_allocations:
            return self._breakdown_at(device, self._seq)
        if device in self.offloaded:
            return dict.fromkeys(CATEGORIES, 0)
        return self._held(device)

    def _held(self, device: int) -> dict[str, int]:
        params = self._params[device]
        return {**dict.fromkeys(CATEGORIES, 0), "params": tensor_bytes(params),
                "grads": tensor_bytes(p.grad for p in params),
                "optimizer": tensor_bytes(self._optimizer_state(device))}

    def host_peak(self, device: int) -> dict[str, int]:
        """What an offloaded device keeps in host memory, by category, at the host's highest
        this step (a sampled step's optimizer scratch included); {} for a device that keeps
        everything on itself.  On CUDA, where allocations are not counted one by one: its CPU
        tensors (shards, gradients, optimizer state) as the step began, or now if unsampled."""
        if device not in self.offloaded:
            return {}
        if device in self._host_peak:
            return self._host_breakdown_at(device, self._host_peak[device][1])
        return self._held(device)

    def checkpoint(self, phase: str) -> None:
        """The end of a phase.  Simulated devices: raise a pending out-of-memory.  CUDA: the
        categories and the allocator's total at the same instant (the rest is `other`)."""
        self.raise_pending()
        for index, device in self.devices.items():
            if device.kind != "cuda" or not torch.cuda.is_available():
                continue
            now = self.breakdown(index)
            # The allocator counts per GPU: with several of this process's logical devices on
            # one GPU it would give each the others' memory too; there the categories alone count.
            if sum(d.gpu == device.gpu for d in self.devices.values()) == 1:
                allocated = torch.cuda.memory_allocated(torch.device(device.torch_device))
                now["other"] = max(0, allocated - sum(now.values()))
            if sum(now.values()) >= self._cuda.get(index, (-1,))[0]:
                self._cuda[index] = (sum(now.values()), now, phase)

    def end_step(self) -> None:
        self.raise_pending()
        peaks = {d: (t, 0, phase, "") for d, (t, _, phase) in self._cuda.items()}
        for d, (total, _, phase, _) in (self._step_peak | peaks).items():
            if total > self.peak[d]:
                self.peak[d], self.peak_phase[d] = total, phase

    def step_peak(self, device: int) -> tuple[dict[str, int], str, str]:
        """The breakdown at this step's highest total, the phase and the operation there."""
        if device in self._cuda and not self.recording_allocations:
            _, now, phase = self._cuda[device]
            return dict(now), phase, ""
        total, seq, phase, op = self._step_peak.get(device, (0, 0, "", ""))
        return self._breakdown_at(device, seq), phase, op

    def cuda_extra(self, device: Device) -> tuple[int, dict[str, Any]]:
        """(allocator peak, {reserved, allocated}) for a CUDA device; (0, {}) otherwise."""
        if device.kind != "cuda" or not torch.cuda.is_available():
            return 0, {}
        dev = torch.device(device.torch_device)
        return torch.cuda.max_memory_allocated(dev), {
            "reserved": torch.cuda.memory_reserved(dev),
            "allocated": torch.cuda.memory_allocated(dev),
        }
