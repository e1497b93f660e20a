"""CompareView: two to four runs side by side — loss overlaid, each device's memory by
category at its peak, step time and throughput, one step's timeline each, and what differs
between their configs.

The figures come from core.compare (RunSummary); this module only draws them.  Curves and
bar items are made once, in the constructor, and only get `setData`/`setOpts` afterwards
(pyqtgraph #2665, #2672: items leak when re-created).  `render_png` draws the same view
off screen for `paralab compare --png`.
"""

from __future__ import annotations

import html
import math
import os
from pathlib import Path

import numpy as np
import pyqtgraph as pg
from PySide6.QtCore import QEvent, Qt
from PySide6.QtWidgets import QLabel, QVBoxLayout, QWidget

from ..core.compare import MAX_RUNS, RunSummary, differences_text
from ..core.config import human_bytes
from ..core.events import CATEGORIES, PHASES
from .buffers import MIB
from .style import CATEGORY_COLORS, PHASE_COLORS, device_color, legend_html

BAR_WIDTH = 0.8
PNG_SIZE = (1500, 1150)


def run_color(index: int) -> str:
    return device_color(index)


class CompareView(QWidget):
    """Draws a list of RunSummary; `set_runs` may be called again with other runs."""

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.runs: list[RunSummary] = []
        self.plots = pg.GraphicsLayoutWidget()
        self.loss_plot = self.plots.addPlot(row=0, col=0, colspan=2, title="loss · x: step")
        self.legend = self.loss_plot.addLegend(offset=(-10, 10))
        self.loss_curves = [self.loss_plot.plot(pen=pg.mkPen(run_color(i))) for i in range(MAX_RUNS)]
        self.memory_plot = self.plots.addPlot(row=1, col=0, colspan=2,
                                              title="peak memory per device, by category (MiB)")
        # One bar item per category: its bars stand on the categories below it.
        self.memory_bars = {c: pg.BarGraphItem(x=[], height=[], width=BAR_WIDTH, brush=CATEGORY_COLORS[c],
                                               pen=pg.mkPen(None)) for c in CATEGORIES}
        for item in self.memory_bars.values():
            self.memory_plot.addItem(item)
        self.step_plot = self.plots.addPlot(row=2, col=0, title="mean step time (ms)")
        self.rate_plot = self.plots.addPlot(row=2, col=1, title="throughput (samples/s)")
        self.step_bars = pg.BarGraphItem(x=[], height=[], width=BAR_WIDTH, brushes=[])
        self.rate_bars = pg.BarGraphItem(x=[], height=[], width=BAR_WIDTH, brushes=[])
        self.step_plot.addItem(self.step_bars)
        self.rate_plot.addItem(self.rate_bars)
        self.timeline_plot = self.plots.addPlot(row=3, col=0, colspan=2,
                                                title="one step each, per device · x: ms in the run's clock")
        self.timeline_plot.invertY(True)  # run A on top, as in the table
        # One item per phase; each of its rectangles is a span of some run's device.
        self.phase_bars = {p: pg.BarGraphItem(x0=[], x1=[], y0=[], height=[], brush=PHASE_COLORS[p],
                                              pen=pg.mkPen(None)) for p in PHASES}
        for item in self.phase_bars.values():
            self.timeline_plot.addItem(item)
        self.all_plots = (self.loss_plot, self.memory_plot, self.step_plot, self.rate_plot, self.timeline_plot)
        for plot in self.all_plots:
            plot.getAxis("left").enableAutoSIPrefix(False)
            plot.setMenuEnabled(False)
        self.plots.ci.layout.setRowStretchFactor(0, 3)
        self.plots.ci.layout.setRowStretchFactor(1, 3)
        self.plots.ci.layout.setRowStretchFactor(2, 2)
        self.plots.ci.layout.setRowStretchFactor(3, 2)
        self.category_legend = QLabel(legend_html(CATEGORY_COLORS) + " &nbsp; &nbsp; " + legend_html(PHASE_COLORS))
        self.summary = QLabel(textFormat=Qt.TextFormat.RichText, wordWrap=True)
        self.summary.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        layout = QVBoxLayout(self)
        layout.addWidget(self.summary)
        layout.addWidget(self.category_legend)
        layout.addWidget(self.plots, 1)
        self._apply_palette()

    def changeEvent(self, event: QEvent) -> None:  # noqa: N802 (Qt's name)
        if event.type() in (QEvent.Type.PaletteChange, QEvent.Type.StyleChange):
            self._apply_palette()
        super().changeEvent(event)

    def _apply_palette(self) -> None:
        # Plots follow the Qt palette (light or dark theme), as the dashboard's do.
        pal = self.palette()
        fg = pal.color(pal.ColorRole.Text)
        self.plots.setBackground(pal.color(pal.ColorRole.Base))
        self.legend.setLabelTextColor(fg)
        for plot in self.all_plots:
            for name in ("left", "bottom"):
                plot.getAxis(name).setPen(fg)
                plot.getAxis(name).setTextPen(fg)
            plot.titleLabel.setText(plot.titleLabel.text, color=fg.name())

    # ---- drawing --------------------------------------------------------------------------------

    def set_runs(self, runs: list[RunSummary]) -> None:
        self.runs = list(runs)[:MAX_RUNS]
        self.legend.clear()
        n = len(self.runs)
        for i, curve in enumerate(self.loss_curves):
            run = self.runs[i] if i < n else None
            # Modes of one model train to the same curve: each run's line is thinner than the
            # one before, so identical curves still show every colour instead of only the last.
            curve.setPen(pg.mkPen(run_color(i), width=1 + 1.5 * max(n - 1 - i, 0)))
            curve.setVisible(run is not None)
            if run is None:
                curve.setData([], [])
                continue
            curve.setData(np.asarray(run.steps, dtype=float), np.asarray(run.losses, dtype=float),
                          connect="finite")
            self.legend.addItem(curve, f"{run.name}: {run.start.mode} on {run.config.get('devices', '?')}")
        self.loss_plot.enableAutoRange()
        self._draw_memory()
        self._draw_speed()
        self._draw_timeline()
        self.summary.setText(self.summary_html())

    def _draw_memory(self) -> None:
        xs, ticks, tops = [], [], []
        x = 0.0
        for run in self.runs:
            for p in run.peaks:
                xs.append(x)
                ticks.append((x, f"{run.name} {p.label}"))
                tops.append([p.bytes[c] / MIB for c in CATEGORIES])
                x += 1.0
            x += 0.6  # a gap between runs
        heights = np.asarray(tops, dtype=float).reshape(len(xs), len(CATEGORIES))
        bottoms = np.cumsum(heights, axis=1) - heights
        for k, c in enumerate(CATEGORIES):
            self.memory_bars[c].setOpts(x=np.asarray(xs), height=heights[:, k], y0=bottoms[:, k], width=BAR_WIDTH)
        self.memory_plot.getAxis("bottom").setTicks([ticks])
        self.memory_plot.enableAutoRange()

    def _draw_speed(self) -> None:
        xs = np.arange(len(self.runs), dtype=float)
        brushes = [pg.mkBrush(run_color(i)) for i in range(len(self.runs))]
        step = [(r.mean_step_s or 0.0) * 1e3 for r in self.runs]
        rate = [r.samples_per_s or 0.0 for r in self.runs]
        self.step_bars.setOpts(x=xs, height=np.asarray(step), brushes=brushes, width=BAR_WIDTH)
        self.rate_bars.setOpts(x=xs, height=np.asarray(rate), brushes=brushes, width=BAR_WIDTH)
        ticks = [[(float(i), r.name) for i, r in enumerate(self.runs)]]
        for plot in (self.step_plot, self.rate_plot):
            plot.getAxis("bottom").setTicks(ticks)
            plot.enableAutoRange()

    def _draw_timeline(self) -> None:
        rows: dict[str, list[tuple[float, float, float]]] = {p: [] for p in PHASES}
        ticks = []
        row = 0
        for run in self.runs:
            devices = sorted({d for d, *_ in run.timeline})
            labels = {p.device: p.label for p in run.peaks}
            for d in devices:
                ticks.append((float(row + devices.index(d)), f"{run.name} {labels.get(d, d)} · step {run.timeline_step}"))
            for d, phase, start, end in run.timeline:
                if phase in rows:
                    rows[phase].append((start * 1e3, end * 1e3, row + devices.index(d)))
            row += len(devices)
        for phase, item in self.phase_bars.items():
            spans = np.asarray(rows[phase], dtype=float).reshape(-1, 3)
            item.setOpts(x0=spans[:, 0], x1=spans[:, 1], y0=spans[:, 2] - 0.4, height=np.full(len(spans), 0.8))
        self.timeline_plot.getAxis("left").setTicks([ticks])
        self.timeline_plot.enableAutoRange()

    def summary_html(self) -> str:
        """The runs as a small table and what differs between their configs."""
        def num(x: float | None, fmt: str = "{:.4g}") -> str:
            return "–" if x is None or not math.isfinite(x) else fmt.format(x)

        head = "".join(f"<th align='left'>{h}&nbsp;&nbsp;</th>" for h in (
            "run", "mode", "devices", "final loss", "min loss", "step time", "samples/s", "largest peak", "status"))
        rows = []
        for i, r in enumerate(self.runs):
            peak = max((p.peak_bytes for p in r.peaks), default=0)
            cells = (f"<span style='color:{run_color(i)}'>&#9632;</span> {r.name}", r.start.mode,
                     str(r.config.get("devices", "")), num(r.final_loss), num(r.min_loss),
                     num(None if r.mean_step_s is None else r.mean_step_s * 1e3, "{:.3g} ms"),
                     num(r.samples_per_s, "{:,.0f}"), human_bytes(peak), r.status)
            rows.append("<tr>" + "".join(f"<td>{html.escape(str(c)) if j else c}&nbsp;&nbsp;</td>"
                                         for j, c in enumerate(cells)) + "</tr>")
        clocks = "; ".join(sorted({html.escape(r.clock) for r in self.runs}))
        diffs = "".join(f"<li>{html.escape(line)}</li>" for line in differences_text(self.runs)) \
            if len(self.runs) > 1 else ""
        return (f"<table>{'<tr>' + head + '</tr>'}{''.join(rows)}</table>"
                f"<small>times in the run's clock: {clocks}</small>"
                + (f"<br><b>What differs from {html.escape(self.runs[0].name)}:</b><ul>{diffs}</ul>" if diffs else ""))


def render_png(runs: list[RunSummary], path: str | Path) -> None:
    """Draw the comparison off screen into a PNG (for `paralab compare --png`)."""
    # No window is shown: without a display, Qt's offscreen platform draws just as well.
    if not (os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY")):
        os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
    from PySide6.QtCore import qInstallMessageHandler
    from PySide6.QtWidgets import QApplication

    # The offscreen platform warns about window hints it has no use for: not the person's concern.
    qInstallMessageHandler(lambda *_: None)
    app = QApplication.instance() or QApplication(["paralab-compare"])
    view = CompareView()
    view.resize(*PNG_SIZE)
    view.set_runs(runs)
    view.setAttribute(Qt.WidgetAttribute.WA_DontShowOnScreen)  # laid out at its size, never on screen
    view.show()
    app.processEvents()
    ok = view.grab().save(str(path), "PNG")
    view.close()
    view.deleteLater()
    if not ok:
        raise OSError(0, "the PNG could not be written", str(path))
