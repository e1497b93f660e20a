"""One device's memory over time: the categories stacked under the capacity line, beside
the predicted peak and the previous run's."""

from __future__ import annotations

import numpy as np
import pyqtgraph as pg
import pyqtgraph.functions as fn
from PySide6.QtCore import QRectF, Qt

from ..core.events import CATEGORIES
from .buffers import MIB
from .plot_items import Follow, setup_plot
from .style import CAPACITY_COLOR, CATEGORY_COLORS, GHOST_COLOR, PREDICTION_COLOR

EMPTY = np.empty(0)


class StackedArea(pg.GraphicsObject):
    """Stacked areas (one per category) as one item, drawn as one polygon per band.

    pyqtgraph fills under a curve in 50-point chunks, one fillPath each: with five
    filled curves per device that was most of a frame.  This item does the same steps
    a PlotDataItem does with clip-to-view and peak downsampling — keep the points in
    view, reduce them to one bin per pixel column holding the bin's peak — for all
    bands at once, then fills each band with a single drawPolygon."""

    def __init__(self, colors: list[str]) -> None:
        super().__init__()
        self.brushes = [pg.mkBrush(c) for c in colors]
        self.x = EMPTY
        self.tops = np.empty((len(colors), 0))
        self._polygons: list | None = None
        self._bounds = QRectF()
        self.top = 0.0

    def setData(self, x: np.ndarray, tops: np.ndarray) -> None:  # noqa: N802 (pyqtgraph's name)
        """x (n,) increasing; tops (bands, n): running sums, smallest first."""
        self.prepareGeometryChange()
        self.x, self.tops = x, tops
        self._polygons = None
        self.top = float(tops[-1].max()) if len(x) else 0.0
        self._bounds = QRectF(float(x[0]), 0.0, float(x[-1] - x[0]), self.top) if len(x) else QRectF()
        self.informViewBoundsChanged()
        self.update()

    def viewRangeChanged(self) -> None:  # noqa: N802
        self._polygons = None  # other points are in view, at another bin width
        self.update()

    def boundingRect(self) -> QRectF:  # noqa: N802
        return self._bounds

    def dataBounds(self, axis: int, frac: float = 1.0, orthoRange=None):  # noqa: N802
        if not len(self.x):
            return None
        r = self._bounds
        return (r.left(), r.right()) if axis == 0 else (0.0, r.bottom())

    def _build(self) -> list:
        x, tops = self.x, self.tops
        view = self.getViewBox()
        if view is not None and len(x) > 2:
            left, right = view.viewRange()[0]
            i0 = max(int(np.searchsorted(x, left)) - 1, 0)
            i1 = min(int(np.searchsorted(x, right)) + 1, len(x))
            x, tops = x[i0:i1], tops[:, i0:i1]
            bins = max(int(view.width()), 1)
            per_bin = len(x) // bins
            if per_bin > 1:
                n = len(x) // per_bin * per_bin
                # Whole bins, then the newest samples as a last bin reaching the last x.
                peaks = tops[:, :n].reshape(len(tops), -1, per_bin).max(axis=2)
                x_bins = x[:n:per_bin]
                if n < len(x):
                    peaks = np.column_stack([peaks, tops[:, n:].max(axis=1)])
                    x_bins = np.append(x_bins, x[n])
                x = np.append(x_bins, x[-1])
                tops = np.column_stack([peaks, peaks[:, -1]])
        if len(x) < 2:
            return []
        polygons = []
        xs = np.concatenate([x, x[-1:], x[:1]])
        for top in tops:
            poly = fn.create_qpolygonf(len(xs))
            arr = fn.ndarray_from_qpolygonf(poly)
            arr[:, 0] = xs
            arr[:-2, 1] = top
            arr[-2:, 1] = 0.0
            polygons.append(poly)
        return polygons

    def paint(self, p, *args) -> None:
        if self._polygons is None:
            self._polygons = self._build()
        p.setPen(Qt.PenStyle.NoPen)
        for k in range(len(self._polygons) - 1, -1, -1):  # the largest sum at the back
            p.setBrush(self.brushes[k])
            p.drawPolygon(self._polygons[k])


class MemoryPlot:
    """One device's memory over time: the categories stacked, the capacity line and
    the predicted peak as a dashed line."""

    def __init__(self, plot: pg.PlotItem) -> None:
        self.plot = plot
        setup_plot(plot, "", "s")
        plot.setLabel("left", "MiB")
        plot.getAxis("left").enableAutoSIPrefix(False)  # not "MiB (x0.001)": MiB it is
        self.follow = Follow(plot)
        self.area = StackedArea([CATEGORY_COLORS[c] for c in CATEGORIES])
        plot.addItem(self.area)
        self.capacity = pg.InfiniteLine(angle=0, pen=pg.mkPen(CAPACITY_COLOR, width=1))
        self.predicted = pg.InfiniteLine(angle=0, pen=pg.mkPen(PREDICTION_COLOR, width=1, style=Qt.PenStyle.DashLine))
        plot.addItem(self.capacity)
        plot.addItem(self.predicted)
        self.capacity.hide()
        self.predicted.hide()
        self.peak_mib: float | None = None
        # The previous run's peak on this device (Run again with this change): a faint dashed
        # line, so "the memory dropped" reads at a glance whatever each run's start-up took.
        self.ghost = pg.InfiniteLine(angle=0, pen=pg.mkPen(GHOST_COLOR, width=2, style=Qt.PenStyle.DashLine))
        plot.addItem(self.ghost)
        self.ghost.hide()
        self.ghost_mib: float | None = None

    def set_ghost(self, peak_mib: float | None) -> None:
        self.ghost_mib = peak_mib
        self.ghost.setVisible(peak_mib is not None)
        if peak_mib is not None:
            self.ghost.setPos(peak_mib)

    def set_prediction(self, peak_bytes: int | None) -> None:
        self.peak_mib = None if peak_bytes is None else peak_bytes / MIB
        self.predicted.setVisible(peak_bytes is not None)
        if peak_bytes is not None:
            self.predicted.setPos(self.peak_mib)

    def draw(self, t: np.ndarray, tops: np.ndarray, capacity_bytes: int) -> None:
        self.area.setData(t, tops)
        if capacity_bytes:
            self.capacity.setPos(capacity_bytes / MIB)
            self.capacity.show()
        if len(t):
            # The view holds the curves and the prediction they are compared with; the
            # capacity shows when near (it is often far above, and would squash them).
            top = max(self.area.top, self.peak_mib or 0.0, self.ghost_mib or 0.0)
            self.follow.fit(float(t[0]), float(t[-1]), 0.0, top)

    def clear(self) -> None:
        self.area.setData(EMPTY, np.empty((len(CATEGORIES), 0)))
        self.capacity.hide()
        self.follow.reset()
        self.plot.getViewBox().setRange(xRange=(0.0, 1.0), yRange=(0.0, 1.0), padding=0)  # not the last run's
