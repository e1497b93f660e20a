"""The device mesh drawn as a grid of devices, and its axes' groups lit on demand.

A run of mode=mesh lays its gauges out as the mesh: pipeline stages left to right with
their tensor-parallel slices side by side, replicas and shards down (`columns`), so
each cell is a device and carries its gauge.  Picking an axis tints every group of that axis
(the devices that differ only along it: the ones that talk to each other for it) in its
own colour, and a caption says what that axis's groups do.
"""

from __future__ import annotations

from PySide6.QtCore import Signal
from PySide6.QtWidgets import QComboBox, QHBoxLayout, QLabel, QWidget

from ..core import devices
from ..core.config import ConfigError, RunConfig
from ..core.plan import AXES, AXIS, Plan

GROUP_COLORS = ("#0072B2", "#E69F00", "#009E73", "#CC79A7", "#56B4E9", "#D55E00", "#F0E442", "#999999")


def plan_of(cfg: RunConfig | None, n_devices: int) -> Plan | None:
    """The mesh to draw: only for mode=mesh whose degrees match the devices."""
    if cfg is None or cfg.mode != "mesh":
        return None
    plan = Plan.of(cfg, n_devices)
    return plan if plan.world == n_devices and n_devices > 0 else None


def preview_plan(cfg: RunConfig | None) -> Plan | None:
    """The mesh of a config not yet run (the form's), from its device spec's count."""
    if cfg is None:
        return None
    try:
        n = devices.count(cfg.devices)
    except ConfigError:
        return None
    return plan_of(cfg, n or 0)


def columns(plan: Plan) -> int:
    """Stages read left to right, each stage's tensor-parallel slices side by side; the
    replicas and shards are the rows (a mesh of those alone: replicas down, shards across)."""
    if plan.pp * plan.tp > 1:
        return plan.pp * plan.tp
    return plan.shard if plan.dp > 1 else plan.dp * plan.shard


def cell(plan: Plan, rank: int) -> tuple[int, int]:
    """(row, column) of a rank in the grid `columns` describes."""
    c = plan.coordinate(rank)
    if plan.pp * plan.tp > 1:
        return c["dp"] * plan.shard + c["shard"], c["pp"] * plan.tp + c["tp"]
    if plan.dp > 1 and plan.shard > 1:
        return c["dp"], c["shard"]
    return 0, c["dp"] * plan.shard + c["shard"]


def groups(plan: Plan, axis: str) -> list[list[int]]:
    """The ranks that differ only along `axis`, group by group."""
    found: dict[tuple, list[int]] = {}
    for r in range(plan.world):
        c = plan.coordinate(r)
        found.setdefault(tuple(v for a, v in c.items() if a != axis), []).append(r)
    return list(found.values())


def tints(plan: Plan, axis: str) -> dict[int, str]:
    """rank -> its group's colour along `axis` ({} when the axis has one device per group)."""
    if getattr(plan, axis) < 2:
        return {}
    return {r: GROUP_COLORS[g % len(GROUP_COLORS)] for g, ranks in enumerate(groups(plan, axis)) for r in ranks}


class AxisPicker(QWidget):
    """'Light up: [axis]' and what the lit groups do; emits the axis ('' for none)."""

    picked = Signal(str)

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.combo = QComboBox()
        self.combo.setToolTip("Tint each group of devices that work together along one axis of the mesh.")
        self.caption = QLabel(wordWrap=True)
        row = QHBoxLayout(self)
        row.setContentsMargins(0, 0, 0, 0)
        row.addWidget(QLabel("Mesh groups:"))
        row.addWidget(self.combo)
        row.addWidget(self.caption, 1)
        self.combo.currentIndexChanged.connect(self._changed)
        self._plan: Plan | None = None

    def set_plan(self, plan: Plan | None) -> None:
        self._plan = plan
        self.setVisible(plan is not None)
        axes = [a for a in AXES if plan is not None and getattr(plan, a) > 1]
        current = self.combo.currentData()
        self.combo.blockSignals(True)
        self.combo.clear()
        self.combo.addItem("none", "")
        for a in axes:
            self.combo.addItem(f"{a} ({getattr(plan, a)} each)", a)
        self.combo.setCurrentIndex(max(0, self.combo.findData(current)))
        self.combo.blockSignals(False)
        self._changed()

    def _changed(self, *_: object) -> None:
        axis = self.combo.currentData() or ""
        mesh = f"the mesh: {self._plan.describe()}" if self._plan else ""
        self.caption.setText(AXIS[axis].groups if axis in AXIS else mesh)
        self.picked.emit(axis)
