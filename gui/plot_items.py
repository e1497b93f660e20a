"""Small pyqtgraph items the dashboard's plots share: what an empty plot says, and the
markers of a run's events (paused, learning rate changed, ended).

Both are made once per plot and only moved, shown or hidden afterwards (plot items
leak when re-created: pyqtgraph #2665, #2672).
"""

from __future__ import annotations

import pyqtgraph as pg
from PySide6.QtCore import Qt

from .style import MARKER_COLORS


class Placeholder:
    """The sentence an empty plot shows instead of bare 0–1 axes: what will appear there.

    While it shows, the axes' values are hidden and the view is a neutral 0–1 square;
    the first data hides it again (one re-layout per run, not per frame)."""

    def __init__(self, plot: pg.PlotItem, text: str) -> None:
        self.plot = plot
        self.item = pg.TextItem(text, anchor=(0.5, 0.5))
        self.item.setPos(0.5, 0.5)
        plot.addItem(self.item, ignoreBounds=True)
        self.showing = False
        self.show()

    def set_text(self, text: str) -> None:
        self.item.setText(text)

    def set_color(self, color) -> None:
        self.item.setColor(color)

    def show(self) -> None:
        if self.showing:
            return
        self.showing = True
        self.item.show()
        for name in ("left", "bottom"):
            self.plot.getAxis(name).setStyle(showValues=False)
        self.plot.getViewBox().setRange(xRange=(0.0, 1.0), yRange=(0.0, 1.0), padding=0)

    def hide(self) -> None:
        if not self.showing:
            return
        self.showing = False
        self.item.hide()
        for name in ("left", "bottom"):
            self.plot.getAxis(name).setStyle(showValues=True)


class Markers:
    """Vertical lines at x positions, each with a short label: where the run was paused,
    where the learning rate changed (with the new value), where it ended."""

    END_KINDS = ("ok", "stopped", "oom", "error", "end")

    def __init__(self, plot: pg.PlotItem, label_height: float = 0.92) -> None:
        self.plot = plot
        self.label_height = label_height
        """Where along the line the labels sit (0 bottom, 1 top): away from the curve."""
        self.lines: list[pg.InfiniteLine] = []
        self.shown: list[tuple[float, str, str]] = []

    def set(self, marks: list[tuple[float, str, str]]) -> None:
        """marks: (x, kind, label); kind picks the colour (style.MARKER_COLORS)."""
        if marks == self.shown:
            return
        self.shown = list(marks)
        while len(self.lines) < len(marks):
            line = pg.InfiniteLine(angle=90, movable=False,
                                   label="", labelOpts={"position": self.label_height})
            self.plot.addItem(line, ignoreBounds=True)
            self.lines.append(line)
        step = -0.12 if self.label_height > 0.5 else 0.12  # staggered: near markers' labels do not overlap
        for i, (line, (x, kind, label)) in enumerate(zip(self.lines, marks)):
            line.label.setPosition(self.label_height + step * (i % 3))
            color = MARKER_COLORS.get(kind, "#888888")
            line.setPen(pg.mkPen(color, width=1, style=Qt.PenStyle.DashLine))
            line.label.format = label  # the label re-renders its format whenever the line moves
            line.label.setColor(color)
            # The end's label reads leftwards, so it stays inside the plot at its right edge.
            side = (1, 0) if kind in self.END_KINDS else (0, 0)
            line.label.anchors = [side, side]
            line.setPos(x)
            line.label.setText(label)
            line.show()
        for line in self.lines[len(marks):]:
            line.hide()

    def clear(self) -> None:
        self.set([])
