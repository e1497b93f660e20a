"""Colours shared by every live view, so a category or a phase looks the same everywhere.

The palette is Okabe–Ito (colour-blind safe) at mid lightness: each colour keeps its
contrast on a white and on a near-black background, so the light and the dark theme
share it.  Text colours are not set here: widgets take them from the Qt palette.
"""

from __future__ import annotations

from PySide6.QtGui import QColor, QPalette

from ..core.events import CATEGORIES, PHASES

CATEGORY_COLORS: dict[str, str] = {
    "params": "#0072B2",       # blue: the weights themselves
    "grads": "#E69F00",        # orange
    "optimizer": "#009E73",    # green: Adam's moments and friends
    "activations": "#CC79A7",  # purple: what forward keeps for backward
    "temporaries": "#F0E442",  # yellow: alive only inside a phase (activation grads, gathered weights)
    "other": "#8C8C8C",        # grey: batch, outputs, loss, allocator slack
}
PHASE_COLORS: dict[str, str] = {
    "forward": "#56B4E9",        # light blue
    "backward": "#D55E00",       # vermilion
    "recompute": "#F4A582",      # pale vermilion: backward running a block's forward again
    "optimizer": "#009E73",      # green, as the optimizer's memory
    "communication": "#E6C700",  # yellow
    "idle": "#9A9A9A",           # grey: the bubble
}
# Per-device lines: none of the memory categories' colours, so a device's line is never
# read as "grads" or "params" beside the stacked areas.
DEVICE_COLORS = ("#D55E00", "#17BECF", "#7B3294", "#8C510A", "#BCBD22", "#3F51B5", "#E7298A", "#01665E")
GHOST_COLOR = "#9AA0A6"       # faint grey: the previous run, behind this one
CAPACITY_COLOR = "#D62728"     # the line a device must stay under
PREDICTION_COLOR = "#8E44AD"   # the estimate drawn before the run
OOM_COLOR = "#D62728"
MARKER_COLORS: dict[str, str] = {
    "pause": "#5E81AC",   # slate blue: the run held still here
    "lr": "#2E7D32",      # dark green: the learning rate changed, with its new value
    "end": "#6B6E74",     # grey: finished or stopped
    "oom": OOM_COLOR,     # red: out of memory
    "error": OOM_COLOR,   # red: a rank failed
}

assert set(CATEGORY_COLORS) == set(CATEGORIES) and set(PHASE_COLORS) == set(PHASES)
assert not {c.upper() for c in DEVICE_COLORS} & {c.upper() for c in CATEGORY_COLORS.values()}


def device_color(index: int) -> str:
    return DEVICE_COLORS[index % len(DEVICE_COLORS)]


def qcolor(hex_color: str, alpha: int = 255) -> QColor:
    c = QColor(hex_color)
    c.setAlpha(alpha)
    return c


def is_dark(palette: QPalette) -> bool:
    return palette.color(QPalette.ColorRole.Window).lightness() < 128


def legend_html(colors: dict[str, str]) -> str:
    """A one-line legend for a QLabel: a coloured square before each name."""
    return " &nbsp; ".join(f'<span style="color:{c}">&#9632;</span> {name}' for name, c in colors.items())

