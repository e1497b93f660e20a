"""A run: start rank processes for a RunConfig, yield their events, take controls.

Training always happens in child processes, even for the one-process modes: the
caller (GUI or CLI) never holds a CUDA context, and a fault in training can neither
freeze nor kill it.  Ranks are forked from a forkserver that has torch imported, and
each sends its events over its own pipe, so a rank that dies shows up as an end of
file at once and cannot corrupt what the others send.

Guarantees: every event is written to the metrics file as it arrives; the last event
is always an `end`; when `events()` returns (or is closed) no rank is left alive.
"""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import os
import signal
import socket
import tempfile
import time
from collections.abc import Iterator
from multiprocessing.connection import wait
from pathlib import Path
from time import perf_counter
from typing import Any

from . import checkpoint, hostmem, log, preflight, remote, validation, worker
from .config import ConfigError, RunConfig
from .devices import Device, parse_spec, resolve
from .events import Event, RunEnded, RunStarted, StepDone
from .eventsfile import EventsFile, any_problem
from .modes import REGISTRY, mode
from .plan import Plan
from .strategy import RankJob
from .telemetry import Sampler

STATUS_RANK = {"ok": 0, "stopped": 1, "error": 2, "oom": 3}
STOP_GRACE_S = 4.0
SETUP_TIMEOUT_S = 120.0
FAILURE_GRACE_S = 1.0
SILENT_S = 3.0
"""A rank that sent nothing (not even its 1 s heartbeat) for this long is stopped or frozen."""


# What the forkserver imports once, so a rank starts in a fork, not in seconds of imports:
# torch, every strategy, and what DDP/FSDP/pipelining import lazily on first use
# (DDP's constructor alone pulls in ~800 modules: dynamo, inductor, sympy).
PRELOAD = [
    "paralab.core.lifeline",  # first: the forkserver ends when its parent does
    "torch",
    "torch.distributed._functional_collectives",
    "torch.distributed.algorithms._optimizer_overlap",
    "torch.distributed.rpc",
    "torch.nn.parallel.distributed",
    "torch.distributed.fsdp",
    "torch.distributed.pipelining",
    "torch.distributed.tensor.parallel",
    "paralab.core.worker",
    "paralab.core.memory",
    *(f"paralab.core.parallel.{m.module}" for m in REGISTRY.values()),
]


def context() -> Any:
    """The multiprocessing context ranks start from: a forkserver with PRELOAD imported."""
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(PRELOAD)
    return ctx


def prewarm() -> None:
    """Start the forkserver now (it imports PRELOAD in the background), so that the first
    Start does not wait for it.  Call it when the app or the CLI starts."""
    from multiprocessing import forkserver

    context()
    forkserver.ensure_running()


class Run:
    """One training run.  Iterate `events()`; call pause/resume/stop/set_lr from any thread."""

    def __init__(self, config: RunConfig, metrics: str | Path | None = None,
                 devices: list[Device] | None = None, faults: dict[int, str] | None = None,
                 listen: str | None = None, ranks: int = 0, connect_timeout_s: float | None = None,
                 resume: str | None = None, save_at_end: str | None = None) -> None:
        """listen='HOST:PORT': do not start ranks, wait for `ranks` that torchrun starts (core.remote).
        resume=path: go on, in this config's layout, from the state a run saved there.
        save_at_end=path: save the state there when the run finishes, for a later switch."""
        problems = (remote.problems(config, ranks) if listen is not None
                    else validation.problems(config, resolve_devices=devices is None))
        if resume or save_at_end:
            problems = [*problems, *filter(None, [checkpoint.switch_problem(config)])]
        self.resumed_from: tuple[str, int] | None = None
        """(path, step) of the switched run this one goes on from."""
        if resume and not problems:
            note = checkpoint.saved(resume)
            if note.get("model") != config.to_dict()["model"]:
                problems.append(f"the state saved at {resume} is of another model; a switch keeps the model")
            elif note["step"] >= config.train.steps:
                problems.append(f"train.steps {config.train.steps} must be above step {note['step']}, "
                                "where the run being continued stopped")
            self.resumed_from = (resume, int(note["step"]))
        if metrics and (problem := any_problem(metrics)):
            problems = [*problems, problem]
        if problems:
            raise ConfigError("; ".join(problems))
        self.config = config
        if listen is not None and devices is None:  # GPUs: the ranks' own, known once they say hello
            sim = parse_spec(config.devices).kind == "sim"
            devices = resolve(config.devices, config.sim.memory, gpus=[]) if sim else []
        self.devices = devices if devices is not None else resolve(config.devices, config.sim.memory)
        if listen is None:  # a run, not an estimate: will it fit its devices, and this machine?
            sim = all(d.kind == "sim" for d in self.devices)
            # The device first: its capacity is the lesson; the host's memory is this machine's limit.
            if refused := (preflight.cannot_hold(config, self.devices)
                           or hostmem.problem(config, len(self.devices), sim)):
                raise ConfigError(refused)  # before any rank builds what cannot fit
        self.metrics = Path(metrics) if metrics else None
        self.world = ranks if listen is not None else mode(config.mode).world_size(len(self.devices))
        self._ctx = context()
        self._shared = self._ctx.RawArray("d", 3)
        self._shared[worker.LR] = config.train.lr
        self._processes: list[Any] = []
        self.ended: RunEnded | None = None
        self.stop_requested = False
        self.faults = faults or {}
        """Test-only: {rank: 'hang@STEP' | 'crash@STEP' | 'raise@STEP'}."""
        self.listener: remote.RankListener | None = None
        self.remote_ranks: list[remote.Hello] = []
        """Listen mode: the torchrun ranks, by rank, once they have all said hello."""
        self.connect_timeout_s = connect_timeout_s
        self.checkpoint = save_at_end or str(Path(tempfile.gettempdir()) / f"paralab-switch-{os.getpid()}-{id(self):x}")
        """Where this run's state goes when it is switched to another layout (switch())."""
        self.save_at_end = save_at_end is not None
        self.saved_step: int | None = None
        """After a switch: the last step whose state was saved at `checkpoint`."""
        self.events_problem = ""
        """Why the events file misses lines (a failed write, deleted mid-run); '' when it has them all."""
        if listen is not None:
            self.authkey, self.authkey_generated = remote.authkey()
            self.listener = remote.RankListener(listen, self.authkey)

    # ---- controls (thread-safe: plain writes to shared memory) ---------------------------------

    def pause(self) -> None:
        self._shared[worker.PAUSED] = 1.0

    def resume(self) -> None:
        self._shared[worker.PAUSED] = 0.0

    @property
    def paused(self) -> bool:
        return bool(self._shared[worker.PAUSED])

    def stop(self) -> None:
        self.stop_requested = True
        self._shared[worker.STOP] = 1.0

    def switch(self) -> None:
        """Stop after saving the weights and optimizer state at `checkpoint`, for a run of
        another layout to go on from (Run(new_config, resume=run.checkpoint))."""
        if problem := checkpoint.switch_problem(self.config):
            raise ConfigError(problem)
        Path(self.checkpoint).mkdir(parents=True, exist_ok=True)
        self.stop_requested = True
        self._shared[worker.STOP] = worker.SWITCH

    def set_lr(self, lr: float) -> None:
        if not lr > 0:
            raise ConfigError(f"learning rate must be above 0, not {lr}")
        self._shared[worker.LR] = float(lr)

    def pids(self) -> list[int]:
        return [p.pid for p in self._processes if p.pid is not None]

    def progress(self) -> dict[str, int] | None:
        """Before the first step, for a person waiting: ranks launched, heard from (their
        heartbeat), and training (model built); None before the ranks are launched."""
        sup = getattr(self, "_supervisor", None)
        if sup is None or not sup.progress:
            return None
        return {"world": self.world, "launched": len(sup.progress),
                "heard": len(set(sup.where) | sup.training), "training": len(sup.training)}

    # ---- the run -------------------------------------------------------------------------------

    def events(self) -> Iterator[Event]:
        writer = EventsFile(self.metrics) if self.metrics else None
        t0 = perf_counter()
        supervisor = self._supervisor = _Supervisor(self, t0)
        sampler: Sampler | None = None

        def write(events: list[Event]) -> None:
            # A failed write (disk full, file deleted) ends the run, never the teardown.
            if writer is None or not events:
                return
            writer.write(events)
            if writer.problem and self.ended is None and supervisor.write_failed is None:
                supervisor.write_failed = writer.problem
                self.stop()

        try:
            if self.listener is not None:  # the ranks first: their GPUs are the run's devices
                self.ended = supervisor.gather()
                t0 = supervisor.t0 = perf_counter()  # times count from when the ranks are all here
            start = self._started()
            write([start])
            yield start
            if self.ended is not None:  # stopped or refused before every rank came
                write([self.ended])
                yield self.ended
                return
            supervisor.launch()
            sampler = Sampler(self._sampled_devices(), self.pids, t0, self.config.telemetry.interval_s, self.world)
            sampler.start()
            while self.ended is None:
                batch = sampler.merge(supervisor.poll())
                write(batch)
                yield from batch
        finally:
            try:
                if self.ended is None:  # closed early (Ctrl-C twice, the consumer went away)
                    self.ended = RunEnded("stopped", "the run was interrupted", None, perf_counter() - t0,
                                          supervisor.steps_done)
                    write([self.ended])
            finally:
                if sampler is not None:
                    sampler.stop()
                supervisor.teardown()
                if writer:
                    writer.close()
                    if writer.problem and self.events_problem == "":
                        self.events_problem = writer.problem

    def _started(self) -> RunStarted:
        from .models import build_model, count_params

        params = count_params(build_model(self.config.model, self.config.seed, device="meta"))
        hosts = {h.rank: f" on {h.host}" for h in self.remote_ranks}
        devices = [{"index": d.index, "label": d.label, "kind": d.kind, "capacity_bytes": d.capacity_bytes,
                    "description": d.describe() + hosts.get(d.index if self.world > 1 else 0, "")}
                   for d in self.devices]
        clock, gpu = "host", {}
        if self.config.sim.gpu != "host" and all(d.kind == "sim" for d in self.devices):
            from dataclasses import asdict

            from .gpus import gpu_models

            model = gpu_models()[self.config.sim.gpu]
            clock, gpu = model.describe(len(self.devices)), asdict(model)
        return RunStarted(self.config.mode, devices, self.config.to_dict(), self.world, params, time.time(),
                          clock, gpu, first_step=self.resumed_from[1] + 1 if self.resumed_from else 1)

    def _sampled_devices(self) -> list[Device]:
        """The devices telemetry can watch: all but another machine's GPUs (its NVML is not ours)."""
        here = socket.gethostname()
        hosts = {h.rank: h.host for h in self.remote_ranks}
        return [d for d in self.devices if d.kind == "sim" or hosts.get(d.index, here) == here]


def _dead_forkserver() -> int | None:
    """The pid of multiprocessing's forkserver when it has died (it is our child: a zombie
    until reaped), else None."""
    from multiprocessing import forkserver

    pid = getattr(forkserver._forkserver, "_forkserver_pid", None)
    if not pid:
        return None
    try:
        import psutil

        return pid if psutil.Process(pid).status() == psutil.STATUS_ZOMBIE else None
    except Exception:  # noqa: BLE001 -- gone altogether (reaped): dead
        return pid


class _Supervisor:
    """Starts the ranks, reads their pipes, turns batches into events, decides the end."""

    def __init__(self, run: Run, t0: float) -> None:
        self.run = run
        self.t0 = t0
        self.readers: dict[Any, int] = {}
        self.done: dict[int, worker.RankDone] = {}
        self.progress: dict[int, tuple[int, float]] = {}
        """rank -> (last step finished, when it was first seen)"""
        self.training: set[int] = set()
        self.where: dict[int, str] = {}
        """rank -> where its main thread is, from its heartbeat"""
        self.heard: dict[int, float] = {}
        """rank -> when it last sent anything (heartbeats come every second, even mid-collective)"""
        self.failure_at: float | None = None
        self.stop_at: float | None = None
        self.steps_done = 0
        self.store: Any = None
        self._store_socket: socket.socket | None = None
        # The last pipeline stage has the loss (every rank, without a pipeline): the mean over them.
        self.loss_ranks = Plan.of(run.config, run.world).loss_ranks() if run.world > 1 else {0}
        self._pending: dict[int, list[tuple[float, float, float]]] = {}
        self._last_step: tuple[int, float] | None = None
        self.vanished: set[int] = set()
        """Ranks that ended without a word (killed, crashed): the cause of their peers' errors."""
        self.remote: list[tuple[Any, remote.Hello]] = []
        """Listen mode: (connection, hello) of each torchrun rank, by rank."""
        self._sent_controls: tuple[float, ...] | None = None
        self.write_failed: str | None = None
        """Why the events file could not be written: the run ends `error` with it."""

    def gather(self) -> RunEnded | None:
        """Listen mode: wait for the torchrun ranks; a RunEnded when they cannot train."""
        run = self.run
        try:
            self.remote = run.listener.gather(run.world, lambda: run.stop_requested, run.connect_timeout_s)
            run.remote_ranks = [h for _, h in self.remote]
            run.devices = remote.devices_for(run.config, run.remote_ranks)
        except remote.Aborted as e:
            remote.refuse([c for c, _ in self.remote], str(e))
            return RunEnded(e.status, str(e), None, perf_counter() - self.t0, 0)
        return None

    def _launch_remote(self) -> None:
        """Each torchrun rank gets its job over its connection, which from then on carries
        its events like a forked rank's pipe."""
        run = self.run
        backend = remote.backend_for(run.devices)
        for conn, hello in self.remote:
            job = RankJob(run.config.to_dict(), run.devices, hello.rank, run.world, perf_counter() - self.t0,
                                 0, backend=backend, fault=run.faults.get(hello.rank, ""), remote=True,
                                 local_world=hello.local_world)
            with contextlib.suppress(OSError):  # a rank that died already shows up as an end of file
                conn.send(job)
            self.readers[conn] = hello.rank
            self.progress[hello.rank] = (0, perf_counter())

    def _send_controls(self, stop: bool = False) -> None:
        """Remote ranks share no memory with us: send them the controls when they change.
        Only the thread that reads the connections sends, so messages never interleave."""
        now = tuple(self.run._shared)
        if now == self._sent_controls and not stop:
            return
        self._sent_controls = now
        controls = remote.Controls(1.0 if stop else now[worker.STOP], now[worker.PAUSED], now[worker.LR])
        for conn in self.readers:
            with contextlib.suppress(OSError):
                conn.send(controls)

    def launch(self) -> None:
        run = self.run
        if self.remote:
            self._launch_remote()
            return
        backend = "gloo"
        if run.world > 1:
            import datetime

            import torch.distributed as dist

            # Bound to loopback by us: given "127.0.0.1" alone, the store listens on every interface.
            self._store_socket = worker.loopback_socket()
            self.store = dist.TCPStore("127.0.0.1", self._store_socket.getsockname()[1], run.world + 1,
                                       is_master=True, timeout=datetime.timedelta(seconds=60),
                                       wait_for_workers=False, master_listen_fd=self._store_socket.fileno())
            gpus = {d.gpu for d in run.devices if d.kind == "cuda"}
            backend = "nccl" if len(gpus) == run.world else "gloo"
        for rank in range(run.world):
            job = RankJob(run.config.to_dict(), run.devices, rank, run.world, self.t0, os.getpid(),
                          store_port=self.store.port if self.store else 0, backend=backend,
                          fault=run.faults.get(rank, ""), log_path=str(log.path()),
                          checkpoint=run.checkpoint, save_at_end=run.save_at_end,
                          resume=run.resumed_from[0] if run.resumed_from else "",
                          first_step=run.resumed_from[1] + 1 if run.resumed_from else 1)
            reader, writer = run._ctx.Pipe(duplex=False)
            p = run._ctx.Process(target=worker.main, args=(job, writer, run._shared), daemon=True,
                                 name=f"paralab-rank{rank}")
            p.start()
            writer.close()
            run._processes.append(p)
            self.readers[reader] = rank
            self.progress[rank] = (0, perf_counter())

    def poll(self) -> list[Event]:
        out: list[Event] = []
        if self.remote:
            self._send_controls()
        for reader in wait(list(self.readers), timeout=0.1):
            rank = self.readers[reader]
            try:
                while reader.poll():
                    self._take(reader.recv(), out)
            except (EOFError, OSError):
                del self.readers[reader]
                with contextlib.suppress(OSError):
                    reader.close()
                if rank not in self.done:
                    self.done[rank] = self._death(rank)
                    self.vanished.add(rank)
                    self.failure_at = self.failure_at or perf_counter()
        self._check(out)
        return out

    def _take(self, msg: Any, out: list[Event]) -> None:
        if isinstance(msg, worker.RankDone):
            self.done[msg.rank] = msg
            if msg.status in ("oom", "error"):
                self.failure_at = self.failure_at or perf_counter()
            return
        self.heard[msg.rank] = perf_counter()
        step, _ = self.progress[msg.rank]
        if msg.progress > step or (msg.started is not None and msg.rank not in self.training):
            self.progress[msg.rank] = (msg.progress, perf_counter())
        if msg.started is not None or msg.progress > 0:
            self.training.add(msg.rank)
        if msg.where:
            self.where[msg.rank] = msg.where
        if msg.started is not None and self._last_step is None:
            self._last_step = (0, msg.started)
        out.extend(msg.events)
        if msg.rank in self.loss_ranks:
            modelled = msg.modelled or [None] * len(msg.steps)
            for step, loss, t, lr, m in zip(msg.steps, msg.losses, msg.times, msg.lrs, modelled):
                got = self._pending.setdefault(step, [])
                got.append((loss, t, lr, m))
                if len(got) == len(self.loss_ranks):
                    del self._pending[step]
                    out.append(self._step_event(step, got))

    def _step_event(self, step: int, got: list[tuple[float, float, float, float | None]]) -> StepDone:
        """A step in the run's clock: the modelled one where the ranks keep it, else the host's."""
        loss = sum(g[0] for g in got) / len(got)
        host = max(g[1] for g in got)
        modelled = max((g[3] for g in got if g[3] is not None), default=None)
        t = host if modelled is None else modelled
        if modelled is not None and self._last_step is not None and self._last_step[0] == 0:
            self._last_step = (0, 0.0)  # the modelled clock starts with training
        prev_step, prev_t = self._last_step or (0, 0.0)
        rate = (step - prev_step) * self.run.config.train.batch_size / (t - prev_t) if t > prev_t else 0.0
        self._last_step = (step, t)
        self.steps_done = step
        return StepDone(step, loss, t, rate, got[0][2], modelled, host)

    def _death(self, rank: int) -> worker.RankDone:
        if self.remote:  # maybe on another machine: no exit code to read, only the closed connection
            hello = self.remote[rank][1]
            how = f"on {hello.host} (pid {hello.pid}) closed its connection: it died, or its machine went away"
        else:
            p = self.run._processes[rank]
            p.join(timeout=1.0)
            code = p.exitcode
            how = (f"was killed by {signal.Signals(-code).name}" if code is not None and code < 0
                   else f"exited with code {code}" if code is not None else "stopped answering")
            if code == 255 and (server := _dead_forkserver()):  # 255: the forkserver could not say
                how = (f"ended because the forkserver that starts the ranks (pid {server}) died; "
                       "it is started afresh for the next run")
        device = self._device_of(rank)
        return worker.RankDone(rank, "error", f"rank {rank} ({self.run.devices[device].label}) {how}", device)

    def _device_of(self, rank: int) -> int:
        return rank if self.run.world > 1 else 0

    def _check(self, out: list[Event]) -> None:
        run, now = self.run, perf_counter()
        if run.stop_requested and self.stop_at is None:
            self.stop_at = now
        self._check_hangs(now)
        finished = len(self.done) == run.world
        failed_long = self.failure_at is not None and now - self.failure_at > FAILURE_GRACE_S
        stop_long = self.stop_at is not None and now - self.stop_at > STOP_GRACE_S
        if finished or failed_long or stop_long:
            run.ended = self._verdict(now)
            out.append(run.ended)

    def _check_hangs(self, now: float) -> None:
        """A rank that finishes no step for the hang timeout (setup gets more time) hangs.
        Ranks blocked in a collective stall too, but their heartbeats go on: the one to
        blame is the rank that went silent longest (stopped, frozen), else a stalled rank
        whose main thread is outside torch (sleeping, looping), else the lowest rank."""
        run = self.run
        if run.paused:
            self.progress = {r: (s, now) for r, (s, _) in self.progress.items()}
            return
        timeout = run.config.telemetry.hang_timeout_s
        alive = [r for r in self.progress if r not in self.done]
        overdue = [r for r in alive if now - self.progress[r][1]
                   > (timeout if r in self.training else max(timeout, SETUP_TIMEOUT_S))]
        if not overdue or self.failure_at is not None:
            return
        # Everyone stuck at or before the overdue step is a suspect; ranks report at
        # different moments, so the one to blame may not be overdue itself yet.
        last = max(self.progress[r][0] for r in overdue)
        suspects = sorted(r for r in alive if self.progress[r][0] <= last)
        silence = {r: now - self.heard.get(r, self.progress[r][1]) for r in alive}
        silent = [r for r in alive if silence[r] > SILENT_S]
        culprit = (max(silent, key=lambda r: (silence[r], -r)) if silent else
                   next((r for r in suspects if "/torch/" not in self.where.get(r, "/torch/")),
                        min(suspects, key=lambda r: (self.progress[r][0], r))))
        step = self.progress[culprit][0]
        device = self._device_of(culprit)
        where = self.where.get(culprit, "").split(" @ ")[0]
        how = (f" (silent for {silence[culprit]:.0f} s: stopped or frozen)" if culprit in silent
               else f" (stuck in {where})" if where else "")
        self.done[culprit] = worker.RankDone(
            culprit, "error", f"rank {culprit} ({run.devices[device].label}) hangs: no step finished for "
            f"{timeout:g} s after step {step}" + how, device)
        self.failure_at = now

    def _verdict(self, now: float) -> RunEnded:
        done = sorted(self.done.values(), key=lambda d: -STATUS_RANK[d.status])
        worst = done[0] if done else None
        t = now - self.t0
        if self.write_failed is not None:
            return RunEnded("error", f"{self.write_failed}; every rank was stopped after step {self.steps_done}",
                            None, t, self.steps_done)
        switched = [d for d in done if "to switch layout" in d.message]
        if done and len(switched) == len(done) == self.run.world:  # every rank saved its part
            self.run.saved_step = min(d.steps for d in done)
            return RunEnded("stopped", f"saved after step {self.run.saved_step} to switch layout", None, t,
                            self.steps_done)
        if worst is None or (self.stop_at is not None and (worst.status in ("ok", "stopped"))):
            return RunEnded("stopped", f"stopped by request after step {self.steps_done}", None, t, self.steps_done)
        if worst.status in ("oom", "error"):
            # The first failure is the cause; others (broken collectives) are consequences.  A rank
            # that vanished is the cause even when a peer's error about it came in first.
            failures = [d for d in self.done.values() if d.status in ("oom", "error")]
            first = next((d for d in failures if d.rank in self.vanished), failures[0])
            cause = first if first.status == "oom" or worst.status != "oom" else worst
            return RunEnded(cause.status, cause.message, cause.device, t, self.steps_done, cause.phase)
        status = "stopped" if any(d.status == "stopped" for d in done) else "ok"
        return RunEnded(status, worst.message, None, t, self.steps_done)

    def teardown(self) -> None:
        if self.run.listener is not None:
            self.run.listener.close()
        if self.remote:  # no killing on other machines: told to stop, ranks end when their connection closes
            self._send_controls(stop=True)
            for conn, _ in self.remote:
                with contextlib.suppress(Exception):
                    conn.close()
        procs = self.run._processes
        deadline = perf_counter() + 1.0
        for p in procs:
            p.join(timeout=max(0.0, deadline - perf_counter()))
        for p in procs:
            if p.is_alive():
                p.terminate()
        deadline = perf_counter() + 2.0
        for p in procs:
            p.join(timeout=max(0.0, deadline - perf_counter()))
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join(timeout=1.0)
        for reader in list(self.readers):
            with contextlib.suppress(Exception):
                reader.close()
        self.readers.clear()
        self.store = None
        if self._store_socket is not None:
            with contextlib.suppress(OSError):
                self._store_socket.close()
            self._store_socket = None
