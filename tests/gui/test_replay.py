"""Replay: a recorded run played back ends with the same plotted data as the live run, and
its controls (pause, scrub back, faster) drive the same views."""

import numpy as np
import pytest
from paralab.core.config import RunConfig
from paralab.gui.replay import Replay, event_times

pytestmark = pytest.mark.slow
START_S = 120
SMALL = RunConfig().with_overrides({"mode": "ddp", "devices": "sim:2", "model.width": 16, "model.depth": 1,
                                    "train.steps": 12, "train.batch_size": 8, "train.optimizer": "sgd"})


def snapshot(data) -> dict:
    """Every array and figure the views draw from."""
    out = {"steps": np.array([data.steps.column(i) for i in range(6)]),
           "marks": list(data.marks), "labels": data.labels, "end": data.end, "last": data.last_step,
           "rate": (data.smoothed_rate, data.average_rate)}
    for d in data.devices:
        for name in ("memory", "utilization", "spans", "other_spans", "other_utilization"):
            ring = getattr(d, name)
            out[f"{d.label}.{name}"] = ring.columns(0, ring._buf.shape[0]).copy()
        out[f"{d.label}.peak"] = (d.peak_bytes, d.capacity_bytes, d.last)
    return out


def assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        if isinstance(a[key], np.ndarray):
            np.testing.assert_array_equal(a[key], b[key], err_msg=key)
        else:
            assert a[key] == b[key], key


def test_replay_ends_with_the_live_runs_plotted_data(window, qtbot, no_leftover_ranks):
    w = window
    w.panel.set_config(SMALL)
    assert w.start_run()
    qtbot.waitUntil(lambda: not w.controller.running, timeout=START_S * 1000)
    assert w.controller.last_end.status == "ok"
    live = snapshot(w.data)
    assert len(live["steps"][0]) == 12 and live["sim0.memory"].size

    assert w.open_run(w.controller.metrics_path, speed=1024)
    assert w.replay_bar.isVisible() and w.state_label.text() == "Replaying a recording"
    qtbot.waitUntil(lambda: w.replay.at_end, timeout=30_000)
    assert_same(live, snapshot(w.data))
    assert w.step_label.text() == "step 12/12"

    # Scrub back to the middle: the views hold only what had happened by then.
    replay = w.replay
    replay.pause()
    middle = replay.times[len(replay.times) // 2]
    replay.seek(middle)
    assert 0 < w.data.last_step.step < 12
    assert all(t <= middle for t in w.data.steps.column(1))
    # Play on to the end: the same data again.
    replay.set_speed(1024)
    replay.play()
    qtbot.waitUntil(lambda: replay.at_end, timeout=30_000)
    assert_same(live, snapshot(w.data))
    w.close_replay()
    assert not w.replay_bar.isVisible() and w.replay is None
    # The live run and its recording are two runs of the session; opening it again adds none.
    assert [r.title.split()[0] for r in w.session_runs] == ["#1", "recording"]
    assert w.open_run(w.controller.metrics_path, speed=1024)
    assert len(w.session_runs) == 2
    w.close_replay()


def test_bad_recordings_are_a_banner(window, tmp_path):
    notes = tmp_path / "notes.jsonl"
    notes.write_text("not json\n")
    assert not window.open_run(notes)
    assert "not a paralab events file" in window.banner.text()
    assert not window.open_run(tmp_path / "missing.jsonl")
    assert "does not exist" in window.banner.text()


def test_event_times_never_go_back_and_speed_scales_the_clock(qtbot):
    from paralab.core.events import MemorySample, PhaseSpan, RunEnded, RunStarted, StepDone

    events = [StepDone(1, 1.0, 0.001, 10.0, host_s=2.0), PhaseSpan(0, "forward", 0.0, 0.0005, 1, "modelled"),
              MemorySample(1, 0, {}, 0, 0, 1.9), StepDone(2, 0.5, 0.002, 10.0, host_s=3.0), RunEnded("ok", time_s=3.5)]
    assert event_times(events) == [2.0, 2.0, 2.0, 3.0, 3.5]
    replay = Replay([RunStarted("single", [], {}), *events], speed=4)
    got = []
    replay.events.connect(got.extend)
    replay.seek(2.5)
    assert [type(e).__name__ for e in got] == ["StepDone", "PhaseSpan", "MemorySample"]
    replay.play()
    qtbot.waitUntil(lambda: replay.at_end, timeout=10_000)
    assert got == events


@pytest.mark.parametrize("args, words", [
    (["nope.jsonl"], "nope.jsonl does not exist"),
    (["{notes}"], "is not a paralab events file"),
    (["{notes}", "--speed", "0"], "--speed must be more than 0"),
    ([], "the following arguments are required"),
])
def test_paralab_replay_bad_input_exits_2_before_any_window(tmp_path, capsys, monkeypatch, args, words):
    from paralab.gui import app, entry

    monkeypatch.setattr(app, "main", lambda *a, **k: pytest.fail("the app opened"))
    notes = tmp_path / "notes.txt"
    notes.write_text("hello\n")
    assert entry.main(["replay", *(a.format(notes=notes) for a in args)]) == 2
    err = capsys.readouterr().err
    assert words in err and "Traceback" not in err


def test_a_gpu_workstations_recording_plays_on_a_machine_without_gpus(window, qtbot):
    """Recorded on cuda:0,1 (NVML utilization, reserved memory), shown here without a GPU:
    the views fill with the recorded devices."""
    from paralab.core.events import MemorySample, RunEnded, RunStarted, StepDone, UtilizationSample

    cfg = RunConfig().with_overrides({"mode": "ddp", "devices": "cuda:0,1", "train.steps": 3})
    gpus = [{"index": i, "label": f"cuda:{i}", "kind": "cuda", "capacity_bytes": 80 * 2**30} for i in (0, 1)]
    events = [RunStarted("ddp", gpus, cfg.to_dict(), 2)]
    for s in (1, 2, 3):
        events.append(StepDone(s, 1.0 / s, 0.1 * s, 1000.0))
        for d in (0, 1):
            events.append(MemorySample(s, d, {"params": 2**30, "activations": s * 2**28}, 2**31, 80 * 2**30, 0.1 * s,
                                       extra={"reserved": 3 * 2**30, "non_torch": 500 * 2**20}))
            events.append(UtilizationSample(d, 90.0, 0.1 * s, "nvml"))
    events.append(RunEnded("ok", "finished 3 steps", None, 0.35, 3))
    assert window.open_run(events, speed=1024, name="workstation.jsonl")
    qtbot.waitUntil(lambda: window.replay.at_end, timeout=10_000)
    assert window.data.labels == ["cuda:0", "cuda:1"] and len(window.data.steps) == 3
    assert window.data.devices[1].util_source == "nvml"
    assert window.panel.config().mode == "ddp"  # the recorded settings (GPUs the form cannot offer here)


def test_scrubbing_the_slider_shows_the_run_as_it_was_then(qtbot):
    from paralab.core.events import RunEnded, RunStarted, StepDone
    from paralab.gui.buffers import RunData
    from paralab.gui.replay import ReplayBar

    events = [RunStarted("single", [], {}), *(StepDone(s, 1.0 / s, 0.1 * s, 10.0, host_s=0.1 * s) for s in range(1, 41)),
              RunEnded("ok", time_s=4.05)]
    data = RunData()
    replay = Replay(events, speed=1)
    replay.started.connect(data.reset)
    replay.events.connect(data.add)
    starts = []
    replay.started.connect(starts.append)
    bar = ReplayBar()
    qtbot.addWidget(bar)
    bar.bind(replay)
    replay.play()
    bar.toggle()  # pause
    assert not replay.playing and bar.play_button.text() == "Play"
    for value in (4000, 3000, 2000, 1000):  # a drag backwards: only the last position counts
        bar._scrub(value)
    qtbot.waitUntil(lambda: data.last_step is not None and data.last_step.step == 10, timeout=5000)
    assert len(data.steps) == 10 and data.end is None
    assert len(starts) == 1  # one seek, forward: the drag's earlier positions were never replayed
    bar._scrub(4050)
    qtbot.waitUntil(lambda: data.end is not None, timeout=5000)
    assert len(data.steps) == 40 and bar.play_button.text() == "Play again"
