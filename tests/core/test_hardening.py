"""Issue 14: nothing listens beyond loopback, failed writes stop every rank, the hung rank is named."""

from __future__ import annotations

import contextlib
import socket
import threading

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


# ---- items 3, 4, 7: the events file ------------------------------------------------------------

SINGLE = RunConfig().with_overrides({"mode": "single", "devices": "sim:1", "model.kind": "linear",
                                     "train.batch_size": 8, "sim.gpu": "host"})


def _disk_fills_after(monkeypatch, writes: int) -> None:
    """The events file's writes: `writes` succeed, the next writes half a line, then ENOSPC."""
    import errno
    import os

    from paralab.core import eventsfile

    real, calls = os.write, {"n": 0}

    def write(fd, data):
        calls["n"] += 1
        if calls["n"] <= writes:
            return real(fd, data)
        if calls["n"] == writes + 1:
            return real(fd, bytes(data)[: max(1, len(data) // 2)])
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(eventsfile.EventsFile, "_write_some", staticmethod(write))


def _lines(path) -> list[dict]:
    import json

    text = path.read_text()
    assert text.endswith("\n"), "the last line is torn"
    return [json.loads(x) for x in text.splitlines()]


def test_disk_full_mid_run_ends_it_with_a_sentence_and_stops_every_rank(tmp_path, monkeypatch, no_leftover_ranks):
    metrics = tmp_path / "out.jsonl"
    _disk_fills_after(monkeypatch, 8)
    run = Run(TWO_RANKS.with_overrides({"train.steps": 100000}), metrics=metrics)
    events = list(run.events())
    end = events[-1]
    assert isinstance(end, RunEnded) and end.status == "error", end
    assert "disk is full" in end.message and "every rank was stopped" in end.message
    assert not [p for p in run.pids() if psutil.pid_exists(p) and psutil.Process(p).status() != "zombie"]
    lines = _lines(metrics)  # every line kept is whole
    assert lines[0]["event"] == "start" and len(lines) >= 2
    monkeypatch.undo()  # the next run works
    assert list(Run(SINGLE.with_overrides({"train.steps": 3}), metrics=metrics).events())[-1].status == "ok"


def test_the_cli_says_the_disk_is_full(tmp_path, monkeypatch, capsys, no_leftover_ranks):
    from paralab.core.cli import main

    _disk_fills_after(monkeypatch, 5)
    code = main(["run", "--set", "mode=ddp", "--set", "devices=sim:2", "--set", "model.kind=linear",
                 "--set", "train.batch_size=8", "--set", "train.steps=100000", "--metrics",
                 str(tmp_path / "m.jsonl"), "--quiet"])
    err = capsys.readouterr().err
    assert code == 1 and "disk is full" in err and "Traceback" not in err, err
    _lines(tmp_path / "m.jsonl")


def test_the_events_file_deleted_mid_run_is_said(tmp_path, no_leftover_ranks):
    metrics = tmp_path / "out.jsonl"
    run = Run(SINGLE.with_overrides({"train.steps": 100000}), metrics=metrics)
    for event in run.events():
        if isinstance(event, StepDone) and event.step == 5:
            metrics.unlink()
    assert run.ended.status == "error" and "was deleted" in run.ended.message, run.ended


def test_long_runs_summarise_steps(tmp_path, monkeypatch):
    from paralab.core import eventsfile

    monkeypatch.setattr(eventsfile, "FULL_STEPS", 10)
    monkeypatch.setattr(eventsfile, "SUMMARY_S", 3600.0)
    f = eventsfile.EventsFile(tmp_path / "e.jsonl")
    f.write([StepDone(s, float(s), s * 0.1, 1.0) for s in range(1, 1011)])
    f.write([RunEnded("ok", "done", None, 1.0, 1010)])
    f.close()
    lines = _lines(tmp_path / "e.jsonl")
    steps = [x for x in lines if x["event"] == "step"]
    assert len(steps) == 11 and [s["step"] for s in steps[:10]] == list(range(1, 11))
    last = steps[-1]
    assert (last["first_step"], last["step"], last["loss_min"], last["loss_max"]) == (11, 1010, 11.0, 1010.0)
    assert last["loss_mean"] == pytest.approx(510.5)
    assert lines[-1]["event"] == "end"
    from paralab.core.events import read_events

    assert [e.step for e in read_events(tmp_path / "e.jsonl") if isinstance(e, StepDone)][-1] == 1010


# ---- item 8: the hung rank is the one named ---------------------------------------------------


@pytest.mark.slow
def test_the_stopped_rank_is_blamed_every_time_under_load(no_leftover_ranks):
    """kill -STOP one rank: its heartbeats stop, its peer's go on inside the collective."""
    import os
    import signal
    import subprocess
    import sys

    burner = subprocess.Popen([sys.executable, "-c", "while True: pass"])  # the load
    named = []
    try:
        for attempt in range(10):
            victim = attempt % 2
            run = Run(TWO_RANKS.with_overrides({"train.steps": 100000, "telemetry.hang_timeout_s": 3}))
            stopped = None
            for event in run.events():
                if isinstance(event, StepDone) and event.step >= 3 and stopped is None:
                    stopped = run.pids()[victim]
                    os.kill(stopped, signal.SIGSTOP)
            named.append((victim, run.ended.message))
    finally:
        burner.kill()
        burner.wait()
    wrong = [(v, m) for v, m in named if not m.startswith(f"rank {v} (sim{v}) hangs")]
    assert not wrong, wrong


# ---- item 9: what died ---------------------------------------------------------------------------


def test_a_killed_forkserver_is_named(no_leftover_ranks):
    import os
    import signal
    from multiprocessing import forkserver

    run = Run(TWO_RANKS.with_overrides({"train.steps": 100000}))
    for event in run.events():
        if isinstance(event, StepDone) and event.step == 3:
            os.kill(forkserver._forkserver._forkserver_pid, signal.SIGKILL)
    assert run.ended.status == "error" and "forkserver" in run.ended.message, run.ended
    assert list(Run(SINGLE.with_overrides({"train.steps": 2})).events())[-1].status == "ok"  # the next run works


def test_a_file_deleted_just_before_the_end_is_noticed_at_close(tmp_path):
    from paralab.core.eventsfile import EventsFile

    f = EventsFile(tmp_path / "e.jsonl")
    f.write([StepDone(1, 1.0, 0.1, 1.0)])
    (tmp_path / "e.jsonl").unlink()
    f.write([RunEnded("ok", "done", None, 1.0, 1)])
    f.close()
    assert "was deleted" in f.problem
