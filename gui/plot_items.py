"""Small pyqtgraph pieces the dashboard's plots share: a plot's set-up and its curves, the
view that follows the data, what an empty plot says, and the markers of a run's events
(paused, learning rate changed, ended).

Both are made once per plot and only moved, shown or hidden afterwards (plot items
leak when re-created: pyqtgraph #2665, #2672).
"""

from __future__ import annotations

import math

import pyqtgraph as pg
from PySide6.QtCore import Qt
from PySide6.QtWidgets import QGraphicsItem

from .style import MARKER_COLORS

LEFT_AXIS_PX = 56


def setup_plot(plot: pg.PlotItem, title: str, x_label: str) -> None:
    # No grid: pyqtgraph draws it as part of the axes, which then repaint with every curve.
    # The x unit goes in the title: an axis label costs every plot a line of height.
    plot.setTitle(f"{title} · x: {x_label}" if title else "", size="9pt")
    plot.setClipToView(True)
    plot.setDownsampling(auto=True, mode="peak")
    for name in ("left", "bottom"):
        # A changing curve exposes the axes next to it; from a pixmap cache they repaint
        # as a copy instead of replaying every tick label (a third of a frame otherwise).
        plot.getAxis(name).setCacheMode(QGraphicsItem.CacheMode.DeviceCoordinateCache)
    # A fixed width: an axis that widens with its labels re-lays out every plot of the grid.
    plot.getAxis("left").setWidth(LEFT_AXIS_PX)


def line_curve(plot: pg.PlotItem, color: str) -> pg.PlotDataItem:
    # connect='all' + skipFiniteCheck: no per-frame scan for NaN (the data has none).
    # Peak downsampling to one bin per pixel (pyqtgraph's default is five): each pixel
    # column still gets its min and max, so the picture is the same at a fifth of the work.
    # No dynamicRangeLimit: it scans all the data for its bounds on every frame, and the
    # views here are fitted to the data anyway.
    item = pg.PlotDataItem(pen=pg.mkPen(color, width=1), connect="all", skipFiniteCheck=True,
                           clipToView=True, autoDownsample=True, downsampleMethod="peak",
                           autoDownsampleFactor=1.0, dynamicRangeLimit=None)
    plot.addItem(item)
    return item


class Follow:
    """Keeps a plot's view on its data without re-ranging it every frame.

    pyqtgraph's auto-range moves the view with every new point, and each move makes the
    axes lay out and paint their ticks again: in a live run that was most of the GUI
    thread's time.  Here an axis is refitted only when the data leaves it or fills less
    than 40 % of it; x then gets room to grow to 1.5 times the data's span and y 10 %
    margins, so a run's first minutes cost a dozen refits, not one per frame.
    Zooming or panning by hand stops the following; the plot's "A" button resumes it."""

    GROW = 1.5
    FILL = 0.4

    def __init__(self, plot: pg.PlotItem, y_fixed: tuple[float, float] | None = None) -> None:
        self.vb = plot.getViewBox()
        self.vb.disableAutoRange()
        self.y_fixed = y_fixed
        self.on = True
        self.x: tuple[float, float] | None = None
        self.y: tuple[float, float] | None = None
        self._last: tuple[float, float, float, float] | None = None
        self.vb.sigRangeChangedManually.connect(self._manual)
        plot.autoBtn.clicked.connect(self._resume)

    def _manual(self, *_) -> None:
        self.on = False

    def _resume(self) -> None:
        self.vb.disableAutoRange()  # the button turned pyqtgraph's on; we follow instead
        self.on, self.x, self.y = True, None, None
        if self._last:
            self.fit(*self._last)

    def reset(self) -> None:
        self.on, self.x, self.y, self._last = True, None, None, None

    @classmethod
    def _holds(cls, view: tuple[float, float] | None, lo: float, hi: float) -> bool:
        return (view is not None and view[0] <= lo and hi <= view[1]
                and hi - lo >= cls.FILL * (view[1] - view[0]))

    def fit(self, x0: float, x1: float, y0: float, y1: float) -> None:
        if not all(math.isfinite(v) for v in (x0, x1, y0, y1)):
            return
        if self.y_fixed:
            y0, y1 = self.y_fixed
        self._last = (x0, x1, y0, y1)
        if not self.on:
            return
        change = {}
        if not self._holds(self.x, x0, x1):
            self.x = (x0, x0 + self.GROW * ((x1 - x0) or 1.0))
            change["xRange"] = self.x
        if not self._holds(self.y, y0, y1):
            pad = 0.0 if self.y_fixed else 0.1 * ((y1 - y0) or abs(y1) or 1.0)
            self.y = (y0 if y0 == 0 else y0 - pad, y1 + pad)
            change["yRange"] = self.y
        if change:
            self.vb.setRange(padding=0, **change)


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
