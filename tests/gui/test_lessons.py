"""Lesson mode: a lesson walked from its first step to its end through the dock's buttons."""

from paralab.core import lessons
from paralab.gui.config_panel import FIELD_LABELS
from PySide6.QtCore import Qt

# Fields a mode shows only where they apply (the placement table, FSDP's checkbox): a
# step that shows them cannot make them appear in another mode.
MODE_BOUND = {"placement.split": ("model-parallel", "pipeline"), "placement.reshard_after_forward": ("fsdp",)}


def test_the_lessons_name_only_controls_the_form_has():
    assert set(lessons.CONTROLS) == set(FIELD_LABELS)


def shown(window, key: str) -> bool:
    return all(w.isVisible() for w in window.panel.control_widgets(key))


def test_a_lesson_walks_from_start_to_end(window, qtbot):
    lesson = lessons.load("pipeline-bubble")
    n = len(lesson.steps)
    mode = window.lessons
    assert mode.open(lesson.name)
    panel = mode.panel
    assert mode.dock.isVisible() and mode.leave_action.isEnabled()
    for i, step in enumerate(lesson.steps):
        assert panel.progress.text() == f"Step {i + 1} of {n}"
        assert window.panel.config() == step.config
        for key in lessons.CONTROLS:
            expected = key not in step.hidden and step.config.mode in MODE_BOUND.get(key, (step.config.mode,))
            assert shown(window, key) == expected, (i, key)
        outlined = {"timeline": window.dashboard.timeline_scroll, "gauges": window.dashboard.devices.scroll}[step.look]
        assert [s.parentWidget() for s in mode._spots] == [outlined]
        assert window.dashboard.devices._highlight == step.device
        assert not panel.answer.isVisible()
        qtbot.mouseClick(panel.reveal_button, Qt.MouseButton.LeftButton)
        assert panel.answer.isVisible() and panel.answer.text()
        assert not panel.reveal_button.isEnabled()
        assert panel.next_button.text() == ("Finish" if i == n - 1 else "Next ▶")
        qtbot.mouseClick(panel.next_button, Qt.MouseButton.LeftButton)
    # Finish leaves lesson mode: every control back, nothing outlined.
    assert not mode.dock.isVisible() and not mode.active
    assert all(shown(window, key) for key in ("mode", "devices", "train.batch_size", "model.kind", "seed"))
    assert mode._spots == [] and window.dashboard.devices._highlight is None


def test_previous_goes_back_and_a_run_holds_the_step(window, qtbot):
    mode = window.lessons
    mode.open("activations-batch-size")
    panel = mode.panel
    assert not panel.previous_button.isEnabled()
    qtbot.mouseClick(panel.next_button, Qt.MouseButton.LeftButton)
    assert window.panel.config().train.batch_size == 16
    assert not shown(window, "mode") and shown(window, "train.batch_size")
    qtbot.mouseClick(panel.previous_button, Qt.MouseButton.LeftButton)
    assert panel.progress.text().startswith("Step 1 of") and window.panel.config().train.batch_size == 8
    mode.set_busy(True)  # what the window does while a run goes
    assert not panel.next_button.isEnabled() and panel.busy_note.isVisible() and not mode.menu.isEnabled()
    mode.set_busy(False)
    assert panel.next_button.isEnabled()


def test_a_broken_lesson_becomes_the_banner(window, monkeypatch):
    from paralab.core.config import ConfigError

    def broken(name):
        raise ConfigError(f"lesson {name!r}, step 2: batch size 3 does not split over 2 devices; use a multiple of 2")

    monkeypatch.setattr(lessons, "load", broken)
    assert not window.lessons.open("pipeline-bubble")
    assert "Bad lesson: lesson 'pipeline-bubble', step 2" in window.banner.text()
    assert not window.lessons.dock.isVisible()


def test_the_welcome_screen_offers_the_lessons(window, qtbot):
    assert window.pages.currentWidget() is window.welcome
    assert list(window.welcome.lesson_buttons) == lessons.names()
    qtbot.mouseClick(window.welcome.lesson_buttons["model-parallel-idle-device"], Qt.MouseButton.LeftButton)
    assert window.lessons.dock.isVisible() and window.pages.currentWidget() is window.dashboard
    assert window.panel.config().mode == "model-parallel"


def test_a_preset_leaves_the_lesson_and_a_lesson_opens_at_a_step(window):
    mode = window.lessons
    assert mode.open("out-of-memory-ways-out", step=2)
    assert mode.position() == ("out-of-memory-ways-out", 2) and window.panel.config().mode == "fsdp"
    window.load_preset("mlp-ddp")
    assert mode.position() is None and not mode.dock.isVisible()
    assert shown(window, "model.kind") and window.panel.config().mode == "ddp"


def test_gui_lesson_argument_is_checked_before_any_window(capsys):
    from paralab.gui import entry

    assert entry.main(["gui", "--lesson", "nope"]) == 2
    assert "there is no lesson 'nope'; lessons: data-parallel-first-device" in capsys.readouterr().err
    assert entry.main(["gui", "--lesson", "pipeline-bubble", "--preset", "mlp-ddp"]) == 2
    assert "--lesson brings its own settings" in capsys.readouterr().err
