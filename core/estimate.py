"""Predict each device's peak memory by category, before a run: by formula and by trace.

trace    runs the mode's own strategy (`apply_<mode>` and two training steps) on fake
         tensors (FakeTensorMode: shapes, dtypes and aliasing, no data), with the same
         MemoryLedger and Probe a rank uses.  The numbers are therefore what a run would
         report, category by category, without allocating the memory.  Multi-process
         modes are traced one rank at a time on torch's fake process group, whose
         collectives do nothing: each rank's own tensors are all the ledger counts.
formula  counts bytes from the model's shapes and the mode's rule for who holds what
         (replicated, sharded, split by layers).  Cheap and explainable, less exact.

A CUDA device is traced as a simulated one of the same capacity: the ledger's categories
are the same, the allocator's extra (reserved, non_torch) is not predicted.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import importlib
import math
import os
import threading
import time
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .config import ConfigError, ModelConfig, RunConfig, human_bytes
from .devices import Device, resolve
from .events import CATEGORIES, MemorySample

METHODS = ("both", "formula", "trace")
TRACE_STEPS = 2  # step 2 has what every later step has: last step's grads and the optimizer state
# Modes whose ranks run the same code on their own shard or share of the batch: ranks whose
# tensors have the same sizes give the same trace, so only distinct ones are traced.
SYMMETRIC = ("ddp", "fsdp", "tensor-parallel")


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
    """Trace: the phase at whose end the peak was reached."""

    @property
    def fits(self) -> bool:
        return self.peak_bytes <= self.capacity_bytes

    def to_json(self) -> dict[str, Any]:
        return {"device": self.device, "label": self.label, "peak_bytes": self.peak_bytes,
                "bytes": dict(self.bytes), "capacity_bytes": self.capacity_bytes, "fits": self.fits,
                "phase": self.phase}


@dataclass
class Estimate:
    method: str
    """What was asked: both, formula or trace."""
    by_method: dict[str, list[DeviceEstimate]]
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def devices(self) -> list[DeviceEstimate]:
        """The best prediction there is: the trace, or the formula where there is no trace."""
        return self.by_method.get("trace") or self.by_method["formula"]

    @property
    def fits(self) -> bool:
        return all(d.fits for d in self.devices)

    def to_json(self) -> dict[str, Any]:
        return {"devices": [d.to_json() for d in self.devices],
                "method": "trace" if "trace" in self.by_method else "formula",
                "requested": self.method,
                "methods": {m: [d.to_json() for d in ds] for m, ds in self.by_method.items()},
                "fits": self.fits, "notes": list(self.notes), "seconds": round(self.seconds, 3)}

    def table(self) -> str:
        cols = ("device", "method", *CATEGORIES, "peak", "capacity", "")
        rows = []
        for method, ds in self.by_method.items():
            for d in ds:
                rows.append((d.label, method, *(human_bytes(d.bytes[c]) for c in CATEGORIES),
                             human_bytes(d.peak_bytes), human_bytes(d.capacity_bytes),
                             "fits" if d.fits else "OUT OF MEMORY"))
        rows.sort(key=lambda r: (int("".join(ch for ch in r[0] if ch.isdigit()) or 0), r[1]))
        widths = [max(len(str(r[i])) for r in (cols, *rows)) for i in range(len(cols))]
        lines = ["  ".join(str(v).rjust(w) if i >= 2 else str(v).ljust(w)
                           for i, (v, w) in enumerate(zip(r, widths))).rstrip() for r in (cols, *rows)]
        verdict = ("every device fits" if self.fits
                   else "won't fit: " + ", ".join(d.label for d in self.devices if not d.fits))
        return "\n".join([*lines, "", verdict, *(f"note: {n}" for n in self.notes)])


def estimate(cfg: RunConfig, method: str = "both", devices: list[Device] | None = None) -> Estimate:
    """Per-device predicted peak memory of a run of `cfg`.

    "both" gives the formula and the trace side by side; when the trace cannot run (a
    mode without a strategy yet, an op fake tensors lack) the formula stands alone and
    `notes` says why.  "trace" alone raises EstimateError instead."""
    if method not in METHODS:
        raise ConfigError(f"estimate method {method!r} is not one of: {', '.join(METHODS)}")
    problems = cfg.validate(resolve_devices=devices is None)
    if problems:
        raise ConfigError("; ".join(problems))
    devices = devices if devices is not None else resolve(cfg.devices, cfg.sim.memory)
    start = time.perf_counter()
    result = Estimate(method, {})
    if method in ("both", "formula"):
        result.by_method["formula"] = formula(cfg, devices)
    if method in ("both", "trace"):
        try:
            result.by_method["trace"] = trace(cfg, devices)
        except EstimateError as e:
            if method == "trace":
                raise
            result.notes.append(f"no trace, formula only: {e}")
    result.seconds = time.perf_counter() - start
    return result


# ---- trace -------------------------------------------------------------------------------------

_trace_lock = threading.Lock()  # the fake process group and the ledger's key are process-wide


def trace(cfg: RunConfig, devices: list[Device]) -> list[DeviceEstimate]:
    from .parallel import STRATEGIES, world_size

    world = world_size(cfg.mode, len(devices))
    distributed = STRATEGIES[cfg.mode].one_process_per_device
    # Room without limit, so the trace runs to its peak; capacity is compared afterwards.
    roomy = [dataclasses.replace(d, kind="sim", capacity_bytes=2**62, gpu=None, share=1) for d in devices]
    found: dict[int, tuple[dict[str, int], int, str]] = {}
    try:  # imported before any patching, so the module binds the real torch classes
        module = importlib.import_module(f"{__package__}.parallel.{STRATEGIES[cfg.mode].module}")
    except ModuleNotFoundError as e:
        raise EstimateError(f"mode {cfg.mode} has no strategy to trace yet: {e}") from None
    with _trace_lock, _fake_tensors(), _stand_ins(module):
        for ranks in rank_groups(cfg, world):
            try:
                got = _trace_rank(cfg, roomy, ranks[0], world, distributed)
            except EstimateError:
                raise
            except Exception as e:
                detail = str(e).splitlines()[0] if str(e) else type(e).__name__
                raise EstimateError(f"tracing {cfg.mode} rank {ranks[0]} on fake tensors failed: {detail}") from e
            found.update(got)
            for r in ranks[1:]:  # one device per rank in the symmetric modes
                found[r] = got[ranks[0]]
    out = []
    for d in devices:
        bytes_, peak, phase = found[d.index]
        out.append(DeviceEstimate(d.index, d.label, peak, dict(bytes_), d.capacity_bytes, "trace", phase))
    return out


def rank_groups(cfg: RunConfig, world: int) -> list[list[int]]:
    """Ranks grouped by what their trace would be; only the first of each group is traced.

    In the symmetric modes a rank's tensors differ from another's only by the shard sizes,
    and DTensor and FSDP cut a dim the way torch.chunk does: ranks with the same chunk
    sizes along dims 0 and 1 of every parameter run the same program on the same shapes."""
    if cfg.mode not in SYMMETRIC or world == 1:
        return [[r] for r in range(world)]
    if cfg.mode == "ddp":
        return [list(range(world))]  # full replicas, equal slices of the batch
    shapes = [s for layer in meta_shapes(cfg.model) for s in layer]
    groups: dict[tuple, list[int]] = {}
    for r in range(world):
        key = tuple(tuple(_chunk_len(n, world, r) for n in s[:2]) for s in shapes)
        groups.setdefault(key, []).append(r)
    return list(groups.values())


def _chunk_len(n: int, world: int, r: int) -> int:
    size = -(-n // world)
    return max(0, min(size, n - r * size))


def _trace_rank(cfg: RunConfig, devices: list[Device], rank: int, world: int,
                distributed: bool) -> dict[int, tuple[dict[str, int], int, str]]:
    """One rank's setup and first steps, as worker._run does them, on fake tensors."""
    from . import worker
    from .memory import MemoryLedger
    from .parallel import STRATEGIES

    job = worker.RankJob(cfg.to_dict(), devices, rank, world, time.perf_counter(), os.getpid())
    local = worker._local_devices(job, cfg)
    ledger = MemoryLedger(local)
    ctx = worker.RankContext(job, cfg, local, ledger)
    best: dict[int, tuple[int, dict[str, int], str]] = {d.index: (-1, {}, "") for d in local}
    with _fake_world(rank, world, distributed) as group:
        ctx.group = group
        probe = worker.Probe(ctx)
        trainer = STRATEGIES[cfg.mode].apply(ctx)
        for step in range(1, min(TRACE_STEPS, cfg.train.steps) + 1):
            probe.active, probe.step = True, step
            ledger.begin_step()
            trainer.step(step, probe)
            probe.spans.clear()
            for opt in trainer.optimizers:
                # Its state exists now and later steps only change values in place: on
                # fake tensors the step is a third of the trace's time and adds no byte.
                opt.step = _no_step
            for d in local:
                bytes_, phase = ledger.step_peak(d.index)
                if sum(bytes_.values()) > best[d.index][0]:
                    best[d.index] = (sum(bytes_.values()), bytes_, phase)
    return {d.index: (best[d.index][1], ledger.peak[d.index], best[d.index][2]) for d in local}


def _no_step(*args: Any, **kwargs: Any) -> None:
    return None


def _this_thread(patched: Any, original: Any) -> Any:
    """`patched` for the thread that traces, `original` for any other (a GUI traces in
    a background thread while its other threads go on)."""
    me = threading.get_ident()

    @functools.wraps(original, updated=())
    def call(*args: Any, **kwargs: Any) -> Any:
        return (patched if threading.get_ident() == me else original)(*args, **kwargs)

    return call


@contextlib.contextmanager
def _fake_tensors() -> Iterator[None]:
    """FakeTensorMode, and what it takes for a trace to count what a run counts:
    the ledger keys storages by identity (a fake storage's address is 0, which the ledger
    skips), and a few kernels whose real storage differs from their meta one are evened out."""
    import torch.nn.functional as F
    from torch._subclasses.fake_tensor import FakeTensorMode

    from . import data

    mode = FakeTensorMode(allow_non_fake_inputs=True)
    swap, mse = torch.utils.swap_tensors, F.mse_loss

    def swap_tensors(t1: Any, t2: Any) -> None:
        # model.to(device) swaps fake parameters, and swap_tensors refuses a tensor with a
        # weakref, which the mode's memo holds (pytorch issue #148977, PR #196558): forget
        # these two tensors in the memo first, which only costs a cache hit.
        memo = mode.fake_tensor_converter.meta_converter.tensor_memo
        for key, value in list(memo.items()):
            if value is t1 or value is t2:
                del memo[key]
        swap(t1, t2)

    def mse_loss(input: Any, target: Any, *args: Any, **kwargs: Any) -> Any:
        loss = mse(input, target, *args, **kwargs)
        if loss.dim() or input.device.type != "cpu":
            return loss
        # The CPU kernel returns the mean as a view into its buffer of squared errors, so a
        # real loss holds input-sized storage; the meta kernel's holds 4 bytes.
        n = max(torch.broadcast_shapes(input.shape, target.shape).numel(), 1)
        return torch.empty(n, dtype=loss.dtype, device=loss.device)[0].copy_(loss)

    def tokens(n: int, seq_len: int, vocab: int, g: Any) -> Any:
        # Shapes are all a trace needs; the Markov chain would cost seq_len fake steps.
        return data.Dataset(torch.zeros(n, seq_len, dtype=torch.long), torch.zeros(n, seq_len, dtype=torch.long))

    patches = [(torch.utils, "swap_tensors", swap_tensors),
               (F, "mse_loss", mse_loss), (data, "_markov_tokens", tokens)]
    originals = [(obj, name, getattr(obj, name)) for obj, name, _ in patches]
    try:
        for (obj, name, value), (_, _, original) in zip(patches, originals):
            setattr(obj, name, _this_thread(value, original))
        with warnings.catch_warnings(), mode:
            warnings.simplefilter("ignore")
            yield
    finally:
        for obj, name, value in originals:
            setattr(obj, name, value)


@contextlib.contextmanager
def _stand_ins(module: Any) -> Iterator[None]:
    """What cannot run on fake tensors, replaced in the strategy's module for the trace:
    DistributedDataParallel's reducer is C++ that reads tensor data (_TracedDDP instead),
    and a device mesh reads its rank map (it is made of real tensors, as in a run)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.nn.parallel import DistributedDataParallel

    def real_mesh(*args: Any, **kwargs: Any) -> Any:
        from torch._subclasses.fake_tensor import unset_fake_temporarily

        with unset_fake_temporarily():
            return init_device_mesh(*args, **kwargs)

    swaps = {DistributedDataParallel: _TracedDDP, init_device_mesh: real_mesh}
    names = {n: v for n, v in vars(module).items() if any(v is k for k in swaps)}
    for n, v in names.items():
        setattr(module, n, _this_thread(next(new for old, new in swaps.items() if old is v), v))
    try:
        with _pipeline_vote():
            yield
    finally:
        for n, v in names.items():
            setattr(module, n, v)


@contextlib.contextmanager
def _pipeline_vote() -> Iterator[None]:
    """Before its first step a pipeline schedule has the stages vote, over send/recv,
    whether they need shapes inferred at run time, and reads the result with .item().
    A rank traced alone cannot hear the others: its own vote stands for all of them
    (every paralab stage gives its shapes, so every stage votes the same)."""
    from torch.distributed.pipelining.stage import PipelineStage

    try:
        from torch.distributed.pipelining._utils import InferenceMode
    except ImportError:
        InferenceMode = None
    methods = ("_warmup_forward_vote", "_warmup_backward_result")
    if InferenceMode is None or not all(hasattr(PipelineStage, m) for m in methods):
        yield  # another torch: let the trace say what fails
        return

    def forward_vote(stage: Any, has_backward: bool, received_acc: Any = None) -> Any:
        vote = 0 if InferenceMode.needs_dynamic(stage._user_meta, has_backward) else 1
        return torch.tensor([vote], dtype=torch.int32)  # a fake constant: .item() works

    def backward_result(stage: Any, received_result: Any = None) -> Any:
        return received_result if received_result is not None else forward_vote(stage, True)

    originals = [getattr(PipelineStage, m) for m in methods]
    PipelineStage._warmup_forward_vote = _this_thread(forward_vote, originals[0])
    PipelineStage._warmup_backward_result = _this_thread(backward_result, originals[1])
    try:
        yield
    finally:
        PipelineStage._warmup_forward_vote, PipelineStage._warmup_backward_result = originals


class _TracedDDP(nn.Module):
    """DDP as the ledger sees it: the module, its gradients, and the gradient buckets the
    comm hook is handed.  DDP's buckets are flat copies of the gradients (25 MiB each)
    that together hold every gradient once: here one bucket holds them all, the same
    bytes.  As in DDP the hook runs once the last gradient has been accumulated."""

    def __init__(self, module: nn.Module, *args: Any, **kwargs: Any) -> None:
        super().__init__()
        self.module = module
        self._hook: tuple[Any, Any] | None = None
        params = [p for p in module.parameters() if p.requires_grad]
        self._bucket = _Bucket(torch.empty(sum(p.numel() for p in params), dtype=params[0].dtype,
                                           device=params[0].device), params)
        ready = [0]

        def accumulated(_p: Any) -> None:
            ready[0] += 1
            if ready[0] == len(params) and self._hook is not None:
                ready[0] = 0
                with _done_all_reduce():
                    self._hook[1](self._hook[0], self._bucket).wait()

        for p in params:
            p.register_post_accumulate_grad_hook(accumulated)

    def register_comm_hook(self, state: Any, hook: Any) -> None:
        self._hook = (state, hook)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.module(*args, **kwargs)


@contextlib.contextmanager
def _done_all_reduce() -> Iterator[None]:
    """The fake group's all_reduce future holds None; a real one holds [tensor], which
    DDP's hooks read: hand them a finished future with the (unchanged) tensor."""
    import torch.distributed as dist

    real = dist.all_reduce

    def all_reduce(tensor: Any, *args: Any, **kwargs: Any) -> Any:
        work = real(tensor, *args, **kwargs)
        if work is None:
            return None
        future: Any = torch.futures.Future()
        future.set_result([tensor])
        return _DoneWork(future)

    dist.all_reduce = all_reduce
    try:
        yield
    finally:
        dist.all_reduce = real


class _DoneWork:
    def __init__(self, future: Any) -> None:
        self._future = future

    def get_future(self) -> Any:
        return self._future

    def wait(self, *args: Any) -> bool:
        return True


class _Bucket:
    """The parts of dist.GradBucket a comm hook uses."""

    def __init__(self, buffer: Any, params: list) -> None:
        self._buffer, self._params = buffer, params

    def index(self) -> int:
        return 0

    def is_last(self) -> bool:
        return True

    def buffer(self) -> Any:
        return self._buffer

    def parameters(self) -> list:
        return self._params

    def gradients(self) -> list:
        return [p.grad for p in self._params]


@contextlib.contextmanager
def _fake_world(rank: int, world: int, distributed: bool) -> Iterator[Any]:
    """torch.distributed's fake process group: this rank alone, collectives that do nothing.
    Whatever group the strategy starts itself (a one-rank pipeline does) ends here too."""
    import torch.distributed as dist

    if dist.is_initialized():
        raise EstimateError("this process already has a torch.distributed process group; "
                            "trace in a process that trains nothing")
    try:
        if distributed:
            from torch.testing._internal.distributed.fake_pg import FakeStore

            dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=world)
        yield dist.group.WORLD if distributed else None
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


# ---- formula -----------------------------------------------------------------------------------

FLOAT = 4  # paralab trains in float32
LONG = 8


@dataclass(frozen=True)
class Shapes:
    """Bytes of a model, per layer: what the formula multiplies and adds."""

    params: list[int]
    """Parameter bytes of each layer."""
    saved: list[float]
    """Bytes autograd saves for backward per sample in each layer, each tensor once; a
    layer's output that the next layer saves counts here, with the layer that made it."""
    out: list[float]
    """Output bytes per sample of each layer (what crosses to the next device)."""
    io: float
    """Input and target bytes per sample (both saved: by the first layer and by the loss)."""
    unsaved: float
    """Output bytes per sample that autograd does not keep (the transformer's logits), and
    the loss (on the CPU, MSE's is a view of a buffer as large as the output)."""
    split: float
    """Per sample: the saved bytes of the blocks that tensor parallel splits."""
    keeps_output: tuple[bool, ...]
    """Per layer: whether the layer itself saves its output (a closing ReLU does)."""
    fixed: float = 0.0
    """Saved bytes that do not grow with the batch (the transformer's positions)."""
    loss: float = 0.0
    """Of `saved` on the last layer, per sample: what the loss keeps (output and target)."""


def shapes(cfg: RunConfig) -> Shapes:
    m = cfg.model
    params = layer_params(cfg)
    n = len(params)
    if m.kind in ("linear", "split-nn"):
        widths = [1] if m.kind == "linear" else [50, 20, 1]
        d_in = 1 if m.kind == "linear" else 10
        saved = [(d_in + w) * FLOAT for w in widths]
        saved[-1] = (d_in if n == 1 else 0) * FLOAT + 2 * FLOAT  # the loss keeps output and target
        return Shapes(params, saved, [w * FLOAT for w in widths], (d_in + 1) * FLOAT, FLOAT, 0.0,
                      (False,) if n == 1 else (True, True, False), loss=2 * FLOAT)
    if m.kind == "mlp":
        w = m.width
        # First layer: input and ReLU output; a block: its ReLU output (2w) and its own
        # output, which the next layer saves; the loss: output and target.
        saved = [(m.in_features + w) * FLOAT] + [3 * w * FLOAT] * m.depth + [2 * m.out_features * FLOAT]
        out = [w * FLOAT] * (n - 1) + [m.out_features * FLOAT]
        return Shapes(params, saved, out, (m.in_features + m.out_features) * FLOAT, m.out_features * FLOAT,
                      m.depth * 2 * w * FLOAT, (True,) + (False,) * (n - 1), loss=2 * m.out_features * FLOAT)
    d, t, v, h = m.width, m.seq_len, m.vocab, m.heads
    # A block saves per token: 2 norm outputs, q k v, attention output, the residual, the
    # 4d up-projection and its gelu, its own output (16 d); norm statistics (4) and
    # attention's log-sum-exp (one per head).
    block = t * (16 * d + 4 + h) * FLOAT
    embed = t * (LONG + d * FLOAT)  # token ids, the summed embedding
    head = t * ((d + v + 2) * FLOAT + LONG)  # norm output and statistics, log-softmax, targets
    saved = [embed] + [block] * m.depth + [head]
    out = [t * d * FLOAT] * (n - 1) + [t * v * FLOAT]
    return Shapes(params, saved, out, 2 * t * LONG, t * v * FLOAT, m.depth * t * (12 * d + h) * FLOAT,
                  (False,) * n, fixed=t * LONG + FLOAT, loss=t * (v * FLOAT + LONG))


def formula(cfg: RunConfig, devices: list[Device]) -> list[DeviceEstimate]:
    """Bytes from shapes: who holds which parameters, and how many samples' activations.

    The peak is taken where a run's is: at the end of a forward, with the last step's
    gradients still alive (zero_grad comes after the forward), or after a backward."""
    from .models import split_layers

    t, n, mode = cfg.train, len(devices), cfg.mode
    sh = shapes(cfg)
    state = 2 if t.optimizer in ("adam", "adamw") else 0
    B, total, everything = t.batch_size, sum(sh.params), range(len(sh.params))

    def device(p: float, samples: float, layers: Iterable[int] = everything, other: float = 0.0,
               grads: float | None = None, acts: float | None = None) -> dict[str, int]:
        a = samples * sum(sh.saved[i] for i in layers) + sh.fixed if acts is None else acts
        return {"params": int(p), "grads": int(p if grads is None else grads), "optimizer": int(state * p),
                "activations": int(a), "other": int(other)}

    per = B / n
    slices = (B - per) * sh.io  # a rank's slice of the batch is a view: its storage is the whole batch
    out: list[dict[str, int]] = []
    whole = B * sum(sh.saved) + sh.fixed
    if mode == "single":
        out = [device(total, B, other=B * sh.unsaved)]
    elif mode == "ddp":
        # DDP's buckets: one more flat copy of the gradients.
        out = [device(total, per, acts=whole - B * sum(sh.saved) + per * sum(sh.saved) + slices,
                      other=per * sh.unsaved + total) for _ in devices]
    elif mode == "fsdp":
        shard = _sharded_bytes(cfg, n, lambda name, shape: 0)
        gathered = 0 if cfg.placement.reshard_after_forward else total  # kept whole until backward
        out = [device(shard[r], per, acts=sh.fixed + per * sum(sh.saved) + slices,
                      other=per * sh.unsaved + gathered) for r in range(n)]
    elif mode == "tensor-parallel":
        shard = _sharded_bytes(cfg, n, _tensor_parallel_dim)
        acts = whole - B * sh.split * (1 - 1 / n)
        out = [device(shard[r], B, acts=acts, other=B * sh.unsaved) for r in range(n)]
    elif mode == "data-parallel":
        chunk = [len(c) for c in _chunks(B, n)] + [0] * n
        # Device 0: the module, its gradients and state, chunk 0 (a view of the whole
        # batch) and the gathered output; the others: a fresh replica and their chunk,
        # then after backward the replica's gradients.
        gather = B * sh.out[-1]
        out = [device(total, chunk[0], other=(B - chunk[0]) * sh.io + gather + B * sh.unsaved)]
        for k in range(1, n):
            # The loss is taken on device 0: what it saves is not here, the output is.
            fwd = device(total, chunk[k], grads=0, other=chunk[k] * sh.out[-1],
                         acts=chunk[k] * (sum(sh.saved) - sh.loss))
            fwd["optimizer"] = 0
            bwd = {**fwd, "grads": total, "activations": 0}
            out.append(max(fwd, bwd, key=lambda b: sum(b.values())))
    elif mode in ("model-parallel", "pipeline"):
        ranges = split_layers(len(sh.params), n, cfg.placement.split)
        for s, layers in enumerate(ranges):
            p = sum(sh.params[i] for i in layers)
            first, last = layers.start == 0, s == n - 1
            received = 0 if first else sh.out[layers.start - 1]  # the input copied in, saved here
            saved = sum(sh.saved[i] for i in layers) + received
            sent = sh.unsaved
            if not last:  # the output the next device saves lives here unsaved, or saved by its own ReLU
                end = layers.stop - 1
                saved -= 0 if sh.keeps_output[end] else sh.out[end]
                sent = 0 if sh.keeps_output[end] else sh.out[end]
            fixed = sh.fixed if first or last else 0
            if mode == "model-parallel":
                out.append(device(p, B, layers, acts=B * saved + fixed, other=B * sent))
                continue
            m = t.micro_batches
            in_flight = B if t.schedule == "gpipe" else min(m, n - s) * B / m
            acts = in_flight * saved + fixed
            buffers = 0 if last else B * sh.out[layers.stop - 1]  # a gradient buffer per micro-batch
            # zero_grad runs before the schedule: gradients exist mid-step only once a
            # micro-batch's backward has run, which 1F1B does before the last forward.
            grads = p if t.schedule == "1f1b" and m > n - s else 0
            fwd = device(p, in_flight, layers, grads=grads, acts=acts, other=buffers)
            bwd = device(p, 0, layers, acts=0, other=buffers)
            out.append(max(fwd, bwd, key=lambda b: sum(b.values())))
    return [DeviceEstimate(d.index, d.label, sum(b.values()), b, d.capacity_bytes, "formula")
            for d, b in zip(devices, out)]


def _chunks(batch: int, n: int) -> list[range]:
    size = -(-batch // n)  # torch.chunk's rule, as nn.DataParallel's scatter uses
    return [range(i, min(i + size, batch)) for i in range(0, batch, size)]


def _sharded_bytes(cfg: RunConfig, n: int, dim_of: Any) -> list[int]:
    """Parameter bytes of each rank when every parameter is cut along the dim
    `dim_of(name, shape)` gives (None: kept whole), padded as torch.chunk cuts."""
    from .models import build_model

    model = build_model(cfg.model, 0, device="meta")
    out = [0] * n
    for name, p in model.named_parameters():
        shape, dim = tuple(p.shape), dim_of(name, tuple(p.shape))
        if dim is None or dim >= len(shape):
            for r in range(n):
                out[r] += p.numel() * FLOAT
            continue
        rest = p.numel() // shape[dim]
        for r in range(n):
            # FSDP pads every shard to the largest (dim 0); DTensor keeps its chunk's size.
            rows = -(-shape[dim] // n) if dim == 0 and cfg.mode == "fsdp" else _chunk_len(shape[dim], n, r)
            out[r] += rows * rest * FLOAT
    return out


def _tensor_parallel_dim(name: str, shape: tuple[int, ...]) -> int | None:
    """The dim tensor parallel cuts: columns (dim 0) of a block's first Linear (fc1; q, k,
    v; up), rows (dim 1) of its second (fc2; out; down), whose bias stays whole."""
    leaf = name.split(".")[-2] if "." in name else ""
    if leaf in ("fc1", "q", "k", "v", "up"):
        return 0
    if leaf in ("fc2", "out", "down"):
        return 1 if name.endswith("weight") else None
    return None


@functools.lru_cache(maxsize=8)
def meta_shapes(model: ModelConfig) -> tuple[tuple[tuple[int, ...], ...], ...]:
    """Each layer's parameter shapes, from a model on the meta device (nothing allocated)."""
    from .models import build_model

    built = build_model(model, 0, device="meta")
    return tuple(tuple(tuple(p.shape) for p in layer.parameters()) for layer in built)


def layer_params(cfg: RunConfig) -> list[int]:
    """Parameter bytes of each layer."""
    return [sum(math.prod(s) for s in layer) * FLOAT for layer in meta_shapes(cfg.model)]


# ---- after a run -------------------------------------------------------------------------------


def measured_peaks(events: Iterable[Any]) -> dict[int, int]:
    """Each device's peak as the run measured it: the highest `peak_bytes` it reported."""
    out: dict[int, int] = {}
    for e in events:
        if isinstance(e, MemorySample):
            out[e.device] = max(out.get(e.device, 0), e.peak_bytes)
    return out


def compare(est: Estimate, events: Iterable[Any]) -> list[dict[str, Any]]:
    """Per device: predicted peak (trace, formula), measured peak, and each error in %
    ((predicted − measured) / measured; None where a number is missing)."""
    measured = measured_peaks(events)
    by = {m: {d.device: d for d in ds} for m, ds in est.by_method.items()}
    rows = []
    for d in est.devices:
        got = measured.get(d.device)
        row: dict[str, Any] = {"device": d.device, "label": d.label, "measured": got}
        for m in ("trace", "formula"):
            pred = by.get(m, {}).get(d.device)
            row[m] = pred.peak_bytes if pred else None
            row[f"{m}_error_pct"] = (100.0 * (pred.peak_bytes - got) / got if pred and got else None)
        rows.append(row)
    return rows
