"""Session files in the app: Save session keeps the form (seed included) and the run on
screen; Open session (and `paralab open`) restores both."""

import pytest
from paralab.core.config import RunConfig

from tests.helpers import ended, run_events

pytestmark = pytest.mark.slow
RECORDED = RunConfig().with_overrides({"mode": "single", "devices": "sim:1", "model.width": 16, "model.depth": 1,
                                       "train.steps": 6, "train.batch_size": 8})


def test_save_then_open_restores_the_config_and_the_recorded_run(window, qtbot, tmp_path, monkeypatch):
    from paralab.gui import app, entry

    w = window
    events = run_events(RECORDED)
    assert ended(events).status == "ok"
    assert w.open_run(events, speed=1024)
    qtbot.waitUntil(lambda: w.replay.at_end, timeout=30_000)
    changed = RECORDED.with_overrides({"seed": 42, "train.steps": 9})  # a change after the run
    w.panel.set_config(changed)
    path = tmp_path / "lesson.json"
    assert w.save_session(path)

    # Somewhere else: another preset, no recording; opening the session brings both back.
    w.close_replay()
    w.load_preset("seed-model-parallel")
    assert w.panel.config() != changed
    assert w.open_session(path)
    assert w.panel.config() == changed and w.panel.config().seed == 42
    assert w.replay is not None and w.replay.at_end and w.replay_bar.isVisible()
    assert w.data.last_step.step == 6 and w.data.end.status == "ok"

    # Settings alone: no recording is shown.
    w.close_replay()
    assert w.save_session(tmp_path / "settings.json", with_run=False)
    assert w.open_session(tmp_path / "settings.json") and w.replay is None

    # `paralab open FILE` checks the file, then opens the app with it.
    called = {}
    monkeypatch.setattr(app, "main", lambda cfg, **kw: called.update(kw) or 0)
    assert entry.main(["open", str(path)]) == 0 and called["session"] == str(path)


def test_bad_session_is_a_banner_and_paralab_open_exits_2(window, tmp_path, capsys, monkeypatch):
    from paralab.gui import app, entry

    bad = tmp_path / "bad.json"
    bad.write_text("{}")
    assert not window.open_session(bad)
    assert "is not a paralab session" in window.banner.text()
    monkeypatch.setattr(app, "main", lambda *a, **k: pytest.fail("the app opened"))
    assert entry.main(["open", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "is not a paralab session" in err and "Traceback" not in err


def test_a_session_saved_in_a_lesson_opens_at_that_step(window, tmp_path):
    w = window
    assert w.lessons.open("pipeline-bubble", 2)
    path = tmp_path / "class.json"
    assert w.save_session(path, with_run=False)
    w.load_preset("mlp-ddp")  # leaves the lesson
    assert w.lessons.position() is None
    assert w.open_session(path)
    assert w.lessons.position() == ("pipeline-bubble", 2)
