"""Issue 14: the app killed with SIGKILL leaves no paralab process behind (forkserver,
prediction process, resource tracker, ranks), and its Open shows a sentence for any file."""

import os

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")

import signal  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

import psutil  # noqa: E402
import pytest  # noqa: E402

START_S = 120


def _alive(pids: list[int]) -> list[int]:
    out = []
    for pid in pids:
        try:
            if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                out.append(pid)
        except psutil.Error:
            pass
    return out


@pytest.mark.slow
def test_sigkill_of_the_app_leaves_no_process_behind(tmp_path):
    env = {**os.environ, "QT_QPA_PLATFORM": "offscreen", "XDG_CONFIG_HOME": str(tmp_path)}
    cmd = [sys.executable, "-m", "paralab.gui.entry", "gui", "--start", "--set", "mode=ddp",
           "--set", "devices=sim:2", "--set", "model.width=16", "--set", "model.depth=1",
           "--set", "train.batch_size=8", "--set", "train.steps=1000000"]
    proc = subprocess.Popen(cmd, env=env, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    family: list[int] = []
    try:
        app = psutil.Process(proc.pid)
        deadline = time.time() + START_S
        while time.time() < deadline and proc.poll() is None:
            kids = app.children(recursive=True)
            names = [k.name() for k in kids if k.is_running()]
            # ranks, and the prediction process, both forked from the forkserver
            if sum(n.startswith("paralab-rank") for n in names) == 2 and "paralab-predict" in names:
                family = [k.pid for k in kids]
                break
            time.sleep(0.3)
        assert family, "the app did not start its ranks and its prediction process"
        time.sleep(1)
        family = [k.pid for k in app.children(recursive=True)]
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        time.sleep(5)
        left = _alive(family)
        assert not left, [(p, psutil.Process(p).name()) for p in left]
    finally:
        if proc.poll() is None:
            proc.kill()
        for pid in _alive(family):
            os.kill(pid, signal.SIGKILL)
