"""Lesson mode: a dock that walks through a lesson (core/lessons.py) step by step.

Each step puts its settings in the form, hides the controls it is not about, outlines
what to look at (a view of the dashboard, a device's gauge) and asks a question whose
answer shows on demand.  The person presses Start as usual; while a run goes the lesson
stays on its step (the form is the run's until it ends).
"""

from __future__ import annotations

import html
from typing import TYPE_CHECKING

from PySide6.QtCore import QEvent, QObject, QRectF, Qt, Signal
from PySide6.QtGui import QPainter, QPen
from PySide6.QtWidgets import (
    QDockWidget,
    QHBoxLayout,
    QLabel,
    QPushButton,
    QScrollArea,
    QToolButton,
    QVBoxLayout,
    QWidget,
)

from ..core import lessons
from ..core.config import ConfigError
from ..core.lessons import Lesson, Step

if TYPE_CHECKING:
    from .main_window import MainWindow

VIEW_WORDS = {"gauges": "the memory gauges", "loss": "the loss plot", "rate": "the samples/s plot",
              "utilization": "the utilization plot", "memory": "the memory plots", "timeline": "the timeline"}


class Spotlight(QWidget):
    """An outline drawn over a widget (or over one plot inside a pyqtgraph view); it lets
    the mouse through and follows the widget's size."""

    def __init__(self, target: QWidget, item: object | None = None) -> None:
        super().__init__(target)
        self.item = item
        self.setAttribute(Qt.WidgetAttribute.WA_TransparentForMouseEvents)
        target.installEventFilter(self)
        self.setGeometry(target.rect())
        self.show()
        self.raise_()

    def eventFilter(self, obj: QObject, event: QEvent) -> bool:  # noqa: N802 (Qt's name)
        if event.type() == QEvent.Type.Resize:
            self.setGeometry(obj.rect())
        return False

    def area(self) -> QRectF:
        if self.item is None:
            return QRectF(self.rect())
        # A plot inside a GraphicsLayoutWidget: its rectangle in the view, wherever the layout put it.
        return QRectF(self.parentWidget().mapFromScene(self.item.sceneBoundingRect()).boundingRect())

    def paintEvent(self, event) -> None:  # noqa: N802 (Qt's name)
        p = QPainter(self)
        p.setRenderHint(QPainter.RenderHint.Antialiasing)
        p.setPen(QPen(self.palette().highlight().color(), 3))
        p.drawRoundedRect(self.area().adjusted(2, 2, -2, -2), 6, 6)
        p.end()


class LessonPanel(QWidget):
    """The step's text, progress, question and answer, Previous and Next."""

    step_shown = Signal(int)
    finished = Signal()

    def __init__(self, start_button: QToolButton | None = None, parent: QWidget | None = None) -> None:
        super().__init__(parent, objectName="lessonPanel")
        self.lesson: Lesson | None = None
        self.index = 0
        self._busy = False
        self.title = QLabel(objectName="lessonTitle", wordWrap=True)
        self.progress = QLabel(objectName="lessonProgress")
        self.text = QLabel(wordWrap=True, objectName="lessonText")
        self.look = QLabel(wordWrap=True, objectName="lessonLook")
        self.question = QLabel(wordWrap=True, objectName="lessonQuestion")
        self.answer = QLabel(wordWrap=True, objectName="lessonAnswer")
        for label in (self.text, self.look, self.question, self.answer):
            label.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        self.reveal_button = QPushButton("Show answer")
        self.reveal_button.clicked.connect(self.reveal)
        self.previous_button = QPushButton("◀ Previous")
        self.previous_button.clicked.connect(self.previous)
        self.next_button = QPushButton("Next ▶")
        self.next_button.clicked.connect(self.next)
        self.busy_note = QLabel("The lesson moves on when the run ends (Stop ends it now).", wordWrap=True)
        self.busy_note.hide()
        self._build(start_button)

    def _build(self, start_button: QToolButton | None) -> None:
        body = QWidget()
        v = QVBoxLayout(body)
        for w in (self.title, self.progress, self.text, self.look):
            v.addWidget(w)
        if start_button is not None:
            v.addWidget(start_button, alignment=Qt.AlignmentFlag.AlignLeft)
        v.addSpacing(8)
        v.addWidget(self.question)
        v.addWidget(self.reveal_button, alignment=Qt.AlignmentFlag.AlignLeft)
        v.addWidget(self.answer)
        v.addStretch(1)
        scroll = QScrollArea()
        scroll.setWidgetResizable(True)
        scroll.setFrameShape(QScrollArea.Shape.NoFrame)
        scroll.setHorizontalScrollBarPolicy(Qt.ScrollBarPolicy.ScrollBarAlwaysOff)
        scroll.setWidget(body)
        row = QHBoxLayout()
        row.addWidget(self.previous_button)
        row.addWidget(self.next_button)
        outer = QVBoxLayout(self)
        outer.setContentsMargins(4, 4, 4, 4)
        outer.addWidget(scroll, 1)
        outer.addWidget(self.busy_note)
        outer.addLayout(row)

    @property
    def step(self) -> Step | None:
        return self.lesson.steps[self.index] if self.lesson else None

    def open(self, lesson: Lesson, step: int = 0) -> None:
        self.lesson = lesson
        self.title.setText(f"<b>{html.escape(lesson.title)}</b>")
        self.go(step)

    def go(self, index: int) -> None:
        assert self.lesson is not None
        self.index = max(0, min(index, len(self.lesson.steps) - 1))
        step = self.lesson.steps[self.index]
        n = len(self.lesson.steps)
        self.progress.setText(f"Step {self.index + 1} of {n}")
        self.text.setText(_paragraphs(step.text))
        self.look.setText(_look_text(step))
        self.look.setVisible(bool(step.look or step.device is not None))
        self.question.setText(f"<b>Question.</b> {html.escape(step.question)}")
        self.question.setVisible(bool(step.question))
        self.answer.setText(_paragraphs(step.answer))
        self.answer.hide()
        self.reveal_button.setVisible(bool(step.question))
        self.reveal_button.setEnabled(True)
        self.previous_button.setEnabled(self.index > 0 and not self._busy)
        self.next_button.setText("Finish" if self.index == n - 1 else "Next ▶")
        self.step_shown.emit(self.index)

    def next(self) -> None:
        if self.lesson is None:
            return
        if self.index == len(self.lesson.steps) - 1:
            self.finished.emit()
        else:
            self.go(self.index + 1)

    def previous(self) -> None:
        if self.lesson is not None and self.index > 0:
            self.go(self.index - 1)

    def reveal(self) -> None:
        self.answer.show()
        self.reveal_button.setEnabled(False)

    def set_busy(self, busy: bool) -> None:
        """While a run goes its settings stay in the form: the lesson waits on its step."""
        self._busy = busy
        self.busy_note.setVisible(busy)
        self.next_button.setEnabled(not busy)
        self.previous_button.setEnabled(not busy and self.index > 0)


class LessonMode(QObject):
    """Wires a LessonPanel into the main window: the Lessons menu, the dock, and what
    each step does to the form and the dashboard."""

    def __init__(self, window: MainWindow) -> None:
        super().__init__(window)
        self.window = window
        start = QToolButton()
        start.setDefaultAction(window.start_action)
        start.setToolButtonStyle(Qt.ToolButtonStyle.ToolButtonTextOnly)
        self.panel = LessonPanel(start)
        self.panel.step_shown.connect(self._apply)
        self.panel.finished.connect(self.leave)
        self.dock = QDockWidget("Lesson")
        self.dock.setObjectName("lessonDock")
        self.dock.setFeatures(QDockWidget.DockWidgetFeature.DockWidgetMovable
                              | QDockWidget.DockWidgetFeature.DockWidgetFloatable)
        self.dock.setWidget(self.panel)
        self.dock.setMinimumWidth(300)
        window.addDockWidget(Qt.DockWidgetArea.RightDockWidgetArea, self.dock)
        self.dock.hide()
        self._spots: list[Spotlight] = []
        self._build_menu()
        window.welcome.lesson_chosen.connect(self.open)

    def _build_menu(self) -> None:
        self.menu = self.window.menuBar().addMenu("&Lessons")
        for name, title, summary in lessons.catalog():
            action = self.menu.addAction(title)
            action.setStatusTip(summary)
            action.triggered.connect(lambda _=False, n=name: self.open(n))
        self.menu.addSeparator()
        self.leave_action = self.menu.addAction("Leave the lesson")
        self.leave_action.triggered.connect(self.leave)
        self.leave_action.setEnabled(False)

    @property
    def active(self) -> bool:
        return self.panel.lesson is not None

    def open(self, lesson: str | Lesson, step: int = 0) -> bool:
        """Start a lesson at a step (0: its first); a broken lesson file becomes the banner's sentence."""
        try:
            chosen = lessons.load(lesson) if isinstance(lesson, str) else lesson
        except ConfigError as e:
            self.window.banner.show_message(f"Bad lesson: {e}")
            return False
        self.dock.show()
        self.dock.raise_()
        self.leave_action.setEnabled(True)
        self.panel.open(chosen, step)
        return True

    def position(self) -> tuple[str, int] | None:
        """(lesson name, step index) while a lesson is open: what a saved session would keep."""
        return (self.panel.lesson.name, self.panel.index) if self.panel.lesson else None

    def leave(self) -> None:
        """Back to the free form: every control shown, nothing outlined, the dock closed."""
        self.panel.lesson = None
        self.window.panel.set_hidden(frozenset())
        self._spotlight("", None)
        self.dock.hide()
        self.leave_action.setEnabled(False)

    def set_busy(self, busy: bool) -> None:
        self.panel.set_busy(busy)
        self.menu.setEnabled(not busy)

    def _apply(self, _index: int) -> None:
        step = self.panel.step
        if step is None:
            return
        self.window.panel.set_config(step.config)
        self.window.panel.set_hidden(step.hidden)
        self.window.show_dashboard()
        self._spotlight(step.look, step.device)

    def _spotlight(self, look: str, device: int | None) -> None:
        for spot in self._spots:
            spot.parentWidget().removeEventFilter(spot)
            spot.deleteLater()
        self._spots = []
        d = self.window.dashboard
        # The gauges, not their legend below: an outline drawn across it hid the words.
        targets = {"gauges": (d.devices.scroll, None), "timeline": (d.timeline_scroll, None),
                   "memory": (d.mem_pages, None), "loss": (d.plots, d.loss_plot),
                   "rate": (d.plots, d.rate_plot), "utilization": (d.plots, d.util_plot)}
        if look in targets:
            self._spots.append(Spotlight(*targets[look]))
        d.devices.set_highlight(device)


def _paragraphs(text: str) -> str:
    return "".join(f"<p>{html.escape(p)}</p>" for p in text.split("\n\n") if p)


def _look_text(step: Step) -> str:
    labels = _labels(step)
    device = "" if step.device is None else (labels[step.device] if step.device < len(labels) else str(step.device))
    if step.look == "gauges" and device:
        return f"<b>Look at:</b> {device}'s memory gauge (outlined)"
    parts = [f"{VIEW_WORDS[step.look]} (outlined)"] if step.look else []
    if device:
        parts.append(f"{device}'s memory gauge")
    return "<b>Look at:</b> " + ", and ".join(parts)


def _labels(step: Step) -> list[str]:
    from ..core import devices

    try:
        return [d.label for d in devices.resolve(step.config.devices, step.config.sim.memory)]
    except ConfigError:
        return []
