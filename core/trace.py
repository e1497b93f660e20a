"""The trace: one rank's training steps on fake tensors, counted by the rank's own ledger.

Runs the mode's own strategy (`apply_<mode>` and two training steps) under FakeTensorMode
(shapes, dtypes and aliasing, no data) with the same MemoryLedger and Probe a rank uses,
so the numbers are what a run would report without allocating the memory.  Multi-process
modes are traced one rank at a time on torch's fake process group, whose collectives do
nothing.  What fake tensors cannot do is patched here, only for the tracing thread, and
undone afterwards.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import importlib
import os
import threading
import time
import warnings
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from . import log, parallel, recorder
from .clock import OpLog
from .config import RunConfig
from .devices import Device
from .gpus import gpu_models
from .memory import MemoryLedger
from .modes import mode
from .predicted import DeviceEstimate, EstimateError
from .recorder import Recorder
from .schedule import ScheduleError, idle, schedule
from .shapes import chunk_len, meta_shapes
from .strategy import Probe, RankContext, RankJob, local_devices

TRACE_STEPS = 2  # step 2 has what every later step has: last step's grads and the optimizer state
_trace_lock = threading.Lock()  # the fake process group and the ledger's key are process-wide


def trace(cfg: RunConfig, devices: list[Device]) -> list[DeviceEstimate]:
    world = mode(cfg.mode).world_size(len(devices))
    distributed = mode(cfg.mode).one_process_per_device
    # Room without limit, so the trace runs to its peak; capacity is compared afterwards.
    roomy = [dataclasses.replace(d, kind="sim", capacity_bytes=2**62, gpu=None, share=1) for d in devices]
    found: dict[int, tuple[dict[str, int], int, str, dict[str, int]]] = {}
    logs: dict[int, list] = {}
    try:  # imported before any patching, so the module binds the real torch classes
        module = importlib.import_module(f"{__package__}.parallel.{mode(cfg.mode).module}")
    except ModuleNotFoundError as e:
        raise EstimateError(f"mode {cfg.mode} has no strategy to trace yet: {e}") from None
    with _trace_lock, _fake_tensors(), _stand_ins(module):
        for ranks in rank_groups(cfg, world):
            try:
                got = _trace_rank(cfg, roomy, ranks[0], world, distributed, logs)
            except EstimateError:
                raise
            except Exception as e:
                detail = str(e).splitlines()[0] if str(e) else type(e).__name__
                sentence = f"tracing {cfg.mode} rank {ranks[0]} on fake tensors failed: {detail}"
                log.failure(sentence, e)
                raise EstimateError(sentence) from e
            found.update(got)
            for r in ranks[1:]:  # one device per rank in the symmetric modes
                found[r] = got[ranks[0]]
                if ranks[0] in logs:  # the same program: the same ops, on its own device
                    logs[r] = [dataclasses.replace(op, device=r) for op in logs[ranks[0]]]
    timeline = _lay_out(logs)
    out = []
    for d in devices:
        bytes_, peak, phase, host = found[d.index]
        out.append(DeviceEstimate(d.index, d.label, peak, dict(bytes_), d.capacity_bytes, "trace", phase,
                                  host=dict(host)))
        if timeline is not None:
            out[-1].modelled = _modelled(timeline, d.index)
    return out


def _lay_out(logs: dict[int, list]) -> Any:
    """The traced step's ops of every rank on modelled GPU streams, as a run lays out a
    sampled step (core.schedule); None where there is no GPU model or they do not pair up."""
    if not logs:
        return None
    try:
        return schedule(logs)
    except ScheduleError:
        return None


def _modelled(tl: Any, device: int) -> dict[str, Any]:
    """One device's modelled step: its time, busy share and spans (phase, start, end)."""
    compute = tl.compute.get(device, [])
    spans = [*compute, *(("idle", s, e) for s, e in idle(tl, device)),
             *(("communication", s, e) for _, s, e, _, _ in tl.comm.get(device, []))]
    return {"step_s": tl.step_s, "busy": tl.busy_share(device), **tl.comm_figures(device),
            "host_s": tl.host_s(device),
            "spans": sorted(spans, key=lambda x: x[1])}


def rank_groups(cfg: RunConfig, world: int) -> list[list[int]]:
    """Ranks grouped by what their trace would be; only the first of each group is traced.

    In the symmetric modes a rank's tensors differ from another's only by the shard sizes,
    and DTensor and FSDP cut a dim the way torch.chunk does: ranks with the same chunk
    sizes along dims 0 and 1 of every parameter run the same program on the same shapes."""
    if not mode(cfg.mode).symmetric or world == 1:
        return [[r] for r in range(world)]
    if mode(cfg.mode).splits == "batch":
        return [list(range(world))]  # full replicas, equal slices of the batch
    shapes = [s for layer in meta_shapes(cfg.model) for s in layer]
    groups: dict[tuple, list[int]] = {}
    for r in range(world):
        key = tuple(tuple(chunk_len(n, world, r) for n in s[:2]) for s in shapes)
        groups.setdefault(key, []).append(r)
    return list(groups.values())


def _trace_rank(cfg: RunConfig, devices: list[Device], rank: int, world: int,
                distributed: bool, logs: dict[int, list]) -> dict[int, tuple[dict[str, int], int, str, dict]]:
    """One rank's setup and first steps, as worker._run does them, on fake tensors; the
    last step's ops, costed on the GPU model (sim.gpu), go into `logs`."""
    job = RankJob(cfg.to_dict(), devices, rank, world, time.perf_counter(), os.getpid())
    local = local_devices(job, cfg)
    ledger = MemoryLedger(local)
    ctx = RankContext(job, cfg, local, ledger)
    best: dict[int, tuple[int, dict[str, int], str]] = {d.index: (-1, {}, "") for d in local}
    host: dict[int, dict[str, int]] = {d.index: {} for d in local}
    with _fake_world(rank, world, distributed) as group:
        ctx.group = group
        probe = Probe(ctx)
        trainer = parallel.apply(ctx)
        gpu = gpu_models().get(cfg.sim.gpu)
        last = min(TRACE_STEPS, cfg.train.steps)
        for step in range(1, last + 1):
            probe.active, probe.step = True, step
            ledger.begin_step()
            probe.where = (local[0].index, "forward")
            # The steady step (last step's gradients and the optimizer's state exist) is
            # the one a run's modelled clock repeats.
            log = OpLog(gpu, lambda: probe.where, cfg.sim.tf32, cfg.placement.cpu_offload) if gpu is not None and step == last else None
            with Recorder(ledger, on_op=log):  # what a rank's sampled step counts, allocation by allocation
                trainer.step(step, probe)
            ledger.end_step()
            probe.spans.clear()
            if log is not None:
                logs[rank] = log.ops
            for d in local:
                bytes_, phase, _ = ledger.step_peak(d.index)
                if sum(bytes_.values()) > best[d.index][0]:
                    best[d.index] = (sum(bytes_.values()), bytes_, phase)
                on_host = ledger.host_peak(d.index)
                if sum(on_host.values()) > sum(host[d.index].values()):
                    host[d.index] = on_host
    return {d.index: (best[d.index][1], ledger.peak[d.index], best[d.index][2], host[d.index]) for d in local}


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
    and a device mesh reads its rank map (it is made of real tensors, as in a run), also
    when a mesh is sliced into its axes' groups or FSDP joins one to tensor parallel's."""
    from torch._subclasses.fake_tensor import unset_fake_temporarily
    from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
    from torch.distributed.tensor._sharding_prop import ShardingPropagator
    from torch.nn.parallel import DistributedDataParallel

    def real_mesh(*args: Any, **kwargs: Any) -> Any:
        with unset_fake_temporarily():
            return init_device_mesh(*args, **kwargs)

    make_mesh = DeviceMesh.__init__
    # DTensor infers an op's global output shape by running it on global-shape tensors of
    # the active fake mode, the trace's own (a run's are its own mode's): not device work.
    infer = ShardingPropagator._propagate_tensor_meta_non_cached

    def quiet_infer(*args: Any, **kwargs: Any) -> Any:
        with recorder.quiet():
            return infer(*args, **kwargs)

    def real_make(mesh: Any, *args: Any, **kwargs: Any) -> None:
        with unset_fake_temporarily():
            make_mesh(mesh, *args, **kwargs)

    swaps = {DistributedDataParallel: _TracedDDP, init_device_mesh: real_mesh}
    names = {n: v for n, v in vars(module).items() if any(v is k for k in swaps)}
    for n, v in names.items():
        setattr(module, n, _this_thread(next(new for old, new in swaps.items() if old is v), v))
    DeviceMesh.__init__ = _this_thread(real_make, make_mesh)
    ShardingPropagator._propagate_tensor_meta_non_cached = _this_thread(quiet_infer, infer)
    try:
        with _pipeline_vote(), _held_sends():
            yield
    finally:
        DeviceMesh.__init__ = make_mesh
        ShardingPropagator._propagate_tensor_meta_non_cached = infer
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


@contextlib.contextmanager
def _held_sends() -> Iterator[None]:
    """A send's tensor lives as long as its work: a real group's work keeps a reference to
    it (gloo's send work holds its tensor; NCCL's keeps it in `outputs_`, "for use cases
    such as profiling"), and the pipeline schedules keep their send works in a list until
    the step's micro-batches are done, so a stage holds each micro-batch's outgoing
    activation and input gradient until then.  The fake group's work holds nothing: here
    it does."""
    import torch.distributed as dist
    from torch.distributed import distributed_c10d as c10d

    real = c10d.isend

    def isend(tensor: Any, *args: Any, **kwargs: Any) -> Any:
        work = real(tensor, *args, **kwargs)
        return None if work is None else _HeldSend(work, tensor)

    # P2POp accepts only c10d's own isend, and the schedules compare ops with dist.isend:
    # both names are the one patched function.
    c10d.isend = dist.isend = _this_thread(isend, real)
    try:
        yield
    finally:
        c10d.isend = dist.isend = real


class _HeldSend:
    """A send's work that keeps its tensor alive while it lives, as a real group's does."""

    def __init__(self, work: Any, tensor: Any) -> None:
        self._work, self._tensor = work, tensor

    def __getattr__(self, name: str) -> Any:
        return getattr(self._work, name)


class _TracedDDP(nn.Module):
    """DDP as the ledger and the clock see it: the module, its gradients, and the gradient
    buckets the comm hook is handed.  DDP's buckets are flat copies of the gradients (25 MiB
    each) that together hold every gradient once: here one bucket holds them all, the same
    bytes.  As DDP's reducer does, each gradient is copied into its place in the bucket as
    it is ready, the hook runs once the last one is, and the reduced bucket is copied back
    into the gradients (kernels a GPU runs, each with its launch)."""

    def __init__(self, module: nn.Module, *args: Any, **kwargs: Any) -> None:
        super().__init__()
        self.module = module
        self._hook: tuple[Any, Any] | None = None
        params = [p for p in module.parameters() if p.requires_grad]
        flat = torch.empty(sum(p.numel() for p in params), dtype=params[0].dtype, device=params[0].device)
        self._bucket = _Bucket(flat, params)
        places = dict(zip(map(id, params), flat.split([p.numel() for p in params])))
        ready = [0]
        self._syncing = True

        def accumulated(p: Any) -> None:
            if not self._syncing:  # DDP's no_sync: gradients accumulate, no bucket, no all-reduce
                return
            places[id(p)].copy_(p.grad.reshape(-1))
            ready[0] += 1
            if ready[0] == len(params) and self._hook is not None:
                ready[0] = 0
                with _done_all_reduce():
                    self._hook[1](self._hook[0], self._bucket).wait()
                for q in params:
                    q.grad.reshape(-1).copy_(places[id(q)])

        for p in params:
            p.register_post_accumulate_grad_hook(accumulated)

    def register_comm_hook(self, state: Any, hook: Any) -> None:
        self._hook = (state, hook)

    @contextlib.contextmanager
    def no_sync(self) -> Iterator[None]:
        self._syncing = False
        try:
            yield
        finally:
            self._syncing = True

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
    _forget_dtensor_shardings()
    try:
        if distributed:
            from torch.testing._internal.distributed.fake_pg import FakeStore

            dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=world)
        yield dist.group.WORLD if distributed else None
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
        _forget_dtensor_shardings()


def _forget_dtensor_shardings() -> None:
    """Forget what DTensor cached for this rank's meshes, before and after it.

    DTensor caches each op's output sharding keyed by its op schema, and that holds the
    input's DeviceMesh, which compares and hashes by its rank map, layout and names, not by
    the rank it was made on: rank 0's mesh equals rank 1's.  A hit returns the first
    caller's output spec, with the first caller's mesh and so its coordinate.  A run's
    process is one rank and never meets another rank's mesh; a trace is several ranks in
    turn in one process, and whatever shards in this process after it (a test, a later
    trace) is another rank again: it would get the traced rank's offsets (materialise
    copies the wrong rows).  The cache that answers is the C++ dispatch fast path's;
    torch's debug helper clears it and the Python one together.  The redistribute
    planners are cached by a weak reference to the mesh, which compares equal the same way."""
    try:
        from torch.distributed.tensor._redistribute import clear_redistribute_planner_cache
        from torch.distributed.tensor.debug import _clear_sharding_prop_cache
    except ImportError:  # another torch: nothing known to clear
        return
    _clear_sharding_prop_cache()
    clear_redistribute_planner_cache()


