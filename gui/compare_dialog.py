"""The runs of a session, and the dialog that compares two to four of them.

Every finished run (and every recording opened) joins the session as a `SessionRun`: its
events stay on disk (the controller keeps the last KEEP_RUNS files) or in memory (a
recording), and its figures are read only when a comparison asks for them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from PySide6.QtCore import Qt
from PySide6.QtWidgets import (
    QDialog,
    QHBoxLayout,
    QLabel,
    QListWidget,
    QListWidgetItem,
    QVBoxLayout,
    QWidget,
)

from ..core.compare import (
    LETTERS,
    MAX_RUNS,
    MIN_RUNS,
    CompareError,
    RunSummary,
    read_file,
    summarize,
)
from .compare_view import CompareView


@dataclass
class SessionRun:
    title: str
    """How the list names it: '#2 fsdp on sim:2, ok'."""
    path: Path | None = None
    events: list | None = None
    _summary: RunSummary | None = field(default=None, repr=False)

    def available(self) -> bool:
        return self.events is not None or (self.path is not None and self.path.exists())

    def all_events(self) -> list:
        return self.events if self.events is not None else read_file(self.path)

    def summary(self, name: str) -> RunSummary:
        """Its figures as run `name` (A, B…); read once, renamed afterwards."""
        if self._summary is None:
            self._summary = summarize(self.all_events(), name, self.title)
        self._summary.name = name
        return self._summary


class CompareDialog(QDialog):
    """Tick two to four runs of the session; the view below compares them at once."""

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.setWindowTitle("Compare runs")
        self.resize(1200, 900)
        self.runs: list[SessionRun] = []
        self.list = QListWidget()
        self.list.setMaximumHeight(120)
        self.list.itemChanged.connect(self._on_ticked)
        self.hint = QLabel("", wordWrap=True)
        self.view = CompareView()
        top = QHBoxLayout()
        top.addWidget(self.list, 1)
        top.addWidget(self.hint, 1)
        layout = QVBoxLayout(self)
        layout.addLayout(top)
        layout.addWidget(self.view, 1)

    def set_runs(self, runs: list[SessionRun], ticked: int = MAX_RUNS) -> None:
        """List the session's runs, the last `ticked` of them ticked, and compare those."""
        self.runs = [r for r in runs if r.available()]
        self.list.blockSignals(True)
        self.list.clear()
        first_ticked = max(0, len(self.runs) - ticked)
        for i, run in enumerate(self.runs):
            item = QListWidgetItem(run.title)
            item.setFlags(item.flags() | Qt.ItemFlag.ItemIsUserCheckable)
            item.setCheckState(Qt.CheckState.Checked if i >= first_ticked else Qt.CheckState.Unchecked)
            self.list.addItem(item)
        self.list.blockSignals(False)
        self._on_ticked()

    def ticked(self) -> list[SessionRun]:
        return [r for i, r in enumerate(self.runs)
                if self.list.item(i).checkState() == Qt.CheckState.Checked]

    def _on_ticked(self, _item: QListWidgetItem | None = None) -> None:
        chosen = self.ticked()
        if not MIN_RUNS <= len(chosen) <= MAX_RUNS:
            self.hint.setText(f"Tick {MIN_RUNS} to {MAX_RUNS} runs to compare them ({len(chosen)} ticked).")
            return
        try:
            summaries = [r.summary(LETTERS[i]) for i, r in enumerate(chosen)]
        except CompareError as e:
            self.hint.setText(f"Cannot compare: {e}")
            return
        self.hint.setText("Comparing " + ", ".join(f"{s.name} = {s.source}" for s in summaries))
        self.view.set_runs(summaries)
