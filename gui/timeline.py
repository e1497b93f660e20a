"""Timeline: which device is busy when, over the most recent sampled steps.

Ranks record phase spans only on sampled steps (a few per second), and each rank picks
its own, so the view shows the last few step numbers that have spans, side by side:
each step is drawn from the earliest span any device recorded in it, in milliseconds,
so devices that sampled the same step line up as they ran (a pipeline's staircase).

Next to it, per device, the measured idle share: the part of the shown steps' time in
which the device ran no recorded work (forward, backward, optimizer, communication);
explicit idle spans and unrecorded gaps both count.  In pipeline mode the GPipe bubble
formula (p − 1) / (m + p − 1) is printed beside it for comparison.

Drawing: one BarGraphItem per phase holds the bars of every device and is updated
with setOpts; nothing is created per frame.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pyqtgraph as pg
from PySide6.QtCore import Qt
from PySide6.QtGui import QColor
from PySide6.QtWidgets import QCheckBox, QGraphicsItem, QHBoxLayout, QLabel, QVBoxLayout, QWidget

from ..core.config import human_bytes
from ..core.events import PHASES
from ..core.spans import WORK, covered, ideal_bubble
from .buffers import PHASE_INDEX, RunData
from .plot_items import Placeholder
from .style import PHASE_COLORS, legend_html

BUSY = np.array([PHASE_INDEX[p] for p in WORK], dtype=float)  # core.spans: what idle is not
ROW_HEIGHT = 0.7
ROW_PX = 14
MANY_DEVICES = 8  # past this, the idle shares are summarised instead of listed


@dataclass
class Window:
    """What the timeline shows, computed from the span rings (pure numpy, no Qt)."""

    steps: list[int] = field(default_factory=list)
    offsets_ms: list[float] = field(default_factory=list)
    """Where each shown step starts on the x axis."""
    lengths_ms: list[float] = field(default_factory=list)
    bars: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]] = field(default_factory=dict)
    """phase -> (x0 ms, width ms, row) of its bars."""
    idle: list[float | None] = field(default_factory=list)
    """Per device: idle share of the shown steps (None: the device recorded none of them)."""


def compute_window(data: RunData, n_steps: int = 2, gap: float = 0.04) -> Window:
    """The last n_steps step numbers with spans on any device, laid out side by side."""
    rows = []
    for i, d in enumerate(data.devices):
        cols = [d.spans.column(c) for c in range(4)]
        rows.append((i, *cols))
    all_steps = np.concatenate([r[4] for r in rows]) if rows else np.empty(0)
    win = Window()
    if len(all_steps) == 0:
        win.idle = [None] * len(rows)
        win.bars = {p: (np.empty(0), np.empty(0), np.empty(0)) for p in PHASES}
        return win
    steps = np.unique(all_steps)[-n_steps:]
    # A step spans from its first start to its last end over all devices.
    lo = np.array([min(r[1][r[4] == s].min() for r in rows if (r[4] == s).any()) for s in steps])
    hi = np.array([max(r[2][r[4] == s].max() for r in rows if (r[4] == s).any()) for s in steps])
    lengths = (hi - lo) * 1000.0
    offsets = np.concatenate([[0.0], np.cumsum(lengths + gap * lengths.sum())[:-1]])
    win.steps = [int(s) for s in steps]
    win.offsets_ms, win.lengths_ms = offsets.tolist(), lengths.tolist()
    parts: dict[str, list] = {p: [[], [], []] for p in PHASES}
    for i, start, end, phase, step in rows:
        shown = np.isin(step, steps)
        start, end, phase, step = start[shown], end[shown], phase[shown], step[shown]
        k = np.searchsorted(steps, step)
        x0 = offsets[k] + (start - lo[k]) * 1000.0
        for j, p in enumerate(PHASES):
            sel = phase == j
            parts[p][0].append(x0[sel])
            parts[p][1].append((end - start)[sel] * 1000.0)
            parts[p][2].append(np.full(int(sel.sum()), float(i)))
        work = np.isin(phase, BUSY)
        window_s = float((hi - lo)[np.unique(k)].sum())
        busy_s = sum(covered(zip(start[work & (k == j)], end[work & (k == j)])) for j in np.unique(k))
        win.idle.append(max(0.0, 1.0 - busy_s / window_s) if window_s > 0 else None)
    win.bars = {p: tuple(np.concatenate(v) if v else np.empty(0) for v in parts[p]) for p in PHASES}
    return win


def clock_text(data: RunData) -> tuple[str, str]:
    """Which clock the spans are in, and on a modelled one what it says of each device's
    step: MFU, the share of its communication hidden under compute, bytes and bus bandwidth."""
    start = data.start
    if start is None or start.clock == "host":
        return "Host time (measured).  ", ""
    if data.viewing_host:
        return f"Host time (measured); the run's clock is {start.clock}.  ", ""
    figures = []
    for d in data.devices:
        x = d.util_extra
        if "mfu" in x:
            comm = (f", comm {human_bytes(int(x['comm_bytes']))} at {x['busbw_gbs']:.0f} GB/s bus, "
                    f"{x['overlap']:.0%} hidden" if x.get("comm_bytes") else "")
            figures.append(f"{d.label} MFU {x['mfu']:.1%}{comm}")
    shown = "; ".join(figures[:4]) + ("; …" if len(figures) > 4 else "")
    return f"{start.clock[0].upper()}{start.clock[1:]}.  ", (f"  ·  {shown}." if figures else "")


class Timeline(QWidget):
    """Per-device rows of phase spans for the latest sampled steps, with idle shares."""

    def __init__(self, n_steps: int = 2, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.n_steps = n_steps
        self.plot = pg.PlotWidget()
        item = self.plot.getPlotItem()
        item.invertY(True)  # device 0 on top, as in the gauges
        item.setMouseEnabled(x=True, y=False)
        item.hideButtons()
        item.setLabel("bottom", "ms (each shown step starts at its label)")
        self.bars: dict[str, pg.BarGraphItem] = {}
        for p in PHASES:
            bar = pg.BarGraphItem(x0=np.empty(0), width=np.empty(0), y0=np.empty(0), height=ROW_HEIGHT,
                                  pen=None, brush=PHASE_COLORS[p])
            item.addItem(bar)
            self.bars[p] = bar
        # One label per shown step, made once and moved: cheaper than axis ticks, which
        # would lay the whole axis out again on every update.
        self.step_labels = [pg.TextItem(anchor=(0, 1)) for _ in range(n_steps)]
        for label in self.step_labels:
            item.addItem(label)
        for name in ("left", "bottom"):  # see Dashboard: cached axes repaint as a copy
            item.getAxis(name).setCacheMode(QGraphicsItem.CacheMode.DeviceCoordinateCache)
        self._x_span = 0.0
        self.placeholder = Placeholder(item, "Which device is busy when (forward, backward, communication, idle)\n"
                                             "appears here for a few sampled steps of the run.")
        self.legend = QLabel(legend_html(PHASE_COLORS))
        self.info = QLabel("")
        self.info.setWordWrap(True)
        self.info.setAlignment(Qt.AlignmentFlag.AlignLeft | Qt.AlignmentFlag.AlignTop)  # a cut takes the end, not both ends
        # Three lines, always: a label that grows with its text would resize the plot above.
        # Two cut off the idle shares behind a modelled clock's figures once a lesson dock
        # narrowed the view; the tooltip holds the whole text wherever it is cut.
        self.info.setFixedHeight(3 * self.info.fontMetrics().lineSpacing() + 4)
        layout = QVBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        layout.addWidget(self.plot, 1)
        row = QHBoxLayout()  # legend and idle shares side by side: a line less of height
        row.addWidget(self.legend, 0, Qt.AlignmentFlag.AlignTop)
        row.addWidget(self.info, 1)
        # A modelled run can be shown in the host's measured time too (the CPU's contention).
        self.host_time = QCheckBox("host time")
        self.host_time.setToolTip("Show the host CPU's measured time instead of the modelled GPU's")
        self.host_time.setVisible(False)
        self.host_time.toggled.connect(self._view_host_time)
        row.addWidget(self.host_time, 0, Qt.AlignmentFlag.AlignTop)
        layout.addLayout(row)
        self.window = Window()
        self._data: RunData | None = None
        self._seen = -1
        self._rows = -1

    def _view_host_time(self, host: bool) -> None:
        if self._data is not None:
            self._data.view_host_time(host)
            self.refresh(self._data, force=True)

    def refresh(self, data: RunData, force: bool = False) -> bool:
        self._data = data
        modelled = data.clock == "modelled"
        if self.host_time.isVisibleTo(self) != modelled:
            self.host_time.setVisible(modelled)
        if self.host_time.isChecked() != data.viewing_host:  # a new run shows its own clock again
            self.host_time.blockSignals(True)
            self.host_time.setChecked(data.viewing_host)
            self.host_time.blockSignals(False)
        if data.span_version == self._seen and not force:
            return False
        self._seen = data.span_version
        win = self.window = compute_window(data, self.n_steps)
        for p, (x0, width, row) in win.bars.items():
            self.bars[p].setOpts(x0=x0, width=width, y0=row + (1 - ROW_HEIGHT) / 2, height=ROW_HEIGHT)
        item = self.plot.getPlotItem()
        n = len(data.devices)
        if n != self._rows:
            self._rows = n
            # Rows stay readable however many devices: the view scrolls (Dashboard) instead.
            self.plot.setMinimumHeight(40 + ROW_PX * n)
            item.getAxis("left").setTicks([[(i + 0.5, label) for i, label in enumerate(data.labels)]])
            item.setYRange(-0.4, max(n, 1), padding=0)  # room above row 0 for the step labels
        if win.steps:
            self.placeholder.hide()
        self._place_steps(win)
        self.info.setText(self._describe(data, win))
        self.info.setToolTip(self.info.text())
        return True

    def _place_steps(self, win: Window) -> None:
        for i, label in enumerate(self.step_labels):
            label.setVisible(i < len(win.steps))
            if i < len(win.steps):
                label.setText(f"step {win.steps[i]}")
                label.setPos(win.offsets_ms[i], 0.0)
        total = win.offsets_ms[-1] + win.lengths_ms[-1] if win.steps else 0.0
        # Re-range only when the steps outgrow the view or fill under half of it: the
        # axis lays its ticks out again on every range change.
        if total > 0 and not 0.5 * self._x_span <= total <= self._x_span:
            self._x_span = total * 1.3
            self.plot.getPlotItem().setXRange(0, self._x_span, padding=0)

    def _describe(self, data: RunData, win: Window) -> str:
        if not win.steps:
            return "No phase spans yet: ranks record them on sampled steps."
        if len(data.labels) > MANY_DEVICES and any(s is not None for s in win.idle):
            known = [(s, label) for s, label in zip(win.idle, data.labels) if s is not None]
            lo, hi = min(known), max(known)
            text = (f"Idle share of the shown steps: from {lo[0]:.0%} ({lo[1]}) to {hi[0]:.0%} ({hi[1]}), "
                    f"mean {sum(s for s, _ in known) / len(known):.0%} over {len(known)} devices")
        else:
            shares = ", ".join(f"{label} {share:.0%}" if share is not None else f"{label} –"
                               for label, share in zip(data.labels, win.idle))
            text = f"Idle share of the shown steps: {shares}"
        # The clock first (every time figure says which), then the idle shares: the line a
        # person (or a lesson) reads here; the per-device figures last, where a cut hurts least.
        clock, figures = clock_text(data)
        text = clock + text
        if data.mode == "pipeline":
            p = len(data.devices)
            m = int(data.config.get("train", {}).get("micro_batches", 1))
            text += (f"  ·  pipeline bubble by formula (p−1)/(m+p−1) = ({p}−1)/({m}+{p}−1) = "
                     f"{ideal_bubble(p, m):.0%}")
        return text + figures

    def set_text_color(self, color: QColor) -> None:
        self.placeholder.set_color(color)
        for label in self.step_labels:
            label.setColor(color)

    def clear(self) -> None:
        for bar in self.bars.values():
            bar.setOpts(x0=np.empty(0), width=np.empty(0), y0=np.empty(0))
        self.info.setText("")
        for label in self.step_labels:
            label.hide()
        self.window = Window()
        self._data: RunData | None = None
        self._seen = -1
        self._x_span = 0.0
        self._rows = -1  # the placeholder's neutral range replaced the rows': set them again
        self.placeholder.show()
