"""Dashboard: the live view of a run — gauges, plots and the phase timeline.

Built once and reused by every run: `bind` a RunData, `start` the timer.  Events land
in RunData (on the GUI thread, as they arrive); a single QTimer at ≤ 30 Hz pulls from
it, and only when its `version` moved, so the drawing rate never depends on the data
rate.  Curves are made once per device slot and only ever get `setData` (pyqtgraph
#2665, #2672: plot items leak when re-created); peak downsampling, clip-to-view and
views that are refitted only when the data leaves them keep 100 000-point curves cheap.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np
import pyqtgraph as pg
from PySide6.QtCore import QEvent, QRectF, Qt, QTimer
from PySide6.QtWidgets import (
    QCheckBox,
    QFrame,
    QHBoxLayout,
    QLabel,
    QScrollArea,
    QSizePolicy,
    QSplitter,
    QStackedWidget,
    QVBoxLayout,
    QWidget,
)

from ..core.events import CATEGORIES
from ..core.telemetry import UTILIZATION_EXPLAINED
from .buffers import MIB, RunData
from .device_view import DeviceView
from .memory_plot import MemoryPlot
from .plot_items import Follow, Markers, Placeholder, line_curve, setup_plot
from .style import (
    GHOST_COLOR,
    device_color,
    legend_html,
)
from .timeline import Timeline

MAX_FPS = 30
TELEMETRY_HZ = 10
TELEMETRY_PARTS = ("memory", "util", "gauges", "timeline")
"""Memory, utilization, gauges and timeline redraw at most this often: their samples come
at a few per second, and redrawing them with every loss point cost a third of each frame."""
MEMORY_COLUMNS = 4
MEMORY_ROW_PX = 120
SPLIT_SHARES = (0.21, 0.29, 0.27, 0.23)  # gauges, loss/rate/utilization, memory per device, timeline
LEGEND_MAX_DEVICES = 8  # past this the colours repeat: a legend would only list them again
PREMADE_SLOTS = 4
UTIL_SOURCES = {"nvml": "NVML: a kernel ran", "spans": "host: share of step computing", "cpu": "rank CPU",
                "modelled": "modelled GPU: compute stream busy"}
EMPTY = np.empty(0)


LOSS_HINT = "The loss, step by step,\nappears here when the run starts."
RATE_HINT = "Samples per second (smoothed)\nand the run's average."
UTIL_HINT = "How busy each device is,\nover time."
HINTS = {"loss": LOSS_HINT, "rate": RATE_HINT, "util": UTIL_HINT}
MEMORY_HINT = ("Press Start: each device's memory appears here by category, "
               "under its capacity (red) and beside the prediction (dashed).")


def rate_text(data: RunData) -> str:
    """The smoothed samples/s and the run's average (one step's figure swings too much)."""
    smoothed, average = data.smoothed_rate, data.average_rate
    if smoothed is None:
        return "– samples/s"
    tokens = data.tokens_per_sample
    per_token = f", {smoothed * tokens:,.0f} tokens/s" if tokens else ""
    return f"{smoothed:,.0f} samples/s{per_token} (average {average:,.0f} samples/s)"


class Dashboard(QWidget):
    """Gauges, loss, throughput, utilization, memory per device, timeline."""

    def __init__(self, parent: QWidget | None = None, fps: int = MAX_FPS) -> None:
        super().__init__(parent)
        self.data: RunData | None = None
        self._prediction: dict[int, dict] = {}
        self._seen: dict[str, int] = {}
        self._shown: tuple[str, ...] | None = None
        """The device labels the plots are laid out for."""

        self.devices = DeviceView()
        self.timeline = Timeline()
        self.plots = pg.GraphicsLayoutWidget()
        self.loss_plot = self.plots.addPlot(row=0, col=0)
        setup_plot(self.loss_plot, "loss", "step")
        self.loss_curve = line_curve(self.loss_plot, device_color(0))
        self.rate_plot = self.plots.addPlot(row=0, col=1)
        setup_plot(self.rate_plot, "samples/s, smoothed", "s")
        self.rate_curve = line_curve(self.rate_plot, device_color(1))
        self.util_plot = self.plots.addPlot(row=0, col=2)
        setup_plot(self.util_plot, "utilization %", "s")
        self.util_plot.setToolTip(UTILIZATION_EXPLAINED)  # people misread NVML's number
        self.util_curves: list[pg.PlotDataItem] = []
        # Per-device memory plots scroll in their own view: rows of MEMORY_COLUMNS, each at
        # least MEMORY_ROW_PX high, so 32 devices neither squash them nor grow the window.
        self.mem_view = pg.GraphicsLayoutWidget()
        self.mem_layout = self.mem_view.ci
        self.mem_scroll = QScrollArea()
        self.mem_scroll.setWidgetResizable(True)
        self.mem_scroll.setFrameShape(QFrame.Shape.NoFrame)
        self.mem_scroll.setHorizontalScrollBarPolicy(Qt.ScrollBarPolicy.ScrollBarAlwaysOff)
        self.mem_scroll.setWidget(self.mem_view)
        self.mem_plots: list[MemoryPlot] = []
        # No devices yet: a sentence in place of the plots (a page of its own: adding and
        # removing an item in the plots' grid left them squeezed into a corner).
        self.mem_hint = QLabel(MEMORY_HINT, alignment=Qt.AlignmentFlag.AlignCenter, wordWrap=True)
        # Empty plots say what will appear there, instead of bare 0–1 axes.
        self.placeholders = {"loss": Placeholder(self.loss_plot, LOSS_HINT),
                             "rate": Placeholder(self.rate_plot, RATE_HINT),
                             "util": Placeholder(self.util_plot, UTIL_HINT)}
        # Labels where the curves are not: the loss falls to the bottom, the rate holds the top.
        self.markers = {"loss": Markers(self.loss_plot, 0.92), "rate": Markers(self.rate_plot, 0.2)}
        self.average_line = pg.InfiniteLine(angle=0, movable=False, label="",
                                            labelOpts={"position": 0.9, "anchors": [(1, 0), (1, 0)]})
        self.average_line.setPen(pg.mkPen(device_color(1), width=1, style=Qt.PenStyle.DotLine))
        self.average_line.label.setColor(device_color(1))
        self.rate_plot.addItem(self.average_line, ignoreBounds=True)
        self.average_line.hide()
        self.device_legend = QLabel("")
        self.device_legend.setWordWrap(True)
        self.device_legend.setToolTip("The colour of each device's line in the utilization plot.")
        self._part_at = dict.fromkeys(TELEMETRY_PARTS, 0.0)
        self._drawn: dict[str, object] = {}
        self.telemetry_interval_s = 1.0 / TELEMETRY_HZ
        self._follow = {"loss": Follow(self.loss_plot), "rate": Follow(self.rate_plot),
                        "util": Follow(self.util_plot, y_fixed=(0.0, 100.0))}
        self._util_title = ""
        # "Run again with this change": the previous run stays as a faint line behind this one.
        self.ghost_curves = {"loss": self._ghost_curve(self.loss_plot), "rate": self._ghost_curve(self.rate_plot)}
        self._ghost_range: tuple[float, float, float, float] | None = None
        self._ghost_rate_top = 0.0
        self.ghost_title = ""
        # Named inside the loss plot (its top right stays empty: the view leaves x room to grow).
        self.ghost_legend = self.loss_plot.addLegend(offset=(-5, 5))
        self.ghost_legend.setVisible(False)

        self.log_loss = QCheckBox("log-scale loss")
        self.log_loss.toggled.connect(self.set_log_loss)
        self.status = QLabel("")
        # The status gives way (cut at its end; the status bar repeats step, loss and rate)
        # rather than squeeze the device legend into one name per line beside a lesson dock.
        self.status.setSizePolicy(QSizePolicy.Policy.Ignored, QSizePolicy.Policy.Preferred)
        top = QHBoxLayout()
        top.addWidget(self.status, 1)
        top.addWidget(self.device_legend)
        top.addWidget(self.log_loss)
        self.timeline_scroll = QScrollArea()
        self.timeline_scroll.setWidgetResizable(True)
        self.timeline_scroll.setFrameShape(QFrame.Shape.NoFrame)
        self.timeline_scroll.setHorizontalScrollBarPolicy(Qt.ScrollBarPolicy.ScrollBarAlwaysOff)
        self.timeline_scroll.setWidget(self.timeline)
        split = QSplitter(Qt.Orientation.Vertical)
        self.mem_pages = QStackedWidget()
        self.mem_pages.addWidget(self.mem_hint)
        self.mem_pages.addWidget(self.mem_scroll)
        for widget, stretch in ((self.devices, 2), (self.plots, 3), (self.mem_pages, 3), (self.timeline_scroll, 3)):
            split.addWidget(widget)
            split.setStretchFactor(split.count() - 1, stretch)
            split.setCollapsible(split.count() - 1, False)
        self.split = split
        self._split_for: int | None = None
        layout = QVBoxLayout(self)
        layout.setContentsMargins(4, 4, 4, 4)
        layout.addLayout(top)
        layout.addWidget(split, 1)

        self.timer = QTimer(self)
        self.timer.setInterval(max(1000 // max(1, min(fps, MAX_FPS)), 34))
        self.timer.timeout.connect(self.refresh)
        # Slots for a few devices now, while nothing runs: making plots costs the GUI
        # thread tens of milliseconds, better spent before Start than during a run.
        self._make_slots(PREMADE_SLOTS)
        self._apply_palette()

    # ---- the interface the app uses -------------------------------------------------------------

    def bind(self, data: RunData) -> None:
        self.data = data
        self._seen = {}
        self._drawn = {}

    def set_prediction(self, pred: dict[int, dict] | None) -> None:
        """device -> {"peak_bytes": int, "bytes": {category: int}} from core.estimate."""
        self._prediction = {int(k): v for k, v in (pred or {}).items()}
        for i, mp in enumerate(self.mem_plots):
            mp.set_prediction(self._peak(i))
        self.devices.set_prediction(self._prediction)

    def start(self) -> None:
        self.timer.start()

    @staticmethod
    def _ghost_curve(plot: pg.PlotItem) -> pg.PlotDataItem:
        item = pg.PlotDataItem(pen=pg.mkPen(GHOST_COLOR, width=2), connect="finite")
        item.setZValue(-10)  # behind the run it is compared with
        plot.addItem(item)
        return item

    def set_ghost(self, data: RunData | None, label: str = "") -> None:
        """Keep `data`'s loss and rate curves, and each device's peak memory, as faint lines
        behind the next run (None: none).
        The arrays are copied: the buffers are about to be reset for the next run."""
        s = data.steps if data is not None else None
        devices = data.devices if data is not None and s is not None and len(s) else []
        for i, mp in enumerate(self.mem_plots):
            peak = devices[i].peak_bytes if i < len(devices) else 0
            mp.set_ghost(peak / MIB if peak else None)
        if s is None or not len(s):
            for curve in self.ghost_curves.values():
                curve.setData(EMPTY, EMPTY)
            self._ghost_range = None
            self._ghost_rate_top = 0.0
            self.ghost_title = ""
            self.ghost_legend.clear()
            self.ghost_legend.setVisible(False)
            return
        step, t, loss, rate = (s.column(i).copy() for i in (0, 1, 2, 5))
        self.ghost_curves["loss"].setData(step, loss)
        self.ghost_curves["rate"].setData(t, rate)
        finite = loss[np.isfinite(loss)]
        self._ghost_range = (float(step[0]), float(step[-1]), float(finite.min()), float(finite.max())) \
            if len(finite) else None
        finite_rate = rate[np.isfinite(rate)]
        self._ghost_rate_top = float(finite_rate.max()) if len(finite_rate) else 0.0
        self.ghost_title = label or "previous run"
        self.ghost_legend.clear()
        # A short name: the loss plot can be 200 px wide; the run itself is in the tooltip.
        self.ghost_legend.addItem(self.ghost_curves["loss"], "previous run")
        self.ghost_legend.setToolTip(f"The faint line: {self.ghost_title} (kept by Run again with this change)")
        self.ghost_legend.setVisible(True)
        self._seen.pop("steps", None)  # refit the views around the ghost at the next refresh
        self._seen.pop("all", None)
        self._drawn.pop("memory", None)

    def stop(self) -> None:
        self.timer.stop()
        self.refresh(force=True)  # whatever arrived since the last tick

    def clear(self) -> None:
        """Empty every view for a new run: curves, capacity and prediction lines, markers,
        axis ranges, gauges (the bound RunData is kept; its next change redraws)."""
        for curve in (self.loss_curve, self.rate_curve, *self.util_curves):
            curve.setData(EMPTY, EMPTY)
        self.set_prediction(None)
        for mp in self.mem_plots:
            mp.clear()
        for follow in self._follow.values():
            follow.reset()
        for key, placeholder in self.placeholders.items():
            placeholder.set_text(HINTS[key])
            placeholder.show()
        for markers in self.markers.values():
            markers.clear()
        self.average_line.hide()
        self.devices.clear()
        self.timeline.clear()
        self.status.setText("")
        self._seen = {}
        self._drawn = {}

    def export_png(self, path: str | Path) -> Path:
        """Save what the dashboard shows as a PNG; OSError if it cannot be written."""
        path = Path(path)
        self.refresh(force=True)
        if not self.grab().save(str(path), "PNG"):
            raise OSError(f"could not write a PNG to {path}")
        return path

    def set_log_loss(self, on: bool) -> None:
        on = bool(on)
        if self.log_loss.isChecked() != on:
            self.log_loss.setChecked(on)  # calls back here through toggled
            return
        self.loss_plot.setLogMode(y=on)
        self._follow["loss"].reset()
        self._seen.pop("steps", None)
        self._seen.pop("all", None)
        self.refresh()

    # ---- drawing --------------------------------------------------------------------------------

    def _changed(self, key: str, version: int) -> bool:
        if self._seen.get(key) == version:
            return False
        self._seen[key] = version
        return True

    def refresh(self, force: bool = False) -> bool:
        """Pull from RunData and setData what changed; False when nothing did.  The
        telemetry views (memory, utilization, gauges, timeline) wait until
        `telemetry_interval_s` has passed since they last drew, unless `force` (the run's end, an export)."""
        data = self.data
        if data is None or not self._changed("all", data.version):
            return False
        if tuple(data.labels) != self._shown:
            self._layout(data)
        if self._changed("steps", data.steps_version):
            self._draw_steps(data)
        versions = {"memory": data.memory_version, "util": data.util_version,
                    "gauges": (data.memory_version, data.end_version), "timeline": data.span_version}
        stale = [part for part in TELEMETRY_PARTS if self._drawn.get(part) != versions[part]]
        if force or self.telemetry_interval_s <= 0:
            due = stale
        else:
            # One telemetry view per tick, the longest waiting whose interval has passed:
            # spread over ticks, no tick holds the event loop for all of them at once.
            now = time.monotonic()
            ready = [p for p in stale if now - self._part_at[p] >= self.telemetry_interval_s]
            due = [min(ready, key=self._part_at.get)] if ready else []
        for part in due:
            self._draw_part(part, data)
            self._drawn[part] = versions[part]
            self._part_at[part] = time.monotonic()
        if len(due) < len(stale):
            self._seen.pop("all", None)  # come back for the rest at a later tick
        return True

    def _draw_part(self, part: str, data: RunData) -> None:
        if part == "memory":
            for d, mp in zip(data.devices, self.mem_plots):
                mp.draw(d.memory.column(0), d.memory.columns(1, 1 + len(CATEGORIES)), d.capacity_bytes)
        elif part == "util":
            self._draw_util(data)
        elif part == "gauges":
            self.devices.refresh(data)
        else:
            self.timeline.refresh(data)

    def _draw_steps(self, data: RunData) -> None:
        s = data.steps
        step, t, loss, rate = s.column(0), s.column(1), s.column(2), s.column(5)
        log = self.log_loss.isChecked()
        # Non-finite losses (a diverged run), or the log of a zero loss, need the NaN-aware path.
        finite = data.loss_finite and not log
        self.loss_curve.setData(step, loss, connect="all" if finite else "finite", skipFiniteCheck=finite)
        self.rate_curve.setData(t, rate)
        if not len(step) and data.end is not None:
            for key in ("loss", "rate"):
                self.placeholders[key].set_text("No step finished:\nthe run ended before its first step.")
        if len(step):
            self.placeholders["loss"].hide()
            self.placeholders["rate"].hide()
            shown = loss[np.isfinite(loss) & (loss > 0)] if log else loss[np.isfinite(loss)]
            if len(shown):
                lo, hi = float(shown.min()), float(shown.max())
                x0, x1 = float(step[0]), float(step[-1])
                if self._ghost_range is not None and not log:  # the previous run stays in view
                    x0, x1 = min(x0, self._ghost_range[0]), max(x1, self._ghost_range[1])
                    lo, hi = min(lo, self._ghost_range[2]), max(hi, self._ghost_range[3])
                if log:
                    lo, hi = math.log10(lo), math.log10(hi)
                self._follow["loss"].fit(x0, x1, lo, hi)
            finite_rate = rate[np.isfinite(rate)]
            if len(finite_rate):
                self._follow["rate"].fit(float(t[0]), float(t[-1]), 0.0,
                                         max(float(finite_rate.max()), self._ghost_rate_top))
        average = data.average_rate
        self.average_line.setVisible(average is not None)
        if average is not None:
            self.average_line.setPos(average)
            self.average_line.label.setText(f"average {average:,.0f}")
        self.markers["loss"].set([(float(m[0]), m[2], m[3]) for m in data.marks])
        self.markers["rate"].set([(float(m[1]), m[2], m[3]) for m in data.marks])
        last = data.last_step
        if last is not None:
            every = f" (each point: mean of {s.stride} steps)" if s.stride > 1 else ""
            # samples/s is in the run's clock: say which, where the figure is read.
            clock = data.start.clock if data.start is not None and data.start.clock != "host" else ""
            self.status.setText(f"step {last.step} · loss {last.loss:.4g} · {rate_text(data)}"
                                f"{f' ({clock})' if clock else ''} · lr {last.lr:g}{every}")

    def _draw_util(self, data: RunData) -> None:
        t0, t1 = math.inf, -math.inf
        for d, curve in zip(data.devices, self.util_curves):
            t = d.utilization.column(0)
            curve.setData(t, d.utilization.column(1))
            if len(t):
                t0, t1 = min(t0, float(t[0])), max(t1, float(t[-1]))
        if t1 >= t0:
            self.placeholders["util"].hide()
        self._follow["util"].fit(t0, t1, 0.0, 100.0)
        # Samples without a value (nothing sampled yet, no NVML) leave a gap in the curve.
        sources = sorted({UTIL_SOURCES.get(d.util_source, d.util_source) for d in data.devices if d.util_source})
        title = "utilization %" + (f" ({', '.join(sources)})" if sources else "")
        if title != self._util_title:  # a title change re-lays out the plot: only when needed
            self._util_title = title
            self.util_plot.setTitle(title, size="9pt")

    def _layout(self, data: RunData) -> None:
        """Show one memory plot and one utilization curve per device; slots are made
        once and kept for later runs (hidden when a run has fewer devices)."""
        self._shown = tuple(data.labels)
        self._drawn = {}  # the plots were cleared: every telemetry view draws again
        n = len(data.devices)
        self._make_slots(n)
        if 1 < n <= LEGEND_MAX_DEVICES:
            self.device_legend.setText(legend_html({label: device_color(i) for i, label in enumerate(data.labels)}))
        else:
            self.device_legend.setText(f"device colours repeat every {LEGEND_MAX_DEVICES}" if n > 1 else "")
        rows = -(-n // MEMORY_COLUMNS) if n else 1
        self.mem_view.setMinimumHeight(rows * MEMORY_ROW_PX)
        # pyqtgraph fits its central layout to the view only on a resize; re-laying out the
        # grid (other devices) left it at its own preferred size, a corner of the view.
        QTimer.singleShot(0, self._fit_memory_layout)
        self._fit_memory_layout()
        if n != self._split_for:
            self._share_height(n)
        for mp in self.mem_plots:
            if mp.plot.scene() is not None:
                self.mem_layout.removeItem(mp.plot)
        # No devices (before the first run, or between Start and its devices): the hint.
        self.mem_pages.setCurrentWidget(self.mem_scroll if n else self.mem_hint)
        for i, mp in enumerate(self.mem_plots):
            mp.clear()
            if i < n:
                mp.plot.setTitle(data.devices[i].label, size="9pt")
                mp.set_prediction(self._peak(i))
                self.mem_layout.addItem(mp.plot, row=i // MEMORY_COLUMNS, col=i % MEMORY_COLUMNS)
            mp.plot.setVisible(i < n)
        for i, curve in enumerate(self.util_curves):
            curve.setVisible(i < n)

    def _share_height(self, n: int) -> None:
        """Give each part of the splitter its share of the height for n devices (the
        splitter would otherwise keep the shares of the first layout it saw)."""
        total = sum(self.split.sizes())
        if total <= 0:
            return
        self._split_for = n
        self.split.setSizes([int(total * f) for f in SPLIT_SHARES])

    def showEvent(self, event) -> None:  # noqa: N802 (Qt's name)
        super().showEvent(event)
        if self._split_for is None:
            self._share_height(0)

    def _fit_memory_layout(self) -> None:
        view = self.mem_view
        view.ci.layout.activate()
        view.ci.setGeometry(QRectF(0, 0, view.width(), view.height()))

    def _make_slots(self, n: int) -> None:
        if len(self.mem_plots) >= n:
            return
        while len(self.mem_plots) < n:
            self.mem_plots.append(MemoryPlot(pg.PlotItem()))
        while len(self.util_curves) < n:
            self.util_curves.append(line_curve(self.util_plot, device_color(len(self.util_curves))))
        self._apply_palette()

    def _peak(self, device: int) -> int | None:
        entry = self._prediction.get(device)
        return int(entry["peak_bytes"]) if entry and "peak_bytes" in entry else None

    # ---- theme ----------------------------------------------------------------------------------

    def changeEvent(self, event: QEvent) -> None:  # noqa: N802 (Qt's name)
        if event.type() in (QEvent.Type.PaletteChange, QEvent.Type.StyleChange):
            self._apply_palette()
        super().changeEvent(event)

    def _apply_palette(self) -> None:
        # Plots follow the Qt palette, so the app's light and dark themes both apply.
        pal = self.palette()
        bg, fg = pal.color(pal.ColorRole.Base), pal.color(pal.ColorRole.Text)
        self.plots.setBackground(bg)
        self.mem_view.setBackground(bg)
        self.timeline.plot.setBackground(bg)
        self.timeline.set_text_color(fg)
        plots = [self.loss_plot, self.rate_plot, self.util_plot, self.timeline.plot.getPlotItem(),
                 *(mp.plot for mp in self.mem_plots)]
        for plot in plots:
            for name in ("left", "bottom"):
                axis = plot.getAxis(name)
                axis.setPen(fg)
                axis.setTextPen(fg)
            plot.titleLabel.setText(plot.titleLabel.text, color=fg.name())
        for placeholder in self.placeholders.values():
            placeholder.set_color(fg)
        self.ghost_legend.setLabelTextColor(fg)
