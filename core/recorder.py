"""The dispatch-level recorder: every operation a rank runs on a sampled step, as the
device would see it.

A TorchDispatchMode sits below autograd, so it sees the operations that really run —
forward, backward (autograd's own), the optimizer, and c10d's collectives — each with
its real shapes.  It tells two listeners:

  the ledger  (core.memory)  every storage an operation creates, on the device working
                             now, and every storage FSDP resizes: memory by allocation
  the clock   (core.clock)   each operation with its inputs and outputs, to give it a
                             modelled duration on the chosen GPU

It is entered on sampled steps only, so other steps pay nothing.  DTensor operations are
passed on (NotImplemented) so that the local operations DTensor turns them into, and its
collectives, come back here: those are what a device runs.  The same recorder runs in the
estimate's trace, on fake tensors.
"""

from __future__ import annotations

import contextlib
import functools
import threading
from typing import Any

import torch
from torch._guards import active_fake_mode
from torch.distributed.tensor import DTensor
from torch.utils._python_dispatch import TorchDispatchMode

from .memory import MemoryLedger, storage_of

_WAIT = torch.ops._c10d_functional.wait_tensor.default
_TO_COPY = torch.ops.aten._to_copy.default
_local = threading.local()


@contextlib.contextmanager
def quiet() -> Any:
    """Ops run inside are not the device's work (shape inference on stand-in tensors):
    the recorder neither counts nor times them."""
    _local.quiet = getattr(_local, "quiet", 0) + 1
    try:
        yield
    finally:
        _local.quiet -= 1


class Recorder(TorchDispatchMode):
    def __init__(self, ledger: MemoryLedger, on_op: Any = None) -> None:
        super().__init__()
        self.ledger = ledger
        self.on_op = on_op
        """Called as on_op(func, args, kwargs, out) after each operation (core.clock)."""
        self._fake = None
        self._resize: Any = None

    def __enter__(self) -> Recorder:
        self._fake = active_fake_mode()
        self.ledger.recording_allocations = True
        self._patch_resize()
        return super().__enter__()

    def __exit__(self, *exc: Any) -> None:
        try:
            super().__exit__(*exc)
        finally:
            torch.UntypedStorage.resize_ = self._resize
            self.ledger.recording_allocations = False

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        if DTensor in types:
            return NotImplemented  # DTensor desugars into local ops, which come back here
        kwargs = kwargs or {}
        ledger = self.ledger
        ledger.raise_pending()
        # The fake kernel of wait_tensor returns a new tensor; the real one returns its input.
        out = args[0] if func is _WAIT and self._fake is not None else func(*args, **kwargs)
        if active_fake_mode() is not self._fake or getattr(_local, "quiet", 0):
            return out  # DTensor's shape propagation on its own fake tensors, not the device's work
        ledger.op = func.__name__
        inputs = {id(s) for t in tensors_in((args, kwargs)) if (s := storage_of(t)) is not None}
        # A cast of a parameter (autocast's bf16 copy of a weight) is a working copy of it,
        # as FSDP's gathered parameters are: temporaries, even when autograd saves it.
        kind = "temporaries" if func is _TO_COPY and ledger.is_params(storage_of(args[0])) else None
        for t in tensors_in(out):
            if (s := storage_of(t)) is not None and id(s) not in inputs:
                ledger.allocated(s, None, kind)
        if self.on_op is not None:
            self.on_op(func, args, kwargs, out)
        return out

    def _patch_resize(self) -> None:
        # Storage resizes do not go through the dispatcher; FSDP2 allocates and frees its
        # gathered parameters that way (torch's MemTracker patches the same method).
        original = self._resize = torch.UntypedStorage.resize_
        ledger, me = self.ledger, threading.get_ident()

        @functools.wraps(original)
        def resize_(storage: torch.UntypedStorage, size: int) -> Any:
            out = original(storage, size)
            if threading.get_ident() == me:  # a GUI may trace while its other threads go on
                ledger.resized(storage)
                ledger.raise_pending()
            return out

        torch.UntypedStorage.resize_ = resize_


def tensors_in(obj: Any) -> list[torch.Tensor]:
    """The tensors in an op's arguments or results (tuples, lists, dicts of them): what
    torch's pytree would give, at a fraction of its cost on every op of a sampled step."""
    if isinstance(obj, torch.Tensor):
        return [obj]
    out: list[torch.Tensor] = []
    stack = [obj]
    while stack:
        x = stack.pop()
        if isinstance(x, torch.Tensor):
            out.append(x)
        elif isinstance(x, (tuple, list)):
            stack.extend(reversed(x))
        elif isinstance(x, dict):
            stack.extend(reversed(list(x.values())))
    return out
