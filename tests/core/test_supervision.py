"""One test per fault: each ends the run with the right status, names the device,
leaves no rank behind and leaves the events file readable to its last line."""

import json
import os
import signal
import subprocess
import sys
import time

import psutil
import pytest
from paralab.core.config import RunConfig
from paralab.core.events import MemorySample, RunEnded, StepDone, read_events
from paralab.core.run import Run

DDP = RunConfig(mode="ddp", devices="sim:2").with_overrides({
    "model.kind": "mlp", "model.width": 32, "model.depth": 2, "train.batch_size": 8,
    "train.steps": 100000, "telemetry.hang_timeout_s": 3})


def _file_ends_with(path, status):
    events = list(read_events(path))
    assert isinstance(events[-1], RunEnded) and events[-1].status == status
    steps = [e.step for e in events if isinstance(e, StepDone)]
    assert steps == list(range(1, len(steps) + 1))
    return events


def test_sigkill_of_a_rank_is_noticed_and_named(tmp_path, no_leftover_ranks):
    run = Run(DDP, metrics=tmp_path / "e.jsonl")
    killed_at = None
    for e in run.events():
        if isinstance(e, StepDone) and e.step == 3 and killed_at is None:
            os.kill(run.pids()[1], signal.SIGKILL)
            killed_at = time.perf_counter()
        if isinstance(e, RunEnded):
            ended_after = time.perf_counter() - killed_at
    end = _file_ends_with(tmp_path / "e.jsonl", "error")[-1]
    assert end.device == 1 and "rank 1 (sim1)" in end.message and "SIGKILL" in end.message
    assert ended_after < 2.5, ended_after


def test_hung_rank_is_named_within_the_timeout(tmp_path, no_leftover_ranks):
    run = Run(DDP, metrics=tmp_path / "e.jsonl", faults={1: "hang@5"})
    start = time.perf_counter()
    events = list(run.events())
    end = events[-1]
    assert end.status == "error" and end.device == 1, end
    assert "rank 1 (sim1) hangs" in end.message and "after step 4" in end.message
    assert time.perf_counter() - start < 3 + 30  # the timeout, plus start-up and teardown
    _file_ends_with(tmp_path / "e.jsonl", "error")


def test_out_of_memory_records_the_device_at_that_moment(tmp_path, no_leftover_ranks):
    # The state fits (a run that cannot even hold it is refused before it starts); the
    # activations of a 4096-sample batch do not.
    cfg = DDP.with_overrides({"sim.memory": "1MiB", "train.batch_size": 4096})
    events = list(Run(cfg, metrics=tmp_path / "e.jsonl").events())
    end = events[-1]
    assert end.status == "oom" and end.device in (0, 1) and f"sim{end.device}" in end.message
    at_oom = [e for e in events if isinstance(e, MemorySample) and e.device == end.device][-1]
    assert sum(at_oom.bytes.values()) > at_oom.capacity_bytes == 2**20
    _file_ends_with(tmp_path / "e.jsonl", "oom")


def test_stop_ends_every_rank_quickly(tmp_path, no_leftover_ranks):
    run = Run(DDP, metrics=tmp_path / "e.jsonl")
    for e in run.events():
        if isinstance(e, StepDone) and e.step == 5:
            run.stop()
            stopped_at = time.perf_counter()
    assert time.perf_counter() - stopped_at < 5
    _file_ends_with(tmp_path / "e.jsonl", "stopped")


def _wait(cond, timeout=60):
    deadline = time.time() + timeout
    while not cond():
        assert time.time() < deadline, "timed out"
        time.sleep(0.05)


def test_pause_holds_steps_and_set_lr_shows_in_step_events(no_leftover_ranks):
    import threading

    run = Run(DDP)
    steps: list[StepDone] = []
    reader = threading.Thread(target=lambda: steps.extend(e for e in run.events() if isinstance(e, StepDone)))
    reader.start()
    _wait(lambda: len(steps) >= 3)
    run.pause()
    time.sleep(1.0)  # steps already under way when pause was asked finish
    held = len(steps)
    time.sleep(1.5)
    assert len(steps) == held, "steps went on while paused"
    run.set_lr(0.5)
    run.resume()
    _wait(lambda: len(steps) >= held + 20)
    run.stop()
    reader.join(timeout=30)
    assert steps[0].lr == DDP.train.lr and steps[-1].lr == 0.5
    assert [s.step for s in steps] == list(range(1, len(steps) + 1))


def _live(processes: list[psutil.Process]) -> list[psutil.Process]:
    """Those still running: not exited, and not exited-but-unreaped (zombies)."""
    out = []
    for p in processes:
        try:
            if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                out.append(p)
        except psutil.NoSuchProcess:
            pass
    return out


def test_controller_death_takes_its_ranks_along(tmp_path):
    metrics = tmp_path / "e.jsonl"
    code = "import sys; from paralab.gui.entry import main; sys.exit(main())"
    args = ["run", "--set", "mode=ddp", "--set", "devices=sim:2", "--set", "train.steps=100000",
            "--set", "model.kind=mlp", "--set", "model.width=32", "--set", "train.batch_size=8",
            "--metrics", str(metrics), "--quiet"]
    p = subprocess.Popen([sys.executable, "-c", code, *args], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and not (metrics.exists() and '"event":"step"' in metrics.read_text()):
        time.sleep(0.2)
    family = psutil.Process(p.pid).children(recursive=True)
    assert family, "the run started no processes"
    p.kill()
    p.wait()
    # A rank that exited but was not reaped yet (a zombie: its parent, the dead controller's
    # forkserver, is gone too, and init reaps it when it gets to it) is not a survivor.
    deadline = time.time() + 10
    while (survivors := _live(family)) and time.time() < deadline:
        time.sleep(0.1)
    assert not survivors, f"left behind after the controller died: {survivors}"
    lines = metrics.read_text().splitlines()
    assert all(json.loads(x)["event"] for x in lines[:-1])  # every complete line readable


@pytest.mark.parametrize("kind", ["raise"])
def test_rank_exception_is_reported(kind, no_leftover_ranks, tmp_path, monkeypatch):
    """One sentence for the person; the traceback behind it in the log file."""
    monkeypatch.setenv("PARALAB_LOG", str(tmp_path / "paralab.log"))
    events = list(Run(DDP, faults={0: f"{kind}@3"}).events())
    end = events[-1]
    assert end.status == "error" and end.device == 0 and "injected fault" in end.message
    assert "\n" not in end.message and "Traceback" not in end.message
    logged = (tmp_path / "paralab.log").read_text()
    assert end.message in logged and "Traceback (most recent call last)" in logged and "_inject" in logged


def _pretend_rank(seconds: float) -> None:
    from paralab.core.lifeline import RANK_NAME, name_process

    name_process(f"{RANK_NAME}7")
    time.sleep(seconds)


def test_the_leftover_check_sees_a_forked_rank():
    """The fixture that guards every test above must be able to fail."""
    from paralab.core.run import context

    from tests.conftest import _is_rank

    p = context().Process(target=_pretend_rank, args=(30,), daemon=True)
    p.start()
    try:
        deadline = time.time() + 30
        while not any(c.pid == p.pid and _is_rank(c) for c in psutil.Process().children(recursive=True)):
            assert time.time() < deadline, "the check never saw the rank"
            time.sleep(0.1)
    finally:
        p.kill()
        p.join()


def test_ranks_carry_their_name(no_leftover_ranks):
    """What the check relies on: a real run's ranks are named paralab-rankN."""
    import threading

    run = Run(DDP)
    names: list[str] = []

    def watch():
        for e in run.events():
            if isinstance(e, StepDone) and not names:
                names.extend(psutil.Process(pid).name() for pid in run.pids())
                run.stop()

    t = threading.Thread(target=watch)
    t.start()
    t.join(timeout=120)
    assert sorted(names) == ["paralab-rank0", "paralab-rank1"]
