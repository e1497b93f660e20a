"""Issue 14: nothing listens beyond loopback, failed writes stop every rank, the hung rank is named."""

from __future__ import annotations

import contextlib
import socket
import threading
import time

import psutil
import pytest
from paralab.core.config import RunConfig
from paralab.core.events import RunEnded, StepDone
from paralab.core.run import Run

TWO_RANKS = RunConfig().with_overrides({"mode": "ddp", "devices": "sim:2", "model.kind": "linear",
                                        "train.batch_size": 8, "sim.gpu": "host"})


def _own_addresses() -> list[str]:
    """This machine's IPv4 addresses other than loopback (what a neighbour would dial)."""
    return [a.address for addrs in psutil.net_if_addrs().values() for a in addrs
            if a.family == socket.AF_INET and not a.address.startswith("127.")]


def _listening(pids: list[int]) -> list[tuple[str, int, int]]:
    out = []
    for c in psutil.net_connections(kind="inet"):
        if c.status == psutil.CONN_LISTEN and c.pid in pids:
            out.append((c.laddr.ip, c.laddr.port, c.pid))
    return out


def test_a_local_run_listens_on_loopback_only(no_leftover_ranks):
    run = Run(TWO_RANKS.with_overrides({"train.steps": 100000}))
    seen: list[tuple[str, int, int]] = []
    answered: list[tuple[str, int]] = []
    for event in run.events():
        if isinstance(event, StepDone) and event.step >= 3 and not seen:
            seen = _listening([psutil.Process().pid, *run.pids()])
            # Nothing answers on the machine's own address at those ports while the run is on.
            for address in _own_addresses():
                for _, port, _ in seen:
                    with contextlib.suppress(OSError), socket.create_connection((address, port), timeout=1.0):
                        answered.append((address, port))
            run.stop()
    assert seen, "the run should listen somewhere (its store, gloo)"
    wide = [s for s in seen if not (s[0].startswith("127.") or s[0] == "::1")]
    assert not wide, f"listening beyond loopback: {wide}"
    assert not answered, f"reachable from the machine's own address: {answered}"


# ---- item 2: the torchrun listener ------------------------------------------------------------


def _hello(rank: int = 0):
    from paralab.core.remote import Hello

    return Hello(rank, 1, 0, 1, socket.gethostname(), 1)


def test_listener_closes_idle_and_surplus_sockets_and_still_admits_the_rank(monkeypatch):
    from paralab.core import remote

    monkeypatch.setattr(remote, "HANDSHAKE_S", 1.0)
    listener = remote.RankListener("127.0.0.1:0", "k3y")
    address = listener.address
    idle = [socket.create_connection(address) for _ in range(remote.MAX_UNAUTHENTICATED + 20)]
    try:
        got: list = []
        thread = threading.Thread(target=lambda: got.append(remote._connect(address, b"k3y", 0)), daemon=True)
        thread.start()
        thread.join(30)
        assert got, "the rank did not get through the crowd of idle sockets"
        got[0].send(_hello())
        (conn, hello), = listener.gather(1, lambda: False, timeout_s=30)
        assert hello.rank == 0
        conn.close()
        # Every idle socket was closed by the listener (deadline or cap), not left holding a thread.
        for s in idle:
            s.settimeout(10)
            with contextlib.suppress(OSError):
                while s.recv(4096):
                    pass
        assert listener.turned_away >= len(idle)
    finally:
        listener.close()
        for s in idle:
            s.close()


def test_a_wrong_key_is_refused_with_a_sentence():
    from multiprocessing.connection import AuthenticationError

    from paralab.core import remote

    listener = remote.RankListener("127.0.0.1:0", "right")
    try:
        with pytest.raises(AuthenticationError, match="refused the key"):
            remote._connect(listener.address, b"wrong", 0)
        with pytest.raises(remote.Aborted, match="failed the handshake"):
            listener.gather(1, lambda: False, timeout_s=1)
    finally:
        listener.close()
