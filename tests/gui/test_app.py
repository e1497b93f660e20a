"""The app shell end to end: the form, a real run on two simulated devices, the controls,
a forced out-of-memory, closing mid-run, and `paralab gui` under SIGTERM.

Rank processes take several seconds to start on a small, busy machine: every wait is
generous, and each run is tiny (an MLP of width 16) and stopped as soon as it has shown
what the test needs.
"""

import os

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")

import csv  # noqa: E402
import importlib.util  # noqa: E402
import signal  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import psutil  # noqa: E402
import pytest  # noqa: E402
from paralab.core.config import RunConfig  # noqa: E402
from paralab.core.events import RunEnded, StepDone, read_events  # noqa: E402
from paralab.gui.style import is_dark  # noqa: E402
from PySide6.QtWidgets import QApplication, QPushButton  # noqa: E402

pytestmark = pytest.mark.slow
START_S = 120  # rank processes: forkserver start-up, torch import, gloo rendezvous


def _mode() -> tuple[str, int]:
    """The multi-device mode this tree has, else single on one device."""
    for mode, module in (("ddp", "ddp"), ("data-parallel", "data_parallel"), ("model-parallel", "model_parallel")):
        if importlib.util.find_spec(f"paralab.core.parallel.{module}"):
            return mode, 2
    return "single", 1


MODE, DEVICES = _mode()


def fill(panel, *, memory="24GiB", steps=1_000_000, width=16, depth=1, batch=8, mode=MODE, devices=DEVICES):
    """Set the form the way a person would, one widget at a time."""
    panel.mode.setCurrentText(mode)
    panel.dev_sim.setChecked(True)
    panel.sim_count.setValue(devices)
    panel.memory.setText(memory)
    panel.model_kind.setCurrentText("mlp")
    panel.data_kind.setCurrentText("auto")
    panel._spins["model.width"].setValue(width)
    panel._spins["model.depth"].setValue(depth)
    panel._spins["train.batch_size"].setValue(batch)
    panel._spins["train.steps"].setValue(steps)
    panel.optimizer.setCurrentText("sgd")
    panel.lr.setText("0.01")


def steps_of(collected: list) -> list[StepDone]:
    return [e for batch in collected for e in batch if isinstance(e, StepDone)]


def alive(pids: list[int]) -> list[int]:
    out = []
    for pid in pids:
        try:
            if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                out.append(pid)
        except psutil.NoSuchProcess:
            pass
    return out


def test_run_pause_resume_learning_rate_stop_and_export(window, qtbot, tmp_path, no_leftover_ranks):
    w, panel = window, window.panel
    fill(panel)
    assert panel.problems() == [] and w.start_action.isEnabled()
    collected: list[list] = []
    w.controller.events.connect(collected.append)

    assert w.start_run()
    assert not w.start_action.isEnabled() and not panel.form.isEnabled()
    data = w.data
    qtbot.waitUntil(lambda: len(data.steps) >= 5 and all(len(d.memory) for d in data.devices), timeout=START_S * 1000)
    assert [d.label for d in data.devices] == [f"sim{i}" for i in range(DEVICES)]
    qtbot.waitUntil(lambda: len(w.dashboard.loss_curve.xData if w.dashboard.loss_curve.xData is not None else []) > 0,
                    timeout=5000)
    assert w.step_label.text().startswith("step ") and "loss" in w.loss_label.text()

    # Paused ranks take no steps: the count holds still, and the step times show the gap.
    w.pause_run()
    assert w.resume_action.isEnabled() and not w.pause_action.isEnabled()
    qtbot.wait(1000)  # steps already in flight arrive
    held = data.last_step.step
    qtbot.wait(2500)
    assert data.last_step.step == held
    w.resume_run()
    qtbot.waitUntil(lambda: data.last_step.step > held + 5, timeout=60_000)
    # The pause is in the host's time; a modelled clock only counts the steps' own time.
    times = [e.time_s if e.host_s is None else e.host_s for e in steps_of(collected)]
    assert max(b - a for a, b in zip(times, times[1:])) >= 2.5

    # A new learning rate mid-run reaches the ranks and shows in their step events.
    assert w.lr_box.isEnabled()
    w.lr_box.setValue(0.0005)
    qtbot.waitUntil(lambda: any(abs(e.lr - 0.0005) < 1e-12 for e in steps_of(collected)), timeout=60_000)
    lrs = [e.lr for e in steps_of(collected)]
    first_new = next(i for i, lr in enumerate(lrs) if abs(lr - 0.0005) < 1e-12)
    assert all(abs(lr - 0.01) < 1e-12 for lr in lrs[:first_new])
    assert all(abs(lr - 0.0005) < 1e-12 for lr in lrs[first_new:])

    pids = w.controller.pids()
    assert len(pids) == (DEVICES if MODE in ("ddp", "fsdp") else 1)
    # Ranks run nicer than the window, so a small machine's CPU still draws the window.
    assert all(psutil.Process(p).nice() >= 5 for p in pids)
    w.stop_run()
    qtbot.waitUntil(lambda: not w.controller.running, timeout=60_000)
    assert w.controller.last_end.status == "stopped"
    assert not w.banner.isVisible()
    assert alive(pids) == []
    assert w.start_action.isEnabled() and panel.form.isEnabled()

    # Exports: the run's events as JSONL and CSV, the plots as PNG.
    assert w.export_events(tmp_path / "events.jsonl", "jsonl")
    events = list(read_events(tmp_path / "events.jsonl"))
    assert isinstance(events[-1], RunEnded) and events[-1].status == "stopped"
    assert len([e for e in events if isinstance(e, StepDone)]) == len(steps_of(collected))
    assert w.export_events(tmp_path / "events.csv", "csv")
    with open(tmp_path / "events.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r for r in rows if r["event"] == "step"][0]["loss"]
    assert any(r["event"] == "memory" and int(r["params"]) > 0 for r in rows)
    assert w.export_png(tmp_path / "plots.png")
    assert (tmp_path / "plots.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bad_input_shows_its_sentence_and_disables_start(window):
    w, panel = window, window.panel
    fill(panel, mode="ddp", devices=2)
    assert w.start_action.isEnabled()

    panel._spins["train.batch_size"].setValue(3)
    assert "batch size 3 does not split over 2 devices; use a multiple of 2" in panel.problems()
    assert panel.problems_label.isVisible() and "batch size 3" in panel.problems_label.text()
    assert not w.start_action.isEnabled()
    assert w.start_run() is False and not w.controller.running

    panel._spins["train.batch_size"].setValue(8)
    panel.memory.setText("lots")
    assert panel.config() is None
    assert any("memory size" in p for p in panel.problems())
    assert panel.memory.property("problem") is True
    assert not w.start_action.isEnabled()

    panel.memory.setText("24GiB")
    assert panel.problems() == [] and panel.memory.property("problem") is False
    assert w.start_action.isEnabled()


def test_config_files_and_themes(window, tmp_path):
    w, panel = window, window.panel
    fill(panel, mode="ddp", devices=2, batch=16, steps=7)
    assert w.save_config(tmp_path / "run.toml")
    saved = panel.config()
    fill(panel, mode="ddp", devices=2, batch=8, steps=9)
    assert panel.config() != saved
    assert w.open_config(tmp_path / "run.toml")
    assert panel.config() == saved == RunConfig.load(tmp_path / "run.toml")

    (tmp_path / "bad.toml").write_text("mode = 'ddp'\n[train]\nsteps = 'many'\n")
    assert not w.open_config(tmp_path / "bad.toml")
    assert w.banner.text() == "Bad config: train.steps must be a whole number, not 'many'"
    assert panel.config() == saved  # the form keeps what it had
    w.banner.findChild(QPushButton, "bannerDismiss").click()
    assert not w.banner.isVisible()

    w.apply_theme("dark")
    assert is_dark(QApplication.palette()) and w.settings.value("theme") == "dark"
    assert "QFrame#banner" in QApplication.instance().styleSheet()
    w.apply_theme("light")
    assert not is_dark(QApplication.palette())


def test_placement_table_moves_layers_between_devices(window):
    panel = window.panel
    fill(panel, mode="model-parallel", devices=2, depth=2)  # mlp: 4 layers
    assert panel.placement_box.isVisible() and panel.placement.rowCount() == 4
    owners = [panel.placement.cellWidget(r, 1).currentText() for r in range(4)]
    assert owners == ["sim0", "sim0", "sim1", "sim1"]
    panel.placement.cellWidget(1, 1).setCurrentIndex(1)  # layer 1 to sim1: layers stay consecutive
    assert panel.config().placement.split == (1, 3)
    panel.placement.cellWidget(3, 1).setCurrentIndex(0)  # everything on sim0 leaves sim1 empty
    assert panel.config().placement.split == (4, 0)
    assert "“Which device holds which layers” must give every device at least one layer" in panel.problems()
    panel.even_split.click()
    assert panel.config().placement.split == () and panel.problems() == []


def test_start_is_disabled_with_the_reason_when_a_device_cannot_hold_the_state(window):
    w, panel = window, window.panel
    # An MLP of width 512 has about 2 MiB of parameters alone: 1 MiB cannot hold it.
    fill(panel, memory="1MiB", width=512, depth=1, steps=20)
    assert not w.start_action.isEnabled() and not w.start_run()
    assert any("sim0 cannot hold this run" in p and "“Capacity each”" in p for p in panel.problems()), panel.problems()
    assert panel.problems_label.isVisible()
    fill(panel, memory="64MiB", width=512, depth=1, steps=20)
    assert w.start_action.isEnabled() and panel.problems() == []


def test_out_of_memory_shows_the_banner_and_the_next_run_works(window, qtbot, no_leftover_ranks):
    w, panel = window, window.panel
    # A small MLP's state fits in 1 MiB, the activations of a 4096-sample batch do not.
    fill(panel, memory="1MiB", width=16, depth=1, batch=4096, steps=20)
    qtbot.waitUntil(lambda: panel.estimate is not None, timeout=60_000)
    assert not panel.estimate.fits and panel.prediction.warning.isVisible()
    assert "sim0" in panel.prediction.warning.text()

    assert w.start_run()
    qtbot.waitUntil(lambda: not w.controller.running, timeout=START_S * 1000)
    end = w.controller.last_end
    assert end.status == "oom" and end.device is not None
    label = f"sim{end.device}"
    assert w.banner.isVisible()
    assert w.banner.text().startswith(f"Out of memory on {label}: ")
    assert label in w.banner.text() and end.message in w.banner.text()

    fill(panel, memory="24GiB", width=16, depth=1, steps=5)
    assert w.start_run()
    assert not w.banner.isVisible()
    qtbot.waitUntil(lambda: not w.controller.running, timeout=START_S * 1000)
    assert w.controller.last_end.status == "ok"
    assert w.data.last_step is not None and w.data.last_step.step == 5
    assert not w.banner.isVisible()


def test_closing_the_window_mid_run_ends_every_rank(window, qtbot, no_leftover_ranks):
    w = window
    fill(w.panel)
    assert w.start_run()
    qtbot.waitUntil(lambda: w.data.last_step is not None, timeout=START_S * 1000)
    pids = w.controller.pids()
    assert pids and alive(pids) == pids
    w.close()
    qtbot.waitUntil(lambda: not w.isVisible(), timeout=60_000)
    assert not w.controller.running
    assert alive(pids) == []


def _ranks_of(proc: psutil.Process) -> list[int]:
    """Rank processes of an app: the children of its multiprocessing forkserver."""
    out = []
    for child in proc.children():
        try:
            if "forkserver" in " ".join(child.cmdline()):
                out += [p.pid for p in child.children()]
        except psutil.Error:
            pass
    return out


def test_paralab_gui_start_then_sigterm_stops_the_run(tmp_path):
    env = {**os.environ, "QT_QPA_PLATFORM": "offscreen", "XDG_CONFIG_HOME": str(tmp_path)}
    cmd = [sys.executable, "-m", "paralab.gui.entry", "gui", "--start",
           "--set", f"mode={MODE}", "--set", f"devices=sim:{DEVICES}", "--set", "model.width=16",
           "--set", "model.depth=1", "--set", "train.batch_size=8", "--set", "train.steps=1000000"]
    proc = subprocess.Popen(cmd, env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        app = psutil.Process(proc.pid)
        deadline = time.time() + START_S
        ranks: list[int] = []
        while time.time() < deadline and proc.poll() is None:
            ranks = _ranks_of(app)
            if ranks:
                break
            time.sleep(0.2)
        assert ranks, f"no rank started; output: {proc.stdout.read().decode() if proc.poll() is not None else ''}"
        time.sleep(2)
        proc.send_signal(signal.SIGTERM)  # closes the window as its close button does
        assert proc.wait(timeout=90) == 128 + signal.SIGTERM
        deadline = time.time() + 10
        while alive(ranks) and time.time() < deadline:
            time.sleep(0.1)
        assert alive(ranks) == []
        # Closing mid-run once printed a FileNotFoundError traceback in the terminal.
        output = proc.stdout.read().decode(errors="replace")
        assert "Traceback" not in output and "FileNotFoundError" not in output, output
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_bare_paralab_opens_the_app(tmp_path):
    """`paralab` without a subcommand has none of the gui command's arguments."""
    env = {**os.environ, "QT_QPA_PLATFORM": "offscreen", "XDG_CONFIG_HOME": str(tmp_path)}
    proc = subprocess.Popen([sys.executable, "-m", "paralab.gui.entry"], env=env, cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    settings = Path(tmp_path, "paralab", "paralab.conf")
    try:
        # The window writes its theme to the settings once it is up: then it can take a signal.
        deadline = time.time() + START_S
        while not settings.exists() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.2)
        assert proc.poll() is None, proc.stdout.read().decode()
        assert settings.exists()
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=60) == 128 + signal.SIGINT
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert "config=" in settings.read_text()  # closing remembers the config (and the geometry)
