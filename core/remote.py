"""Ranks on other machines: torchrun starts them, and they dial the controller.

Controller (`paralab run --listen HOST:PORT --ranks N`): a `RankListener` waits for N
ranks.  Each proves it knows the key (PARALAB_AUTHKEY) and says `Hello`: its rank, the
world size, its host and its GPU (cuda:LOCAL_RANK).  The controller answers each with
its `RankJob`; from then on the same connection carries the rank's Batch/RankDone
messages, exactly like a forked rank's pipe, and the controller sends `Controls`
(stop, paused, lr) down it whenever they change.

Rank (`torchrun ... -m paralab.core.rank --controller HOST:PORT`): `remote_main`
connects, says hello, starts a thread that writes the controls it receives into a
local array (what `worker.Control` reads), and runs the same `worker.main` as a forked
rank, with torch.distributed initialised from torchrun's rendezvous (env://).  The
controller cannot kill a process on another machine: a rank whose connection closes
ends itself (the heartbeat checks it).

Clocks: perf_counter() counts from a different moment on each machine.  The job
carries how long the run has been going when it was sent; the rank sets its t0 to its
own perf_counter() minus that, so every time it reports is on the controller's clock,
off by the one-way network delay (well under a millisecond on a LAN).

Every node needs the same Python, torch and paralab as the controller: messages are
pickled dataclasses.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import hmac
import os
import queue
import secrets
import shlex
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from multiprocessing.connection import AuthenticationError, Client, Listener
from typing import Any

from . import validation
from .config import ConfigError, RunConfig
from .devices import Device, parse_spec, resolve
from .modes import REGISTRY

CONNECT_RETRY_S = 120.0
"""How long a rank keeps trying to reach a controller that is not listening yet."""
HANDSHAKE_S = 5.0
"""A connection that has not proved it knows the key within this long is closed."""
MAX_UNAUTHENTICATED = 32
"""Connections still in their handshake at once; more are closed at once (a flood of idle
sockets cannot hold the real ranks out for longer than one handshake deadline)."""
_CHALLENGE = 32


def _digest(key: bytes, role: bytes, challenge: bytes) -> bytes:
    return hmac.new(key, role + challenge, hashlib.sha256).digest()


def _expect(conn: Any, deadline: float, maxlength: int) -> bytes:
    if not conn.poll(max(0.0, deadline - time.monotonic())):
        raise AuthenticationError("no answer in time")
    return conn.recv_bytes(maxlength)


def prove(conn: Any, key: bytes, deadline: float, server: bool) -> None:
    """Mutual HMAC-SHA256 challenge-response: each side proves it knows the key without
    sending it.  Raises AuthenticationError (or EOFError, OSError) when the other side fails."""
    mine = secrets.token_bytes(_CHALLENGE)
    if server:
        conn.send_bytes(mine)
        if not hmac.compare_digest(_expect(conn, deadline, 64), _digest(key, b"rank", mine)):
            conn.send_bytes(b"refused")
            raise AuthenticationError("wrong key")
        theirs = _expect(conn, deadline, 64)
        conn.send_bytes(_digest(key, b"controller", theirs))
    else:
        theirs = _expect(conn, deadline, 64)
        conn.send_bytes(_digest(key, b"rank", theirs))
        conn.send_bytes(mine)
        answer = _expect(conn, deadline, 64)
        if answer == b"refused":
            raise AuthenticationError("the controller refused the key (is PARALAB_AUTHKEY the one it printed?)")
        if not hmac.compare_digest(answer, _digest(key, b"controller", mine)):
            raise AuthenticationError("the controller does not know the key")


@dataclass
class Hello:
    """A rank's first message: who it is and what it has."""

    rank: int
    world: int
    local_rank: int
    local_world: int
    host: str
    pid: int
    gpu_name: str = ""
    gpu_bytes: int = 0
    """cuda:LOCAL_RANK's memory; 0 when the rank has no GPU."""


@dataclass
class Controls:
    """The controller's stop / paused / lr, sent whenever one changes."""

    stop: float
    paused: float
    lr: float


@dataclass
class Refused:
    """Instead of a job: why this rank will not train (it exits)."""

    reason: str


class Aborted(Exception):
    """The ranks could not be gathered; `status` is the run's end status."""

    def __init__(self, status: str, message: str) -> None:
        super().__init__(message)
        self.status = status


def parse_address(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    if not host or not port.isdigit() or int(port) > 65535:
        raise ConfigError(f"{text!r} is not HOST:PORT; write e.g. 0.0.0.0:29400 (port 0 picks a free one)")
    return host.strip("[]"), int(port)


def authkey() -> tuple[str, bool]:
    """(the key, whether it was generated here) - PARALAB_AUTHKEY when set."""
    key = os.environ.get("PARALAB_AUTHKEY", "")
    return (key, False) if key else (secrets.token_hex(16), True)


# ---- controller side ---------------------------------------------------------------------------


def problems(cfg: RunConfig, ranks: int) -> list[str]:
    """What is wrong with running cfg on `ranks` torchrun ranks.  Simulated devices are
    the config's; any other spec means each rank's own cuda:LOCAL_RANK."""
    if ranks < 1:
        return [f"--ranks must be at least 1, not {ranks}"]
    try:
        sim = parse_spec(cfg.devices).kind == "sim"
    except ConfigError as e:
        return [str(e)]
    if cfg.mode not in REGISTRY:
        return validation.problems(cfg, resolve_devices=False)
    n = (parse_spec(cfg.devices).count if sim
         else ranks if REGISTRY[cfg.mode].one_process_per_device else 1)
    # The layout checks need a device count, not the GPUs here: check as if simulated.
    out = validation.problems((cfg if sim else replace(cfg, devices=f"sim:{n}")), resolve_devices=False)
    world = REGISTRY[cfg.mode].world_size(n)
    if not out and world != ranks:
        out.append(f"mode {cfg.mode} on {n} device{'s' if n != 1 else ''} runs {world} "
                   f"rank{'s' if world != 1 else ''}, not {ranks}: pass --ranks {world} and start "
                   f"{world} in all with torchrun")
    return out


def devices_for(cfg: RunConfig, hellos: list[Hello]) -> list[Device]:
    """The run's logical devices once every rank has said hello."""
    if parse_spec(cfg.devices).kind == "sim":
        return resolve(cfg.devices, cfg.sim.memory, gpus=[])
    for h in hellos:
        if not h.gpu_bytes:
            raise Aborted("error", f"rank {h.rank} on {h.host} has no CUDA GPU cuda:{h.local_rank}; "
                                   f"use --set devices=sim:{len(hellos)} to simulate devices")
    return [Device(h.rank, "cuda", h.gpu_bytes, h.local_rank, 1, h.gpu_name) for h in hellos]


def backend_for(devices: list[Device]) -> str:
    # Every remote rank has a GPU of its own (host, LOCAL_RANK): NCCL; simulated: gloo.
    return "nccl" if devices and all(d.kind == "cuda" for d in devices) else "gloo"


class RankListener:
    """Accepts the ranks' connections.  The key check runs in a thread per connection
    (what Listener.accept would do inline), so a peer that connects and says nothing
    holds up only itself, never the ranks behind it."""

    def __init__(self, address: str, key: str) -> None:
        host, port = parse_address(address)
        try:
            self._listener = Listener((host, port), authkey=None)
        except OSError as e:
            raise ConfigError(f"cannot listen on {address}: {e.strerror or e}") from None
        self.address: tuple[str, int] = self._listener.address
        self._key = key.encode()
        self._arrived: queue.SimpleQueue[tuple[Any, Hello]] = queue.SimpleQueue()
        self._closed = threading.Event()
        self._pending = threading.BoundedSemaphore(MAX_UNAUTHENTICATED)
        self.turned_away = 0
        """Connections closed before they proved the key: wrong key, too slow, too many at once."""
        self.last_turned_away = ""
        self.on_turned_away: Callable[[str], None] | None = None
        """Called (at most every 10 s) with a sentence when a connection fails the handshake."""
        self._reported_at = -1e9
        threading.Thread(target=self._accept, daemon=True, name="paralab-listener").start()

    def _accept(self) -> None:
        while not self._closed.is_set():
            try:
                conn = self._listener.accept()
            except OSError:
                time.sleep(0.05)
                continue
            if self._closed.is_set():
                conn.close()
                return
            if not self._pending.acquire(blocking=False):
                self._turn_away(conn, f"more than {MAX_UNAUTHENTICATED} connections were in their handshake")
                continue
            threading.Thread(target=self._handshake, args=(conn,), daemon=True).start()

    def _turn_away(self, conn: Any, why: str) -> None:
        self.turned_away += 1
        self.last_turned_away = why
        now = time.monotonic()
        if self.on_turned_away is not None and now - self._reported_at > 10.0:
            self._reported_at = now
            with contextlib.suppress(Exception):
                self.on_turned_away(f"a connection failed the handshake ({why}); "
                                    f"{self.turned_away} so far")
        with contextlib.suppress(OSError):
            conn.close()

    def _handshake(self, conn: Any) -> None:
        try:
            deadline = time.monotonic() + HANDSHAKE_S
            try:
                prove(conn, self._key, deadline, server=True)
                # Only an authenticated peer gets to send a pickle.
                if not conn.poll(max(0.0, deadline - time.monotonic())):
                    raise AuthenticationError("no hello in time")
                hello = conn.recv()
            except Exception as e:  # a wrong key, a port scanner, a peer that went away or said nothing
                self._turn_away(conn, str(e) or type(e).__name__)
                return
        finally:
            self._pending.release()
        if isinstance(hello, Hello):
            self._arrived.put((conn, hello))
        else:
            self._turn_away(conn, "its first message was not a rank's hello")

    def gather(self, ranks: int, stop: Callable[[], bool], timeout_s: float | None = None) -> list[tuple[Any, Hello]]:
        """(connection, hello) of ranks 0..ranks-1, or Aborted (stopped, timed out, a rank
        that does not belong to this run); then stops listening."""
        got: dict[int, tuple[Any, Hello]] = {}
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        try:
            while len(got) < ranks:
                if stop():
                    raise Aborted("stopped", f"stopped while waiting for ranks ({len(got)} of {ranks} connected)")
                if deadline is not None and time.monotonic() > deadline:
                    raise Aborted("error", f"only {len(got)} of {ranks} ranks connected within {timeout_s:g} s"
                                  + self.turned_away_note())
                try:
                    conn, hello = self._arrived.get(timeout=0.1)
                except queue.Empty:
                    continue
                wrong = _misfit(hello, ranks, got)
                if wrong:
                    refuse([conn], wrong)
                    raise Aborted("error", wrong)
                got[hello.rank] = (conn, hello)
        except Aborted as e:
            refuse([c for c, _ in got.values()], str(e))
            raise
        finally:
            self.close()
        return [got[r] for r in sorted(got)]

    def turned_away_note(self) -> str:
        if not self.turned_away:
            return ""
        return (f"; {self.turned_away} connection{'s' if self.turned_away != 1 else ''} failed the handshake "
                f"(last: {self.last_turned_away})")

    def close(self) -> None:
        if self._closed.is_set():
            return
        self._closed.set()
        host, port = self.address
        # accept() does not return when its socket is closed under it: wake it with a connection.
        with contextlib.suppress(OSError), socket.create_connection(
                ("127.0.0.1" if host in ("0.0.0.0", "") else host, port), timeout=1.0):
            pass
        self._listener.close()
        while True:  # ranks that came but were not needed (a second torchrun) are told to go
            try:
                conn, _ = self._arrived.get_nowait()
            except queue.Empty:
                break
            refuse([conn], "this run already has all its ranks")


def _misfit(hello: Hello, ranks: int, got: dict[int, Any]) -> str:
    """Why this rank does not belong to the run ('' when it does)."""
    if hello.world != ranks:
        return (f"rank {hello.rank} on {hello.host} belongs to a torchrun world of {hello.world} ranks, "
                f"but this run waits for {ranks} (--ranks)")
    if hello.rank in got or not 0 <= hello.rank < ranks:
        return (f"rank {hello.rank} on {hello.host} connected, but this run already has a rank by that "
                "number (a second torchrun?)")
    return ""


def refuse(conns: list[Any], reason: str) -> None:
    for conn in conns:
        with contextlib.suppress(Exception):
            conn.send(Refused(reason))
        with contextlib.suppress(Exception):
            conn.close()


def instructions(address: tuple[str, int], ranks: int, key: str, generated: bool) -> str:
    """What a person runs on each node, for the CLI to print."""
    host, port = address
    if host in ("0.0.0.0", "::", ""):
        host = socket.getfqdn()
    env = f"PARALAB_AUTHKEY={key} " if generated else ""
    tail = f"-m paralab.core.rank --controller {shlex.quote(f'{host}:{port}')}"
    return (f"paralab: listening on {host}:{port}, waiting for {ranks} rank{'s' if ranks != 1 else ''}"
            + ("" if generated else " (each node needs PARALAB_AUTHKEY set as it is here)") + ".\n"
            f"paralab: on one machine run:\n"
            f"  {env}torchrun --standalone --nproc-per-node {ranks} {tail}\n"
            f"paralab: on several machines run on each (NODES × PER_NODE = {ranks}, FIRST_NODE: any one of them):\n"
            f"  {env}torchrun --nnodes NODES --nproc-per-node PER_NODE --rdzv-backend c10d "
            f"--rdzv-endpoint FIRST_NODE:29500 {tail}")


# ---- rank side ---------------------------------------------------------------------------------


class ControlReceiver(threading.Thread):
    """Writes the controller's Controls into `shared` (indexed like the forked ranks'
    RawArray, so worker.Control reads it unchanged) and notices when the controller is gone."""

    def __init__(self, conn: Any, lr: float) -> None:
        from .worker import LR

        super().__init__(daemon=True, name="paralab-controls")
        self.conn = conn
        self.shared = [0.0, 0.0, 0.0]
        self.shared[LR] = lr
        self.gone = threading.Event()

    def run(self) -> None:
        from .worker import LR, PAUSED, STOP

        while True:
            try:
                msg = self.conn.recv()
            except Exception:  # end of file, reset, closed by the rank itself at its end
                self.gone.set()
                return
            if isinstance(msg, Controls):
                self.shared[STOP], self.shared[PAUSED], self.shared[LR] = msg.stop, msg.paused, msg.lr

    def controller_alive(self) -> bool:
        return not self.gone.is_set()


def remote_main(argv: list[str] | None = None) -> int:
    """`python -m paralab.core.rank --controller HOST:PORT`, run by torchrun."""
    from . import worker

    p = argparse.ArgumentParser(prog="python -m paralab.core.rank",
                                description="A paralab rank started by torchrun: it trains for a controller "
                                            "that waits with `paralab run --listen HOST:PORT --ranks N`.")
    p.add_argument("--controller", required=True, metavar="HOST:PORT")
    args = p.parse_args(argv)
    os.environ.setdefault("CUDA_DEVICE_ORDER", "PCI_BUS_ID")  # cuda:N means the GPU NVML calls N
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    key = os.environ.get("PARALAB_AUTHKEY", "")
    if not key:
        return _fail(f"rank {rank}: set PARALAB_AUTHKEY to the key the controller printed")
    try:
        conn = _connect(parse_address(args.controller), key.encode(), rank)
    except (ConfigError, OSError, EOFError, AuthenticationError) as e:
        return _fail(f"rank {rank}: cannot reach the controller at {args.controller}: {e}")
    name, total = _gpu(local_rank)
    conn.send(Hello(rank, world, local_rank, local_world, socket.gethostname(), os.getpid(), name, total))
    try:
        job = conn.recv()
    except (EOFError, OSError):
        return _fail(f"rank {rank}: the controller went away before sending a job")
    if isinstance(job, Refused):
        return _fail(f"rank {rank}: the controller refused this rank: {job.reason}")
    job.t0 = time.perf_counter() - job.t0  # seconds since the run started -> this machine's clock
    receiver = ControlReceiver(conn, RunConfig.from_dict(job.config).train.lr)
    receiver.start()
    # torchrun ends the other ranks with SIGTERM when one fails: such a rank reports that it
    # was stopped, so that the controller blames the one that failed, not the ones it took along.
    signal.signal(signal.SIGTERM, _terminated)
    done = worker.main(job, conn, receiver.shared, receiver.controller_alive)
    return 0 if done.status in ("ok", "stopped") else 1


def _connect(address: tuple[str, int], key: bytes, rank: int) -> Any:
    deadline = time.monotonic() + CONNECT_RETRY_S
    while True:
        try:
            conn = Client(address)
        except (TimeoutError, ConnectionRefusedError):
            if time.monotonic() > deadline:
                raise
            time.sleep(1.0)
            continue
        try:
            prove(conn, key, time.monotonic() + HANDSHAKE_S, server=False)
            return conn
        except AuthenticationError as e:
            conn.close()
            if "refused" in str(e) or "does not know" in str(e) or time.monotonic() > deadline:
                raise
        except (EOFError, OSError):  # turned away (a crowd of connections): try again
            conn.close()
            if time.monotonic() > deadline:
                raise
        time.sleep(1.0)


def _gpu(local_rank: int) -> tuple[str, int]:
    import torch

    if not torch.cuda.is_available() or local_rank >= torch.cuda.device_count():
        return "", 0
    props = torch.cuda.get_device_properties(local_rank)
    return props.name, int(props.total_memory)


def _terminated(_signum: int, _frame: Any) -> None:
    raise KeyboardInterrupt("ended by torchrun")  # worker.main reports it as stopped


def _fail(message: str) -> int:
    print(f"paralab: {message}", file=sys.stderr)
    return 2
