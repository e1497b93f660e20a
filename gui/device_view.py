"""DeviceView: one memory gauge per device, the way a person reads a fuel tank.

A gauge is a bar that fills from the bottom with the device's bytes by category, in
the shared category colours.  The red line is the capacity; the bar's scale grows past
it when a prediction or a measurement goes over, so "will not fit" is visible before
Start.  A thin line marks the measured peak, a purple dashed line with a triangle the
predicted peak.  An out-of-memory turns the gauge red and names the category that
overflowed.
"""

from __future__ import annotations

from PySide6.QtCore import QPointF, QRectF, QSize, Qt
from PySide6.QtGui import QBrush, QColor, QPainter, QPen, QPolygonF
from PySide6.QtWidgets import (
    QFrame,
    QGridLayout,
    QLabel,
    QScrollArea,
    QSizePolicy,
    QVBoxLayout,
    QWidget,
)

from ..core.config import RunConfig, human_bytes
from ..core.events import CATEGORIES
from ..core.plan import Plan
from .buffers import RunData
from .mesh_grid import AxisPicker, cell, plan_of, tints
from .mesh_grid import columns as mesh_columns
from .style import CAPACITY_COLOR, CATEGORY_COLORS, OOM_COLOR, PREDICTION_COLOR, legend_html, qcolor


class Gauge(QWidget):
    """The memory of one device, painted by hand (no child widgets, cheap to repaint)."""

    BAR_W = 34
    MIN_W, MIN_H = 128, 140
    TEXT_H = 62  # label, used / capacity, and the out-of-memory line, wrapped

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.label = ""
        self.capacity = 0
        self.bytes: dict[str, int] = {}
        self.peak = 0
        self.host = 0
        """placement.cpu_offload: bytes kept in host memory instead (not in the gauge)."""
        self.predicted: int | None = None
        self.oom: str | None = None
        """None: fine; otherwise the text naming what overflowed."""
        self.tint: str | None = None
        """The colour of this device's mesh group along the lit axis (mesh_grid)."""
        self.highlighted = False
        """Outlined: a lesson step points at this device."""
        self.setSizePolicy(QSizePolicy.Policy.Preferred, QSizePolicy.Policy.Expanding)
        self.setMinimumSize(self.MIN_W, self.MIN_H)
        self.setMaximumWidth(180)

    def sizeHint(self) -> QSize:
        return QSize(140, 200)

    @property
    def used(self) -> int:
        return sum(self.bytes.values())

    def set_state(self, label: str, capacity: int, bytes_: dict[str, int], peak: int,
                  oom: str | None, host: int = 0) -> None:
        self.label, self.capacity, self.bytes, self.peak, self.oom = label, capacity, dict(bytes_), peak, oom
        self.host = host
        self._update_tooltip()
        self.update()

    def set_tint(self, color: str | None) -> None:
        if color != self.tint:
            self.tint = color
            self.update()

    def set_predicted(self, peak: int | None) -> None:
        self.predicted = peak
        self._update_tooltip()
        self.update()

    def _update_tooltip(self) -> None:
        lines = [f"<b>{self.label}</b>"]
        lines += [f'<span style="color:{CATEGORY_COLORS[c]}">&#9632;</span> {c}: {human_bytes(self.bytes.get(c, 0))}'
                  for c in CATEGORIES]
        lines.append(f"peak {human_bytes(self.peak)} of {human_bytes(self.capacity)}")
        if self.host:
            lines.append(f"offloaded to host: {human_bytes(self.host)} (not in the peak)")
        if self.predicted is not None:
            lines.append(f"predicted peak {human_bytes(self.predicted)}")
        if self.oom:
            lines.append(f'<span style="color:{OOM_COLOR}">{self.oom}</span>')
        self.setToolTip("<br>".join(lines))

    def paintEvent(self, event) -> None:  # noqa: N802 (Qt's name)
        p = QPainter(self)
        pal = self.palette()
        text = pal.windowText().color()
        w, h = self.width(), self.height()
        if self.tint:
            p.fillRect(self.rect(), qcolor(self.tint, 60))
            p.setPen(QPen(QColor(self.tint), 2))
            p.drawRect(self.rect().adjusted(1, 1, -1, -1))
        if self.oom:
            p.fillRect(self.rect(), qcolor(OOM_COLOR, 40))
            p.setPen(QPen(QColor(OOM_COLOR), 2))
            p.drawRect(self.rect().adjusted(1, 1, -1, -1))
        if self.highlighted:
            p.setPen(QPen(pal.highlight().color(), 3))
            p.drawRoundedRect(QRectF(self.rect()).adjusted(1.5, 1.5, -1.5, -1.5), 4, 4)
        bar = QRectF((w - self.BAR_W) / 2, 8, self.BAR_W, max(10, h - 16 - self.TEXT_H))
        scale = max(self.capacity, self.used, self.peak, self.predicted or 0, 1)

        def y_of(n: float) -> float:
            return bar.bottom() - bar.height() * min(n / scale, 1.0)

        p.fillRect(bar, qcolor(text.name(), 18))
        bottom = 0
        for c in CATEGORIES:  # stacked from the bottom, in the legend's order
            n = self.bytes.get(c, 0)
            if n > 0:
                top = bottom + n
                p.fillRect(QRectF(bar.left(), y_of(top), bar.width(), y_of(bottom) - y_of(top)),
                           QColor(CATEGORY_COLORS[c]))
                bottom = top
        p.setPen(QPen(qcolor(text.name(), 120), 1))
        p.setBrush(Qt.BrushStyle.NoBrush)
        p.drawRect(bar)
        if self.capacity:
            p.setPen(QPen(QColor(CAPACITY_COLOR), 2))
            y = y_of(self.capacity)
            p.drawLine(QPointF(bar.left() - 6, y), QPointF(bar.right() + 6, y))
        if self.peak:
            p.setPen(QPen(text, 1))
            y = y_of(self.peak)
            p.drawLine(QPointF(bar.left() - 3, y), QPointF(bar.right() + 3, y))
        if self.predicted is not None:
            pen = QPen(QColor(PREDICTION_COLOR), 2)
            pen.setStyle(Qt.PenStyle.DashLine)
            p.setPen(pen)
            y = y_of(self.predicted)
            p.drawLine(QPointF(bar.left(), y), QPointF(bar.right(), y))
            p.setPen(Qt.PenStyle.NoPen)
            p.setBrush(QBrush(QColor(PREDICTION_COLOR)))
            x = bar.right() + 2
            p.drawPolygon(QPolygonF([QPointF(x, y), QPointF(x + 8, y - 5), QPointF(x + 8, y + 5)]))
        lines = [self.label, f"{human_bytes(self.used)} / {human_bytes(self.capacity)}"]
        if self.oom:
            lines.append(self.oom)
        p.setPen(QColor(OOM_COLOR) if self.oom else text)
        p.drawText(QRectF(2, bar.bottom() + 4, w - 4, self.TEXT_H),
                   Qt.AlignmentFlag.AlignHCenter | Qt.AlignmentFlag.AlignTop | Qt.TextFlag.TextWordWrap,
                   "\n".join(lines))
        p.end()


class DeviceView(QWidget):
    """Gauges, one per device of the bound run, with the category legend.

    They wrap into as many rows as the width needs and scroll inside the view, so 32
    devices never make the window wider than the screen (the window's minimum width
    would otherwise be the sum of the gauges')."""

    SPACING = 4

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.gauges: list[Gauge] = []
        self._grid_widget = QWidget()
        self._grid = QGridLayout(self._grid_widget)
        self._grid.setSpacing(self.SPACING)
        self._grid.setContentsMargins(0, 0, 0, 0)
        self._columns = 0
        self.scroll = QScrollArea()
        self.scroll.setWidgetResizable(True)
        self.scroll.setFrameShape(QFrame.Shape.NoFrame)
        self.scroll.setHorizontalScrollBarPolicy(Qt.ScrollBarPolicy.ScrollBarAlwaysOff)
        self.scroll.setWidget(self._grid_widget)
        self.scroll.setMinimumHeight(Gauge.MIN_H)
        legend = QLabel(legend_html(CATEGORY_COLORS) + f' &nbsp; <span style="color:{CAPACITY_COLOR}">'
                        f'&#9644;</span> capacity &nbsp; <span style="color:{PREDICTION_COLOR}">&#9664;</span> predicted')
        legend.setWordWrap(True)
        self.axis_picker = AxisPicker()
        self.axis_picker.picked.connect(self.light)
        self.axis_picker.setVisible(False)
        layout = QVBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        layout.addWidget(self.axis_picker)
        layout.addWidget(self.scroll, 1)
        layout.addWidget(legend)
        self.mesh: Plan | None = None
        self._axis = ""
        self._mesh_of: object = None
        """The run start the mesh was taken from."""
        self._prediction: dict[int, dict] = {}
        self._seen = (-1, -1)
        self._run_devices = 0
        self._highlight: int | None = None

    def _ensure(self, n: int) -> None:
        # Gauges are made once per device slot and reused by later runs.
        grew = len(self.gauges) < n
        while len(self.gauges) < n:
            self.gauges.append(Gauge(self._grid_widget))
        for i, g in enumerate(self.gauges):
            g.setVisible(i < n)
            g.highlighted = i == self._highlight
        self._shown = n
        self._wrap(force=grew)

    def set_mesh(self, plan: Plan | None) -> None:
        """Lay the gauges out as this mesh (None: wrap them to the width)."""
        if plan == self.mesh:
            return
        self.mesh = plan
        self.axis_picker.set_plan(plan)
        self._wrap(force=True)

    def light(self, axis: str) -> None:
        """Tint each group of devices along `axis` ('' for none)."""
        self._axis = axis
        colors = tints(self.mesh, axis) if self.mesh is not None and axis else {}
        for i, g in enumerate(self.gauges):
            g.set_tint(colors.get(i))

    def columns_for(self, width: int) -> int:
        return max(1, (width + self.SPACING) // (Gauge.MIN_W + self.SPACING))

    def _wrap(self, force: bool = False) -> None:
        shown = self.gauges[:getattr(self, "_shown", 0)]
        mesh = self.mesh if self.mesh is not None and self.mesh.world == len(shown) else None
        if mesh is not None:  # the mesh's own grid (mesh_grid.columns)
            columns = mesh_columns(mesh)
        else:
            columns = self.columns_for(self.width() - self.scroll.verticalScrollBar().sizeHint().width())
        if columns == self._columns and not force:
            return
        self._columns = columns
        for g in self.gauges:
            self._grid.removeWidget(g)
        for i, g in enumerate(shown):
            self._grid.addWidget(g, *(cell(mesh, i) if mesh is not None else (i // columns, i % columns)))
        for c in range(self._grid.columnCount()):
            self._grid.setColumnStretch(c, 0)
        self._grid.setColumnStretch(columns, 1)  # gauges keep their width, the rest is slack
        self.light(self._axis)

    def resizeEvent(self, event) -> None:  # noqa: N802 (Qt's name)
        super().resizeEvent(event)
        self._wrap()

    def rows(self) -> int:
        n = getattr(self, "_shown", 0)
        return -(-n // max(self._columns, 1)) if n else 0

    def refresh(self, data: RunData, force: bool = False) -> bool:
        """Take the latest memory and end state from data; False when nothing changed."""
        seen = (data.memory_version, data.end_version)
        if seen == self._seen and not force:
            return False
        self._seen = seen
        self._run_devices = len(data.devices)
        if data.start is not None and data.start is not self._mesh_of:
            self._mesh_of = data.start
            self.set_mesh(plan_of(RunConfig.from_dict(data.start.config), len(data.devices)))
        if not data.devices and self._prediction:
            self._show_prediction_only()
            return True
        self._ensure(len(data.devices))
        overflow = data.overflow()
        for i, d in enumerate(data.devices):
            oom = None
            if overflow and overflow[0] == i:
                oom = f"out of memory: {overflow[1]}" if overflow[1] else "out of memory"
            elif overflow and d.last and d.capacity_bytes and sum(d.last.bytes.values()) > d.capacity_bytes:
                oom = "over capacity too"  # the run names one device; this one overflowed as well
            g = self.gauges[i]
            g.set_state(d.label, d.capacity_bytes, d.last.bytes if d.last else {}, d.peak_bytes, oom,
                        sum(d.last.host.values()) if d.last else 0)
            g.set_predicted(self._predicted(i))
        return True

    def set_prediction(self, pred: dict[int, dict] | None) -> None:
        """device -> {"peak_bytes", "bytes"[, "label", "capacity_bytes"]} from core.estimate."""
        self._prediction = {int(k): v for k, v in (pred or {}).items()}
        if not self._run_devices and self._prediction:
            self._show_prediction_only()
        for i, g in enumerate(self.gauges):
            g.set_predicted(self._predicted(i))

    def _show_prediction_only(self) -> None:
        # Before any run: empty gauges with the predicted peak, so "will not fit" shows
        # before Start (label and capacity when the estimate gives them).
        n = max(self._prediction) + 1
        self._ensure(n)
        for i in range(n):
            entry = self._prediction.get(i, {})
            self.gauges[i].set_state(str(entry.get("label", f"device {i}")), int(entry.get("capacity_bytes", 0)),
                                     {}, 0, None)
            self.gauges[i].set_predicted(self._predicted(i))

    def set_highlight(self, device: int | None) -> None:
        """Outline one device's gauge (None: none); kept for gauges made later."""
        self._highlight = device
        for i, g in enumerate(self.gauges):
            g.highlighted = i == device
            g.update()

    def _predicted(self, device: int) -> int | None:
        entry = self._prediction.get(device)
        return int(entry["peak_bytes"]) if entry and "peak_bytes" in entry else None

    def clear(self) -> None:
        for g in self.gauges:
            g.set_state(g.label, g.capacity, {}, 0, None)
        self._seen = (-1, -1)
