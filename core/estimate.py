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
            for d in local:
                bytes_, phase = ledger.step_peak(d.index)
                if sum(bytes_.values()) > best[d.index][0]:
                    best[d.index] = (sum(bytes_.values()), bytes_, phase)
    return {d.index: (best[d.index][1], ledger.peak[d.index], best[d.index][2]) for d in local}


@contextlib.contextmanager
def _fake_tensors() -> Iterator[None]:
    """FakeTensorMode, and what it takes for a trace to count what a run counts:
    the ledger keys storages by identity (a fake storage's address is 0, which the ledger
    skips), and a few kernels whose real storage differs from their meta one are evened out."""
    import torch
    import torch.nn.functional as F
    from torch._subclasses.fake_tensor import FakeTensorMode

    from . import data, memory

    def storage_key(t: Any) -> tuple[int, str] | None:
        try:
            s = t.untyped_storage()
        except (RuntimeError, NotImplementedError):
            return None
        return (s._cdata, str(t.device)) if s.nbytes() else None

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

    patches = [(memory, "_storage_key", storage_key), (torch.utils, "swap_tensors", swap_tensors),
               (F, "mse_loss", mse_loss), (data, "_markov_tokens", tokens)]
    originals = [(obj, name, getattr(obj, name)) for obj, name, _ in patches]
    try:
        for obj, name, value in patches:
            setattr(obj, name, value)
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
        setattr(module, n, next(new for old, new in swaps.items() if old is v))
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
    PipelineStage._warmup_forward_vote, PipelineStage._warmup_backward_result = forward_vote, backward_result
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


def formula(cfg: RunConfig, devices: list[Device]) -> list[DeviceEstimate]:
    """Bytes from shapes: who holds which parameters, and how many samples' activations."""
    t, n = cfg.train, len(devices)
    params = layer_params(cfg)
    acts = layer_activations(cfg)  # per sample, per layer
    unsaved = unsaved_output_bytes(cfg)  # per sample: the outputs autograd does not keep
    state = 2 if t.optimizer in ("adam", "adamw") else 0
    B, mode, total = t.batch_size, cfg.mode, sum(params)

    def held(p: float, samples: float, layers: Iterable[int], extra: float = 0.0,
             last: bool = True) -> dict[str, int]:
        a = samples * sum(acts[i] for i in layers)
        return {"params": int(p), "grads": int(p), "optimizer": int(state * p),
                "activations": int(a), "other": int(extra + (samples * unsaved if last else 0))}

    everything = range(len(params))
    out: list[dict[str, int]] = []
    if mode == "single":
        out = [held(total, B, everything)]
    elif mode == "ddp":
        out = [held(total, B / n, everything) for _ in devices]
    elif mode == "data-parallel":
        # nn.DataParallel: the module and its optimizer live on device 0; every step the
        # others get a fresh replica of the parameters (no grads of their own) and a chunk.
        chunk = [len(c) for c in _chunks(B, n)]
        out = [held(total, chunk[0], everything, extra=B * unsaved - chunk[0] * unsaved)]
        out += [{**held(0, chunk[i], everything, last=False), "params": total} for i in range(1, n)]
    elif mode in ("model-parallel", "pipeline"):
        from .models import split_layers

        ranges = split_layers(len(params), n, cfg.placement.split)
        for s, layers in enumerate(ranges):
            if mode == "pipeline" and t.schedule == "1f1b":
                in_flight = min(t.micro_batches, n - s) * B / t.micro_batches
            else:  # naive split, gpipe: every sample's activations wait for the backward
                in_flight = B
            out.append(held(sum(params[i] for i in layers), in_flight, layers, last=s == n - 1))
    elif mode == "fsdp":
        # Sharded: 1/n of everything, plus the one layer gathered whole while it computes.
        gathered = max(params) * (n - 1) / n
        out = [{**held(total / n, B / n, everything), "other": int(B / n * unsaved + gathered)}
               for _ in devices]
    elif mode == "tensor-parallel":
        split = tensor_parallel_split(cfg)  # bytes of weights split over the devices
        p = total - split + split / n
        a = B * sum(acts) * (1 - tensor_parallel_activation_share(cfg) * (1 - 1 / n))
        out = [{**held(p, B, everything), "activations": int(a)} for _ in devices]
    return [DeviceEstimate(d.index, d.label, sum(b.values()), b, d.capacity_bytes, "formula")
            for d, b in zip(devices, out)]


def _chunks(batch: int, n: int) -> list[range]:
    size = -(-batch // n)  # torch.chunk's rule, as nn.DataParallel's scatter uses
    return [range(i, min(i + size, batch)) for i in range(0, batch, size)]


@functools.lru_cache(maxsize=8)
def meta_shapes(model: ModelConfig) -> tuple[tuple[tuple[int, ...], ...], ...]:
    """Each layer's parameter shapes, from a model on the meta device (nothing allocated)."""
    from .models import build_model

    built = build_model(model, 0, device="meta")
    return tuple(tuple(tuple(p.shape) for p in layer.parameters()) for layer in built)


def layer_params(cfg: RunConfig) -> list[int]:
    """Parameter bytes of each layer."""
    return [sum(math.prod(s) for s in layer) * FLOAT for layer in meta_shapes(cfg.model)]


def layer_activations(cfg: RunConfig) -> list[float]:
    """Bytes autograd saves for backward per sample, per layer (the loss's on the last),
    each distinct tensor once: a layer's input is usually the previous layer's output."""
    m = cfg.model
    if m.kind == "linear":
        return [(1 + 2) * FLOAT]  # input; the loss keeps output and target
    if m.kind == "split-nn":
        return [(10 + 50) * FLOAT, 20 * FLOAT, 2 * FLOAT]
    if m.kind == "mlp":
        w = m.width
        return ([(m.in_features + w) * FLOAT] + [3 * w * FLOAT] * m.depth
                + [2 * m.out_features * FLOAT])
    d, t, v, h = m.width, m.seq_len, m.vocab, m.heads
    # Block: input, 2 norm outputs, q k v, attention output, residual, 4d up and gelu; norm
    # statistics and attention's log-sum-exp are a few floats per token.
    block = t * (16 * d + 4 + h) * FLOAT
    embed = t * (LONG + d * FLOAT)
    head = t * ((2 * d + v + 2) * FLOAT + LONG)  # final norm, its output, log-softmax, target
    return [embed] + [block] * m.depth + [head]


def unsaved_output_bytes(cfg: RunConfig) -> float:
    """Per sample: what the last layer outputs that autograd does not keep (the logits)."""
    m = cfg.model
    return m.seq_len * m.vocab * FLOAT if m.kind == "transformer" else 0.0


def tensor_parallel_split(cfg: RunConfig) -> float:
    """Bytes of the weights tensor parallel splits: the blocks' linear layers."""
    m = cfg.model
    if m.kind == "mlp":
        return m.depth * (4 * m.width * m.width + 3 * m.width) * FLOAT
    if m.kind == "transformer":
        d = m.width
        return m.depth * (12 * d * d + 9 * d) * FLOAT
    return 0.0


def tensor_parallel_activation_share(cfg: RunConfig) -> float:
    """The part of the activations that lives between a column and a row split."""
    m = cfg.model
    if m.kind == "mlp":
        return sum(2 * m.width for _ in range(m.depth)) * FLOAT / max(sum(layer_activations(cfg)), 1)
    if m.kind == "transformer":
        return m.depth * m.seq_len * 12 * m.width * FLOAT / max(sum(layer_activations(cfg)), 1)
    return 0.0


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
