"""Compare in the app: two runs of a session side by side, the previous run as a ghost, and
`paralab compare --png` drawing the same view off screen."""

import numpy as np
import pytest
from paralab.core.config import RunConfig

pytestmark = pytest.mark.slow
START_S = 120
DDP = RunConfig().with_overrides({"mode": "ddp", "devices": "sim:2", "model.width": 16, "model.depth": 2,
                                  "train.steps": 8, "train.batch_size": 8, "train.optimizer": "sgd"})


def finish(w, qtbot, **kw):
    assert w.start_run(**kw)
    qtbot.waitUntil(lambda: not w.controller.running, timeout=START_S * 1000)
    assert w.controller.last_end.status == "ok"


def test_two_runs_compared_and_the_first_kept_as_a_ghost(window, qtbot, tmp_path, no_leftover_ranks):
    from paralab.gui import entry

    w = window
    w.panel.set_config(DDP)
    assert not w.again_action.isEnabled() and not w.compare_action.isEnabled()
    finish(w, qtbot)
    first_loss = w.data.steps.column(2).copy()
    first_total = w.data.devices[0].memory.column(6).copy()  # MiB: the categories' running sum
    first_peak = w.data.devices[0].peak_bytes / 2**20
    first_path = w.controller.metrics_path

    # Run again with one change: the first run's loss stays behind the second as a ghost.
    w.panel.set_config(DDP.with_overrides({"mode": "fsdp"}))
    assert w.again_action.isEnabled()
    w.again_action.trigger()
    qtbot.waitUntil(lambda: not w.controller.running, timeout=START_S * 1000)
    assert w.controller.last_end.status == "ok"
    ghost = w.dashboard.ghost_curves["loss"]
    np.testing.assert_array_equal(ghost.yData, first_loss)
    assert w.dashboard.ghost_title == "ddp on sim:2, 8 steps, ok" and w.dashboard.ghost_legend.isVisible()
    # ...and each device's peak as a dashed line: FSDP's memory lies well under DDP's.
    memory_ghost = w.dashboard.mem_plots[0].ghost
    assert memory_ghost.isVisible() and memory_ghost.value() == first_peak
    assert w.data.devices[0].memory.column(6).max() < 0.8 * first_total.max()
    # The two modes train alike: the new curve lies on its ghost.
    np.testing.assert_allclose(w.data.steps.column(2), first_loss, rtol=1e-4)

    assert w.compare_action.isEnabled() and len(w.session_runs) == 2
    assert w.open_compare()
    view = w.compare_dialog.view
    assert [r.start.mode for r in view.runs] == ["ddp", "fsdp"]
    assert "B: mode fsdp instead of ddp" in view.summary.text()
    for run, curve in zip(view.runs, view.loss_curves):
        np.testing.assert_array_equal(curve.yData, run.losses)
    assert not view.loss_curves[2].isVisible()
    # Four bars per category (2 runs x 2 devices); FSDP's parameters are half DDP's.
    params = view.memory_bars["params"].opts["height"]
    assert len(params) == 4 and params[2] < 0.6 * params[0]
    assert all(h > 0 for h in view.rate_bars.opts["height"])
    # One step's timeline each: forward spans on all four rows (2 runs x 2 devices).
    assert sorted(set(view.phase_bars["forward"].opts["y0"] + 0.4)) == [0, 1, 2, 3]

    # Untick one: fewer than two runs is a hint, not a comparison.
    w.compare_dialog.list.item(0).setCheckState(w.compare_dialog.list.item(0).checkState().Unchecked)
    assert "Tick 2 to 4 runs" in w.compare_dialog.hint.text()

    # The same two events files, headless: a PNG.
    png = tmp_path / "compare.png"
    assert entry.main(["compare", str(first_path), str(w.controller.metrics_path), "--png", str(png)]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 20_000

    # A plain Start drops the ghost.
    finish(w, qtbot)
    assert ghost.yData is None or len(ghost.yData) == 0
    assert not w.dashboard.ghost_legend.isVisible()
    assert not memory_ghost.isVisible()
    assert len(w.session_runs) == 3


def test_paralab_compare_png_without_a_display(tmp_path):
    """The console script draws the PNG off screen on a machine with no display at all."""
    import os
    import subprocess
    import sys

    from paralab.core.events import EventWriter, MemorySample, RunEnded, RunStarted, StepDone

    files = []
    for i, mode in enumerate(("ddp", "fsdp")):
        cfg = DDP.with_overrides({"mode": mode})
        path = tmp_path / f"{mode}.jsonl"
        writer = EventWriter(path)
        writer.write([RunStarted(mode, [{"index": 0, "label": "sim0"}], cfg.to_dict()),
                      StepDone(1, 1.0, 0.1, 80.0, host_s=0.1),
                      MemorySample(1, 0, {"params": 1000 * (2 - i), "activations": 500}, 1500 + 1000 * (1 - i), 10**9),
                      StepDone(2, 0.5, 0.2, 80.0, host_s=0.2), RunEnded("ok", time_s=0.3)])
        writer.close()
        files.append(str(path))
    env = {k: v for k, v in os.environ.items() if k not in ("DISPLAY", "WAYLAND_DISPLAY", "QT_QPA_PLATFORM")}
    png = tmp_path / "out.png"
    code = "import sys; from paralab.gui.entry import main; sys.exit(main())"
    done = subprocess.run([sys.executable, "-c", code, "compare", *files, "--png", str(png)], env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "B: mode fsdp instead of ddp" in done.stdout
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert done.stderr.strip().splitlines() == [f"paralab: comparison drawn in {png}"]
