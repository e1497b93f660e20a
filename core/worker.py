"""The rank process: set up, build the mode's Trainer, run the training loop.

Everything a rank sends travels over its own pipe in batches (a few per second, never
one message per step).  The loop is the same for every mode:

  control   pause / resume / stop / set-lr, agreed by all ranks at sync points
  step      the mode's Trainer.step
  loss      kept on the device and read back in batches: no host sync per step
  sampling  on sampled steps (every telemetry.interval_s, and steps 1-3) the Probe
            records phase spans and memory by category; other steps pay nothing

Under torchrun the same `main` runs with the rendezvous from the environment.
"""

from __future__ import annotations

import contextlib
import functools
import os
import signal
import sys
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from time import perf_counter
from typing import Any

from . import checkpoint, log, parallel
from .config import RunConfig
from .devices import Device
from .events import MemorySample
from .lifeline import name_process
from .strategy import Probe, RankContext, RankJob, local_devices


@dataclass
class Batch:
    """What a rank sends a few times a second."""

    rank: int
    progress: int
    """The last step this rank finished (for hang detection)."""
    steps: list[int] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    times: list[float] = field(default_factory=list)
    lrs: list[float] = field(default_factory=list)
    modelled: list[float] = field(default_factory=list)
    """Simulated devices with a GPU model: the modelled clock at the end of each step."""
    events: list[Any] = field(default_factory=list)
    started: float | None = None
    """Set on the first batch: when training began (seconds since the run started)."""
    where: str = ""
    """Heartbeats only: 'function (file:line) @ path' of the main thread's innermost frame."""


@dataclass
class RankDone:
    rank: int
    status: str  # ok | oom | error | stopped
    message: str = ""
    device: int | None = None
    phase: str = ""
    steps: int = 0


class Channel:
    """The rank's end of its pipe; thread-safe (the heartbeat thread sends too)."""

    def __init__(self, conn: Any) -> None:
        self.conn = conn
        self.lock = threading.Lock()

    def send(self, message: Any) -> None:
        with self.lock:
            with contextlib.suppress(BrokenPipeError, OSError):
                self.conn.send(message)


# ---- control ---------------------------------------------------------------------------------

STOP, PAUSED, LR = 0, 1, 2
SWITCH = 2.0
"""shared[STOP] = SWITCH: stop after saving the state for the next layout (core.checkpoint)."""
SYNC_S = 0.02
"""Controls are read (and, with several ranks, agreed) about this often: the latency of
pause, stop and a new learning rate, and the finest sampling granularity."""


class Control:
    """Reads the controller's shared array and decides which steps are sampled.  With
    several ranks, rank 0 decides and broadcasts at sync points that every rank computes
    the same way, so all ranks stop, pause, change the learning rate and sample at the
    same step (a timeline's devices line up)."""

    def __init__(self, shared: Any, world: int, lr: float, sample_interval: float) -> None:
        self.shared = shared
        self.world = world
        self.lr = lr
        self.sample_interval = sample_interval
        self._last_sample = -1e9
        self.first = 1
        """The run's first step (later than 1 when it continues a switched run)."""
        self.next_sync = 1
        self._group = None
        self._last_sync_time = perf_counter()
        self._last_sync_step = 0
        if world > 1:
            import torch.distributed as dist

            # Control travels on its own gloo group: small CPU tensors, whatever the backend.
            self._group = dist.new_group(backend="gloo")

    def _read(self, step: int) -> tuple[float, bool, float, int, bool]:
        stop, paused, lr = float(self.shared[STOP]), bool(self.shared[PAUSED]), float(self.shared[LR])
        now = perf_counter()
        sample = step < self.first + 3 or now - self._last_sample >= self.sample_interval
        # Sync about every SYNC_S of training: rank 0 picks the next interval from its step time.
        per_step = (now - self._last_sync_time) / max(step - self._last_sync_step, 1)
        interval = int(min(max(SYNC_S / max(per_step, 1e-6), 1), 1000))
        self._last_sync_time, self._last_sync_step = now, step
        if self.world == 1:
            return stop, paused, lr, interval, sample
        import torch
        import torch.distributed as dist

        msg = torch.tensor([stop, float(paused), lr, float(interval), float(sample)], dtype=torch.float64)
        dist.broadcast(msg, src=0, group=self._group)
        return float(msg[0]), bool(msg[1]), float(msg[2]), int(msg[3]), bool(msg[4])

    def poll(self, step: int, heartbeat: Heartbeat,
             on_pause: Callable[[], None] | None = None) -> tuple[float, float | None, bool]:
        """(stop: 0, 1 or SWITCH; new lr or None; sample this step); blocks while paused, after
        calling `on_pause` (the loop sends what it holds, so the last steps show during the pause)."""
        if step < self.next_sync:
            return 0.0, None, step < self.first + 3
        stop, paused, lr, interval, sample = self._read(step)
        if paused and not stop and on_pause is not None:
            on_pause()
        while paused and not stop:
            heartbeat.paused = True
            time.sleep(0.05)
            stop, paused, lr, interval, sample = self._read(step)
        heartbeat.paused = False
        self.next_sync = step + interval
        if sample:
            self._last_sample = perf_counter()
        new_lr = None
        if lr > 0 and lr != self.lr:
            self.lr = new_lr = lr
        return stop, new_lr, sample


class Heartbeat(threading.Thread):
    """Sends the rank's progress every second, so the controller can tell a slow step
    from a dead or hung rank; also ends the rank if the controller is gone."""

    def __init__(self, rank: int, channel: Channel, controller_pid: int,
                 controller_alive: Any = None) -> None:
        super().__init__(daemon=True, name="paralab-heartbeat")
        self.rank, self.channel, self.controller_pid = rank, channel, controller_pid
        # A remote rank's controller is on another machine: its connection tells, not a pid.
        self.controller_alive = controller_alive or (lambda: _alive(controller_pid))
        self.progress = 0
        self.paused = False
        self.stopped = threading.Event()

    def run(self) -> None:
        main = threading.main_thread().ident
        while not self.stopped.wait(1.0):
            if not self.controller_alive() and not self.stopped.is_set():
                os._exit(3)  # orphaned: nobody will read our events or stop us
            self.channel.send(Batch(self.rank, self.progress, where=_where(main)))


def _where(thread: int | None) -> str:
    """'function (file:line) @ path' of a thread's innermost frame.  The frame is not kept:
    holding it would keep its locals (a step's tensors) alive, and the memory count with them."""
    frame = sys._current_frames().get(thread)
    if frame is None:
        return ""
    code, line = frame.f_code, frame.f_lineno
    del frame
    return f"{code.co_name} ({os.path.basename(code.co_filename)}:{line}) @ {code.co_filename}"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# ---- the rank --------------------------------------------------------------------------------


def main(job: RankJob, conn: Any, shared: Any, controller_alive: Any = None) -> RankDone:
    """Entry point of a rank process (forked, or core.remote's under torchrun)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the controller's to handle
    name_process(f"paralab-rank{job.rank}")
    _set_parent_death_signal()
    os.environ.setdefault("CUDA_DEVICE_ORDER", "PCI_BUS_ID")
    if job.log_path and not job.remote:
        os.environ["PARALAB_LOG"] = job.log_path
    channel = Channel(conn)
    heartbeat = Heartbeat(job.rank, channel, job.controller_pid, controller_alive)
    heartbeat.start()
    done = RankDone(job.rank, "error", "the rank ended before it started training")
    state: dict[str, Probe] = {}
    try:
        done = _run(job, channel, shared, heartbeat, state)
    except BaseException as e:  # report every failure; the controller decides what it means
        done = _failure(job, e, state.get("probe"))
        if done.status == "oom":
            _send_oom_memory(channel, _out_of_memory(e) or e, state.get("probe"), done)
    finally:
        heartbeat.stopped.set()
        channel.send(done)
        with contextlib.suppress(Exception):
            conn.close()
        _shutdown_distributed()
    return done


def _run(job: RankJob, channel: Channel, shared: Any, heartbeat: Heartbeat, state: dict) -> RankDone:
    import torch

    from .memory import MemoryLedger

    cfg = RunConfig.from_dict(job.config)
    # The ranks of a machine share its cores.
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // (job.local_world or job.world)))
    local = local_devices(job, cfg)
    _setup_cuda(local)
    ctx = RankContext(job, cfg, local, MemoryLedger(local))
    if job.world > 1:
        ctx.group = _init_distributed(job, cfg.telemetry.hang_timeout_s)
    control = Control(shared, job.world, cfg.train.lr, cfg.telemetry.interval_s)
    control.first = control.next_sync = job.first_step
    ctx.control_group = control._group
    probe = state["probe"] = Probe(ctx)
    trainer = parallel.apply(ctx)
    if job.resume:  # a switched run: the last layout's weights and optimizer state, resharded
        checkpoint.load(trainer, ctx, job.resume)
    return _loop(ctx, trainer, probe, control, channel, heartbeat)


def _loop(ctx: RankContext, trainer: Any, probe: Probe, control: Control, channel: Channel,
          heartbeat: Heartbeat) -> RankDone:
    import torch

    cfg, t0 = ctx.cfg, ctx.job.t0
    steps, log_every = cfg.train.steps, cfg.train.log_every
    clock = probe.clock
    pending = Batch(ctx.rank, 0)
    losses: list[torch.Tensor] = []
    last_flush = perf_counter()
    lr = control.lr
    pending.started = perf_counter() - t0
    fault_step = int(ctx.job.fault.split("@")[1]) if ctx.job.fault else -1

    def flush(step: int) -> None:
        nonlocal pending, losses
        if losses:
            pending.losses = torch.stack(losses).float().cpu().tolist()
        pending.progress = step
        channel.send(pending)
        pending, losses = Batch(ctx.rank, step), []

    step = first = ctx.job.first_step
    for step in range(first, steps + 1):
        stop, new_lr, sample = control.poll(step, heartbeat, on_pause=functools.partial(flush, step - 1))
        if stop:
            flush(step - 1)
            if stop == SWITCH and ctx.job.checkpoint:
                checkpoint.save(trainer, ctx, ctx.job.checkpoint, step - 1)
                return RankDone(ctx.rank, "stopped", f"saved after step {step - 1} to switch layout",
                                steps=step - 1)
            return RankDone(ctx.rank, "stopped", f"stopped after step {step - 1}", steps=step - 1)
        if new_lr is not None:
            lr = new_lr
            for opt in trainer.optimizers:
                for group in opt.param_groups:
                    group["lr"] = lr
        probe.active = sample
        probe.step = step
        if fault_step == step:
            _inject(ctx.job.fault)
        loss = _step(ctx, trainer, probe, step)
        end = perf_counter()
        heartbeat.progress = step
        clock.advance()  # by the last modelled step time: shapes, and so durations, are fixed
        if loss is not None and (step % log_every == 0 or step == steps):
            losses.append(loss.detach())
            pending.steps.append(step)
            pending.times.append(end - t0)
            pending.lrs.append(lr)
            if clock.gpu is not None:
                pending.modelled.append(clock.now)
        if probe.active:
            probe.active = False
            pending.events.extend(probe.spans)
            pending.events.extend(clock.events(step, end - t0))
            probe.spans = []
            pending.events.extend(_memory_events(ctx, step, end - t0))
        if end - last_flush >= 0.1 or step == steps or step <= 2:
            flush(step)
            last_flush = end
    summary = f"; {trainer.summary()}" if trainer.summary else ""
    if ctx.job.checkpoint and ctx.job.save_at_end:
        checkpoint.save(trainer, ctx, ctx.job.checkpoint, step)
    return RankDone(ctx.rank, "ok", f"finished {step} steps{summary}", steps=step)


def _step(ctx: RankContext, trainer: Any, probe: Probe, step: int) -> Any:
    """One training step; on sampled steps of simulated devices, under the recorder."""
    if not probe.active:
        return trainer.step(step, probe)
    ledger = ctx.ledger
    ledger.begin_step()
    probe.where = (ctx.local_devices[0].index, "forward")  # the batch is loaded first
    if any(d.kind == "cuda" for d in ctx.local_devices):
        loss = trainer.step(step, probe)
    else:
        from .recorder import Recorder

        log = probe.clock.start()
        with Recorder(ledger, on_op=log):
            loss = trainer.step(step, probe)
        probe.clock.lay_out(log)
    ledger.end_step()
    return loss


def _inject(fault: str) -> None:
    kind = fault.split("@")[0]
    if kind == "hang":
        while True:
            time.sleep(3600)
    if kind == "crash":
        os.kill(os.getpid(), signal.SIGKILL)
    raise RuntimeError(f"injected fault {fault!r}")


def _memory_events(ctx: RankContext, step: int, time_s: float) -> list[MemorySample]:
    out = []
    ledger = ctx.ledger
    for d in ctx.local_devices:
        bytes_, phase, op = ledger.step_peak(d.index)
        peak = ledger.peak[d.index]
        cuda_peak, extra = ledger.cuda_extra(d)
        if extra:  # ledger.checkpoint took the allocator's `other` with the categories
            peak = max(peak, cuda_peak)
        out.append(MemorySample(step, d.index, bytes_, peak, d.capacity_bytes, time_s, phase, op, extra,
                               ledger.host_peak(d.index)))
    return out


def _out_of_memory(e: BaseException) -> BaseException | None:
    """The out-of-memory behind `e`, if one is: torch's pipeline stages re-raise a stage's
    error as "[Stage 1] failed to run forward", with the device's own error as its cause."""
    from .memory import DeviceOutOfMemory

    seen: set[int] = set()
    while e is not None and id(e) not in seen:
        if isinstance(e, DeviceOutOfMemory) or type(e).__name__ == "OutOfMemoryError":
            return e
        seen.add(id(e))
        e = e.__cause__ or e.__context__
    return None


def _failure(job: RankJob, e: BaseException, probe: Probe | None) -> RankDone:
    from .memory import DeviceOutOfMemory

    e = _out_of_memory(e) or e
    device, phase = probe.where if probe is not None else (None, "")
    if isinstance(e, DeviceOutOfMemory):
        return RankDone(job.rank, "oom", str(e), e.device.index, e.phase)
    if type(e).__name__ == "OutOfMemoryError":  # torch.cuda.OutOfMemoryError
        label = next((d.label for d in job.devices if d.index == device), "the GPU")
        first = str(e).splitlines()[0] if str(e) else "CUDA out of memory"
        return RankDone(job.rank, "oom", f"{label} ran out of memory in {phase}: {first}", device, phase)
    if isinstance(e, KeyboardInterrupt):
        return RankDone(job.rank, "stopped", "interrupted", device, phase)
    detail = "".join(traceback.format_exception_only(type(e), e)).strip()
    sentence = f"rank {job.rank} failed in {phase or 'setup'}: {detail}"
    log.failure(sentence, e)
    return RankDone(job.rank, "error", sentence, device, phase)


def _send_oom_memory(channel: Channel, e: BaseException, probe: Probe | None, done: RankDone) -> None:
    """The failing device's memory by category at the moment it ran out, as an event."""
    with contextlib.suppress(Exception):
        if probe is None or done.device is None:
            return
        ledger = probe.ledger
        device = ledger.devices[done.device]
        breakdown = getattr(e, "breakdown", None) or ledger.breakdown(device.index)
        peak, extra = ledger.cuda_extra(device)
        total = sum(breakdown.values())
        sample = MemorySample(probe.step, device.index, breakdown, max(peak, total, ledger.peak[device.index]),
                              device.capacity_bytes, perf_counter() - probe.t0, done.phase,
                              getattr(e, "op", ""), extra, ledger.host_peak(device.index))
        channel.send(Batch(done.rank, probe.step, events=[sample]))


def _setup_cuda(local: list[Device]) -> None:
    cuda = [d for d in local if d.kind == "cuda"]
    if not cuda:
        return
    import torch

    torch.cuda.set_device(cuda[0].gpu)
    for gpu in sorted({d.gpu for d in cuda}):
        mine = [d for d in cuda if d.gpu == gpu]
        if mine[0].share > 1:
            # A logical device on a shared GPU is held to its share, like a smaller GPU; a
            # process that drives several of them (data-, model-parallel) gets all of theirs.
            torch.cuda.set_per_process_memory_fraction(len(mine) / mine[0].share, gpu)


def _init_distributed(job: RankJob, hang_timeout_s: float) -> Any:
    import datetime

    import torch.distributed as dist

    # Collectives give up a little after the controller's hang timeout: the controller
    # names the hung rank first, and no rank waits forever if the controller is gone.
    timeout = datetime.timedelta(seconds=hang_timeout_s + 10)
    if job.remote:  # torchrun's rendezvous (MASTER_ADDR/PORT), not the controller's store
        dist.init_process_group(job.backend, init_method="env://", rank=job.rank, world_size=job.world,
                                timeout=timeout)
        return dist.group.WORLD
    _loopback_only()
    store = dist.TCPStore(job.store_host, job.store_port, job.world, is_master=False,
                          timeout=datetime.timedelta(seconds=60))
    dist.init_process_group(job.backend, store=store, rank=job.rank, world_size=job.world, timeout=timeout)
    return dist.group.WORLD


def loopback_socket() -> Any:
    """A TCP socket listening on 127.0.0.1 only, on a free port (for the local run's store)."""
    import socket

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    sock.listen(128)
    return sock


def _loopback_only() -> None:
    """A local run talks over loopback only: gloo's and NCCL's sockets would otherwise
    listen on the address the host name resolves to, reachable from the network."""
    name = _loopback_interface()
    if name:
        os.environ["GLOO_SOCKET_IFNAME"] = name
        os.environ["NCCL_SOCKET_IFNAME"] = name


def _loopback_interface() -> str:
    with contextlib.suppress(Exception):
        import socket

        import psutil

        for name, addrs in psutil.net_if_addrs().items():
            if any(a.family == socket.AF_INET and a.address.startswith("127.") for a in addrs):
                return name
    return "lo"


def _shutdown_distributed() -> None:
    with contextlib.suppress(Exception):
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()


def _set_parent_death_signal() -> None:
    """Linux: SIGKILL this rank when the process that started it dies."""
    with contextlib.suppress(Exception):
        import ctypes

        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
