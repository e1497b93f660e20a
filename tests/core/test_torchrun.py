"""Ranks that torchrun starts report to one controller that waits for them (core.remote).

On this machine only (torchrun --standalone, simulated devices, gloo): several nodes
and CUDA ranks are the same code with a different torchrun command.
"""

from __future__ import annotations

import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest
from paralab.core.config import RunConfig
from paralab.core.events import MemorySample, RunEnded, RunStarted, StepDone, read_events
from paralab.core.run import Run

from tests.helpers import ended, losses, run_events

TORCHRUN = Path(sys.executable).with_name("torchrun")
pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("no_leftover_ranks"),
              pytest.mark.skipif(not TORCHRUN.exists(), reason="torchrun is not installed")]

TINY = {"mode": "ddp", "devices": "sim:2", "model.kind": "mlp", "model.width": 32, "model.depth": 2,
        "train.batch_size": 8, "train.steps": 10}
ENV = {**os.environ, "PATH": f"{TORCHRUN.parent}{os.pathsep}{os.environ.get('PATH', '')}"}
ENV.pop("PARALAB_AUTHKEY", None)


def _torchrun(port: int, key: str) -> subprocess.Popen:
    return subprocess.Popen(
        [str(TORCHRUN), "--standalone", "--nproc-per-node", "2", "-m", "paralab.core.rank",
         "--controller", f"127.0.0.1:{port}"],
        env={**ENV, "PARALAB_AUTHKEY": key}, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def _lines(stream) -> queue.SimpleQueue:
    lines: queue.SimpleQueue = queue.SimpleQueue()
    threading.Thread(target=lambda: [lines.put(x) for x in stream], daemon=True).start()
    return lines


def _line_matching(lines: queue.SimpleQueue, pattern: str, timeout: float = 60) -> str:
    deadline = time.monotonic() + timeout
    while True:
        line = lines.get(timeout=max(0.01, deadline - time.monotonic()))
        if re.search(pattern, line):
            return line


def _all_gone(procs: list[psutil.Process], timeout: float = 5) -> list[int]:
    _, alive = psutil.wait_procs(procs, timeout=timeout)
    return [p.pid for p in alive]


def test_cli_controller_and_torchrun_ranks_train_like_forked_ranks(tmp_path):
    metrics = tmp_path / "events.jsonl"
    sets = [a for k, v in TINY.items() for a in ("--set", f"{k}={v}")]
    controller = subprocess.Popen(
        [sys.executable, "-m", "paralab.core.cli", "run", *sets, "--listen", "127.0.0.1:0", "--ranks", "2",
         "--metrics", str(metrics), "--quiet"], env=ENV, stderr=subprocess.PIPE, text=True)
    ranks = None
    try:
        # Port 0 picks a free port; the controller prints it inside the command to run.
        command = _line_matching(_lines(controller.stderr), r"torchrun --standalone").strip()
        port = int(re.search(r"--controller 127\.0\.0\.1:(\d+)$", command).group(1))
        assert port > 0 and re.match(r"PARALAB_AUTHKEY=[0-9a-f]{32} torchrun ", command), command
        ranks = subprocess.Popen(command, shell=True, env=ENV, stdout=subprocess.DEVNULL,
                                 stderr=subprocess.PIPE, text=True)
        _, rank_err = ranks.communicate(timeout=180)
        assert ranks.returncode == 0, rank_err[-3000:]
        assert controller.wait(timeout=30) == 0
    finally:
        for p in (controller, ranks):
            if p is not None and p.poll() is None:
                p.kill()
                p.communicate()
    events = list(read_events(metrics))
    assert ended(events).status == "ok"
    memory = {e.device for e in events if isinstance(e, MemorySample)}
    assert memory == {0, 1}
    start = events[0]
    assert all(d["description"].endswith(f" on {os.uname().nodename}") for d in start.devices), start.devices
    forked = run_events(RunConfig().with_overrides(TINY))
    assert len(losses(events)) == len(losses(forked)) == TINY["train.steps"]
    assert losses(events) == pytest.approx(losses(forked), abs=1e-5)
    times = [e.time_s for e in events if isinstance(e, StepDone)]
    assert times == sorted(times) and 0 < times[0] < ended(events).time_s  # the ranks' clocks, shifted to ours


def test_controls_reach_torchrun_ranks_and_a_killed_rank_is_named():
    cfg = RunConfig().with_overrides({**TINY, "train.steps": 100000})
    run = Run(cfg, listen="127.0.0.1:0", ranks=2, connect_timeout_s=120)
    ranks = _torchrun(run.listener.address[1], run.authkey)
    family: list[psutil.Process] = []
    phase, step, since, held = "start", 0, 0.0, []
    deadline = time.monotonic() + 120
    lags = []
    try:
        for e in run.events():
            step = e.step if isinstance(e, StepDone) else step
            now = time.monotonic()
            assert now < deadline, f"stuck at {phase}, step {step}"
            if isinstance(e, RunStarted):
                start_wall = e.time
            if isinstance(e, StepDone) and phase in ("start", "lr"):  # the ranks' host times, on our clock:
                lags.append(time.time() - start_wall - e.host_s)
            if phase == "start" and step >= 2:  # controls travel over the ranks' connections
                run.set_lr(0.125)
                phase = "lr"
            elif phase == "lr" and isinstance(e, StepDone) and e.lr == 0.125:
                run.pause()
                phase, since = "paused", now
            elif phase == "paused" and now - since > 1.0 + 0.5 * len(held):
                held.append(step)
                if len(held) == 2:
                    assert held[0] == held[1], f"steps went on while paused: {held}"
                    run.resume()
                    phase = "resumed"
            elif phase == "resumed" and step > held[-1] + 2:
                family = psutil.Process(ranks.pid).children(recursive=True)
                victim = run.remote_ranks[1].pid
                assert victim in [p.pid for p in family]
                os.kill(victim, signal.SIGKILL)
                phase = "killed"
        assert phase == "killed", phase
        # ...sent a little after they happened (RunStarted.time is read a moment after the clock starts)
        assert -0.05 < min(lags) and max(lags) < 1.0, (min(lags), max(lags))
        end = run.ended
        assert isinstance(end, RunEnded) and end.status == "error", end
        assert end.device == 1 and end.message.startswith("rank 1 (sim1)") and str(victim) in end.message
        # torchrun sees its rank die, ends the other and fails; nothing of it is left.
        assert ranks.wait(timeout=20) != 0
        assert _all_gone(family) == []
    finally:
        if ranks.poll() is None:
            ranks.kill()
        ranks.communicate()


def test_ranks_end_when_their_controller_dies(tmp_path):
    metrics = tmp_path / "events.jsonl"
    sets = [a for k, v in {**TINY, "train.steps": 100000}.items() for a in ("--set", f"{k}={v}")]
    env = {**ENV, "PARALAB_AUTHKEY": "a key both sides know"}
    controller = subprocess.Popen(
        [sys.executable, "-m", "paralab.core.cli", "run", *sets, "--listen", "127.0.0.1:0", "--ranks", "2",
         "--metrics", str(metrics), "--quiet"], env=env, stderr=subprocess.PIPE, text=True)
    ranks = None
    try:
        line = _line_matching(_lines(controller.stderr), r"listening on 127\.0\.0\.1:\d+")
        assert "PARALAB_AUTHKEY set as it is here" in line  # a key from the environment is never printed
        ranks = _torchrun(int(re.search(r":(\d+),", line).group(1)), env["PARALAB_AUTHKEY"])
        deadline = time.monotonic() + 120
        while not (metrics.exists() and '"event":"step"' in metrics.read_text()):
            assert time.monotonic() < deadline and ranks.poll() is None, "no step"
            time.sleep(0.1)
        family = psutil.Process(ranks.pid).children(recursive=True)
        controller.kill()  # no stop message, no goodbye: only the connections close
        ranks.wait(timeout=20)
        assert _all_gone(family) == []
    finally:
        for p in (controller, ranks):
            if p is not None and p.poll() is None:
                p.kill()
                p.communicate()


@pytest.mark.parametrize("args, words", [
    (["--listen", "127.0.0.1:0"], "--listen HOST:PORT and --ranks N go together"),
    (["--listen", "127.0.0.1:0", "--ranks", "3"], "runs 2 ranks, not 3: pass --ranks 2"),
    (["--listen", "nowhere", "--ranks", "2"], "'nowhere' is not HOST:PORT"),
])
def test_bad_listen_flags_exit_2_with_a_sentence(args, words, capsys):
    from paralab.core.cli import main

    assert main(["run", "--set", "mode=ddp", "--set", "devices=sim:2", *args]) == 2
    err = capsys.readouterr().err
    assert words in err and "Traceback" not in err
