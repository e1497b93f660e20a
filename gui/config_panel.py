"""ConfigPanel: the form that builds a RunConfig.

The form never parses anything itself: every field's value goes through
`config.set_value` (the same conversion the CLI's --set and TOML files use), and the
problems shown are the sentences of `validation.problems(cfg)`.  The predicted memory per
device is the PredictionBox's (gui.prediction_box): `core.estimate` in its own process,
once the settings have been still for a moment.
"""

from __future__ import annotations

import re
from typing import Any

from PySide6.QtCore import QEvent, QObject, Qt, Signal
from PySide6.QtWidgets import (
    QAbstractSpinBox,
    QApplication,
    QButtonGroup,
    QCheckBox,
    QComboBox,
    QFormLayout,
    QGroupBox,
    QHBoxLayout,
    QHeaderView,
    QLabel,
    QLineEdit,
    QPushButton,
    QRadioButton,
    QScrollArea,
    QSpinBox,
    QTableWidget,
    QTableWidgetItem,
    QVBoxLayout,
    QWidget,
)

from ..core import devices as core_devices
from ..core import preflight, validation
from ..core.config import (
    CHECKPOINTING,
    DATASETS,
    MODELS,
    OPTIMIZERS,
    PRECISIONS,
    SCHEDULES,
    ConfigError,
    RunConfig,
    field_docs,
    get_value,
    human_bytes,
    set_value,
    shown,
)
from ..core.models import layer_names, split_layers
from ..core.modes import MODES, REGISTRY
from ..core.plan import AXES, AXIS, Plan
from .prediction_box import PredictionBox

# The form's own words for the config keys its fields set: a problem names what a person
# sees ("Capacity each"), not the dotted key a file or --set would use ("sim.memory").
FIELD_LABELS = {
    "mode": "Parallelism", "devices": "Devices", "sim.memory": "Capacity each", "model.kind": "Model",
    "model.width": "Width", "model.depth": "Depth", "model.heads": "Heads", "model.seq_len": "Sequence length",
    "model.vocab": "Vocabulary", "data.kind": "Data", "train.batch_size": "Batch size",
    "train.micro_batches": "Micro-batches", "train.schedule": "Schedule", "train.optimizer": "Optimizer",
    "train.lr": "Learning rate", "train.steps": "Steps", "seed": "Seed",
    "placement.split": "Which device holds which layers",
    "placement.reshard_after_forward": "Reshard after forward",
    **{f"mesh.{a.name}": a.label for a in AXIS.values()},
    "train.grad_accumulation": "Gradient accumulation", "train.activation_checkpointing": "Activation checkpointing",
    "train.precision": "Precision", "placement.zero": "ZeRO stage", "placement.cpu_offload": "CPU offload",
}
# Only dotted keys: "mode", "seed" and "devices" are also plain words of the sentences.
_KEY = re.compile(r"(?<![\w.])(" + "|".join(re.escape(k) for k in sorted(FIELD_LABELS, key=len, reverse=True)
                                           if "." in k)
                  + r")(?![\w.])")


def in_form_words(problem: str) -> str:
    """A problem sentence with each config key the form shows replaced by its label."""
    return _KEY.sub(lambda m: f"“{FIELD_LABELS[m.group(1)]}”", problem)


class _WheelGuard(QObject):
    """The wheel scrolls the form; it changes a field only once that field has focus
    (a person scrolling the panel past Heads must not turn 4 into 1)."""

    def __init__(self, scroll: QScrollArea) -> None:
        super().__init__(scroll)
        self.scroll = scroll

    def guard(self, widget: QWidget) -> None:
        widget.setFocusPolicy(Qt.FocusPolicy.StrongFocus)  # not WheelFocus: a wheel does not take focus
        widget.installEventFilter(self)

    def eventFilter(self, obj: QObject, event: QEvent) -> bool:  # noqa: N802 (Qt's name)
        if event.type() == QEvent.Type.Wheel and isinstance(obj, QWidget) and not obj.hasFocus():
            QApplication.sendEvent(self.scroll.viewport(), event)  # scroll the form instead
            return True
        return False


class ConfigPanel(QWidget):
    """Emits `config_changed(RunConfig | None, problems)` after every edit."""

    config_changed = Signal(object, list)
    estimate_ready = Signal(object)
    """The Estimate for the current config (or None when it cannot be predicted)."""

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self._base = RunConfig()
        self._config: RunConfig | None = None
        self._problems: list[str] = []
        self._split: tuple[int, ...] = ()
        self._loading = False
        self._docs = field_docs()
        self._fields: dict[str, QWidget] = {}
        self._hidden: frozenset[str] = frozenset()
        """Settings a lesson step hides (their values still count)."""
        self._gpus = core_devices.list_gpus()
        self._build()
        self.set_config(RunConfig())

    # ---- public --------------------------------------------------------------------------

    @property
    def estimate(self) -> Any:
        """The Estimate of the current settings, once predicted (None until then)."""
        return self.prediction.estimate

    def config(self) -> RunConfig | None:
        return self._config

    def problems(self) -> list[str]:
        return list(self._problems)

    def shutdown(self) -> None:
        """End the prediction process (the window is closing)."""
        self.prediction.shutdown()

    def set_locked(self, locked: bool) -> None:
        """Lock the form while a run goes (its settings are the run's); the text stays readable."""
        self.form.setEnabled(not locked)

    def beyond_the_form(self, cfg: RunConfig) -> str:
        """A sentence when a value of cfg is outside what the form's fields can hold, else ''."""
        for key, box in self._spins.items():
            value = get_value(cfg, key)
            if not box.minimum() <= value <= box.maximum():
                return f"{key} {shown(value)} is outside {box.minimum()}..{box.maximum()}"
        return ""

    def set_hidden(self, keys: frozenset[str] | set[str]) -> None:
        """Hide the fields of these settings (a lesson shows only what its step is about);
        a group whose settings are all hidden goes too.  An empty set shows them all."""
        self._hidden = frozenset(keys)
        for key in FIELD_LABELS:
            for widget in self.control_widgets(key):
                widget.setVisible(key not in self._hidden)
        for box, keys_in_box in self._boxes.items():
            box.setVisible(not all(k in self._hidden for k in keys_in_box))
        self._refresh(self._config or self._base)  # the fields that only some modes show

    def control_widgets(self, key: str) -> list[QWidget]:
        """The widgets that show one setting: its field and the label beside it."""
        if key == "devices":
            widgets = list(self._device_widgets)
        elif key == "placement.split":
            widgets = [self.placement_box]
        elif key == "placement.reshard_after_forward":
            widgets = [self.reshard]
        elif key == "placement.cpu_offload":
            widgets = [self.offload]
        else:
            widgets = [self._fields[key]]
        for form in self.findChildren(QFormLayout):
            for w in list(widgets):
                label = form.labelForField(w)
                if label is not None:
                    widgets.append(label)
        if key == "mode":
            widgets.append(self.mode_notes)
        return widgets

    def set_config(self, cfg: RunConfig) -> None:
        """Show cfg in the form (presets, files, the remembered config)."""
        self._loading = True
        try:
            self._base = cfg
            self._split = cfg.placement.split
            self._set_combo(self.mode, cfg.mode)
            self._show_devices(cfg.devices)
            self.memory.setText(str(cfg.to_dict()["sim"]["memory"]))
            m, t = cfg.model, cfg.train
            self._set_combo(self.model_kind, m.kind)
            self._set_combo(self.data_kind, cfg.data.kind)
            for key, box in self._spins.items():
                box.setValue(get_value(cfg, key))
            self._set_combo(self.schedule, t.schedule)
            self._set_combo(self.optimizer, t.optimizer)
            self._set_combo(self.checkpointing, t.activation_checkpointing)
            self._set_combo(self.precision, t.precision)
            self.lr.setText(repr(t.lr))
            self.reshard.setChecked(cfg.placement.reshard_after_forward)
            self.offload.setChecked(cfg.placement.cpu_offload)
            self.title.setText(cfg.name or "")
            self.title.setVisible(bool(cfg.name))
            self.description.setText(cfg.description or "")
            self.description.setVisible(bool(cfg.description))
        finally:
            self._loading = False
        self._changed()

    # ---- building the form ---------------------------------------------------------------

    def _build(self) -> None:
        # A scrolling form above a fixed footer: the problems and the prediction stay in
        # view whichever field is being edited.
        outer = QVBoxLayout(self)
        outer.setContentsMargins(0, 0, 0, 0)
        scroll = QScrollArea()
        scroll.setWidgetResizable(True)
        scroll.setHorizontalScrollBarPolicy(Qt.ScrollBarPolicy.ScrollBarAlwaysOff)  # the form fits the dock's width
        scroll.setFrameShape(QScrollArea.Shape.NoFrame)
        outer.addWidget(scroll, 1)
        body = QWidget()
        scroll.setWidget(body)
        self.scroll = scroll
        self._wheel = _WheelGuard(scroll)
        top = QVBoxLayout(body)
        self.title = QLabel(objectName="configTitle", wordWrap=True)
        self.description = QLabel(objectName="configDescription", wordWrap=True)
        top.addWidget(self.title)
        top.addWidget(self.description)
        # Everything below the title is the form proper: locked while a run goes.
        self.form = QWidget()
        top.addWidget(self.form)
        top.addStretch(1)
        lay = QVBoxLayout(self.form)
        lay.setContentsMargins(0, 0, 0, 0)

        # Mode
        box = QGroupBox("Parallelism")
        form = QVBoxLayout(box)
        self.mode = self._combo(MODES, "mode")
        self.mode_notes = QLabel(objectName="modeNotes", wordWrap=True)
        form.addWidget(self.mode)
        form.addWidget(self.mode_notes)
        lay.addWidget(box)
        self._boxes = {box: ("mode",)}

        devices_box = self._build_devices()
        lay.addWidget(devices_box)
        self._boxes[devices_box] = ("devices", "sim.memory")

        # Degrees per mesh axis (mode=mesh), outermost first, with their product inline
        self.mesh_box = QGroupBox("Devices per mesh axis")
        mf = QFormLayout(self.mesh_box)
        self._spins: dict[str, QSpinBox] = {}
        for axis in AXES:
            mf.addRow(f"{FIELD_LABELS[f'mesh.{axis}']} ({axis})", self._spin(f"mesh.{axis}", 1, 4096))
        self.mesh_product = QLabel(objectName="meshProduct", wordWrap=True)
        mf.addRow(self.mesh_product)
        lay.addWidget(self.mesh_box)

        # Placement of layers (model-parallel and pipeline)
        self.placement_box = QGroupBox("Which device holds which layers")
        pl = QVBoxLayout(self.placement_box)
        self.placement = QTableWidget(0, 2)
        self.placement.setHorizontalHeaderLabels(["layer", "device"])
        self.placement.horizontalHeader().setSectionResizeMode(0, QHeaderView.ResizeMode.Stretch)
        self.placement.horizontalHeader().setSectionResizeMode(1, QHeaderView.ResizeMode.Fixed)
        self.placement.verticalHeader().setVisible(False)
        self.placement.setToolTip(self._docs["placement.split"])
        self.even_split = QPushButton("Even split")
        self.even_split.setToolTip("Spread the layers as evenly as can be (extra layers on the last devices).")
        self.even_split.clicked.connect(self._on_even_split)
        pl.addWidget(self.placement)
        pl.addWidget(self.even_split, alignment=Qt.AlignmentFlag.AlignRight)
        lay.addWidget(self.placement_box)

        # Model
        box = QGroupBox("Model")
        form = QFormLayout(box)
        self.model_kind = self._combo(MODELS, "model.kind")
        self.data_kind = self._combo(DATASETS, "data.kind")
        form.addRow("Model", self.model_kind)
        for key, label, lo, hi in (("model.width", "Width", 1, 65536), ("model.depth", "Depth", 1, 1024),
                                   ("model.heads", "Heads", 1, 1024), ("model.seq_len", "Sequence length", 1, 65536),
                                   ("model.vocab", "Vocabulary", 2, 1 << 20)):
            form.addRow(label, self._spin(key, lo, hi))
        form.addRow("Data", self.data_kind)
        lay.addWidget(box)
        self._boxes[box] = ("model.kind", "model.width", "model.depth", "model.heads", "model.seq_len",
                            "model.vocab", "data.kind")

        # Training
        box = QGroupBox("Training")
        form = QFormLayout(box)
        form.addRow("Batch size", self._spin("train.batch_size", 1, 1 << 20))
        form.addRow("Micro-batches", self._spin("train.micro_batches", 1, 4096))
        self.schedule = self._combo(SCHEDULES, "train.schedule")
        form.addRow("Schedule", self.schedule)
        self.optimizer = self._combo(OPTIMIZERS, "train.optimizer")
        form.addRow("Optimizer", self.optimizer)
        self.lr = self._line("train.lr")
        form.addRow("Learning rate", self.lr)
        form.addRow("Steps", self._spin("train.steps", 1, 10**9))
        form.addRow("Seed", self._spin("seed", 0, 2**31 - 1))
        self.reshard = QCheckBox("Reshard after forward (FSDP)")
        self.reshard.setToolTip(self._docs["placement.reshard_after_forward"])
        self.reshard.toggled.connect(self._changed)
        form.addRow(self.reshard)
        lay.addWidget(box)
        self._boxes[box] = ("train.batch_size", "train.micro_batches", "train.schedule", "train.optimizer",
                            "train.lr", "train.steps", "seed", "placement.reshard_after_forward")
        self._boxes[self.placement_box] = ("placement.split",)

        # Levers: what a person turns to make a model fit
        box = QGroupBox("Levers")
        form = QFormLayout(box)
        form.addRow("Gradient accumulation", self._spin("train.grad_accumulation", 1, 4096))
        self.checkpointing = self._combo(CHECKPOINTING, "train.activation_checkpointing")
        form.addRow("Activation checkpointing", self.checkpointing)
        self.precision = self._combo(PRECISIONS, "train.precision")
        form.addRow("Precision", self.precision)
        self.zero_label = QLabel("ZeRO stage")
        form.addRow(self.zero_label, self._spin("placement.zero", 0, 3))
        self.offload = QCheckBox("CPU offload (FSDP)")
        self.offload.setToolTip(self._docs["placement.cpu_offload"])
        self.offload.toggled.connect(self._changed)
        form.addRow(self.offload)
        lay.addWidget(box)

        # Footer: problems and the prediction
        footer = QVBoxLayout()
        footer.setContentsMargins(8, 4, 8, 8)
        self.problems_label = QLabel(objectName="problems", wordWrap=True)
        self.problems_label.setTextFormat(Qt.TextFormat.PlainText)
        footer.addWidget(self.problems_label)
        self.prediction = PredictionBox(self)
        self.prediction.ready.connect(self.estimate_ready)
        footer.addWidget(self.prediction)
        outer.addLayout(footer)
        for field in [*body.findChildren(QComboBox), *body.findChildren(QAbstractSpinBox)]:
            self._wheel.guard(field)

    def _build_devices(self) -> QGroupBox:
        box = QGroupBox("Devices")
        box.setToolTip(self._docs["devices"])
        v = QVBoxLayout(box)
        self.device_kind = QButtonGroup(self)
        self.dev_auto = QRadioButton("Automatic (every GPU, or 2 simulated)")
        self.dev_sim = QRadioButton("Simulated on the CPU")
        self.dev_gpu = QRadioButton("GPUs")
        for i, b in enumerate((self.dev_auto, self.dev_sim, self.dev_gpu)):
            self.device_kind.addButton(b, i)
        self.device_kind.idToggled.connect(lambda _id, on: on and self._changed())

        v.addWidget(self.dev_auto)
        v.addWidget(self.dev_sim)
        row = QFormLayout()
        row.setContentsMargins(24, 0, 0, 0)
        self.sim_count = QSpinBox(minimum=1, maximum=64)
        self.sim_count.setToolTip("How many simulated devices.")
        self.sim_count.valueChanged.connect(self._changed)
        self.memory = self._line("sim.memory")
        row.addRow("Devices", self.sim_count)
        row.addRow("Capacity each", self.memory)
        v.addLayout(row)

        v.addWidget(self.dev_gpu)
        gpu_box = QWidget()
        g = QVBoxLayout(gpu_box)
        g.setContentsMargins(24, 0, 0, 0)
        self.gpu_checks: list[QCheckBox] = []
        for gpu in self._gpus:
            c = QCheckBox(f"cuda:{gpu.index}  {gpu.name}  ({human_bytes(gpu.total_bytes)})")
            c.toggled.connect(self._changed)
            self.gpu_checks.append(c)
            g.addWidget(c)
        share = QHBoxLayout()
        self.share = QCheckBox("Share one GPU between")
        self.share.setToolTip("N logical devices on the first checked GPU, each capped at 1/N of its memory.")
        self.share.toggled.connect(self._changed)
        self.share_count = QSpinBox(minimum=2, maximum=16, suffix=" devices")
        self.share_count.valueChanged.connect(self._changed)
        share.addWidget(self.share)
        share.addWidget(self.share_count)
        share.addStretch(1)
        g.addLayout(share)
        v.addWidget(gpu_box)
        # Without a GPU its box stays hidden: showing the devices again must not bring it back.
        self._device_widgets = [self.dev_auto, self.dev_sim, self.dev_gpu, self.sim_count] + ([gpu_box] if self._gpus else [])
        if not self._gpus:
            from ..core import nvml

            self.dev_gpu.setEnabled(False)
            gpu_box.setVisible(False)
            self.dev_gpu.setText("GPUs (none found)")
            self.dev_gpu.setToolTip(nvml.unavailable_reason() or "NVML sees no GPU on this machine.")
        return box

    def _combo(self, items: tuple[str, ...], key: str) -> QComboBox:
        c = QComboBox()
        c.addItems(list(items))
        c.setToolTip(self._docs.get(key, ""))
        c.currentTextChanged.connect(self._changed)
        self._fields[key] = c
        return c

    def _spin(self, key: str, lo: int, hi: int) -> QSpinBox:
        s = QSpinBox(minimum=lo, maximum=hi)
        s.setToolTip(self._docs.get(key, ""))
        s.setKeyboardTracking(False)  # one change per finished number, not per keystroke
        s.valueChanged.connect(self._changed)
        self._spins[key] = s
        self._fields[key] = s
        return s

    def _line(self, key: str) -> QLineEdit:
        e = QLineEdit()
        e.setToolTip(self._docs.get(key, ""))
        e.textChanged.connect(self._changed)
        self._fields[key] = e
        return e

    @staticmethod
    def _set_combo(combo: QComboBox, text: str) -> None:
        if combo.findText(text) < 0:
            combo.addItem(text)  # an unknown value from a file stays visible; validate() names it
        combo.setCurrentText(text)

    # ---- devices ---------------------------------------------------------------------------

    def _show_devices(self, spec_text: str) -> None:
        try:
            spec = core_devices.parse_spec(spec_text)
        except ConfigError:
            spec = core_devices.DeviceSpec("auto")
        if spec.kind == "sim":
            self.dev_sim.setChecked(True)
            self.sim_count.setValue(spec.count)
        elif spec.kind == "cuda" and self._gpus:
            self.dev_gpu.setChecked(True)
            for c, gpu in zip(self.gpu_checks, self._gpus):
                c.setChecked(gpu.index in spec.gpus)
            self.share.setChecked(spec.share > 1)
            if spec.share > 1:
                self.share_count.setValue(spec.share)
        else:
            self.dev_auto.setChecked(True)

    def _device_spec(self) -> tuple[str, str | None]:
        """(devices text, a problem or None) from the device widgets."""
        if self.dev_sim.isChecked():
            return f"sim:{self.sim_count.value()}", None
        if self.dev_gpu.isChecked():
            chosen = [gpu.index for c, gpu in zip(self.gpu_checks, self._gpus) if c.isChecked()]
            if not chosen:
                return "auto", "check at least one GPU"
            if self.share.isChecked():
                return f"cuda:{chosen[0]}x{self.share_count.value()}", None
            return "cuda:" + ",".join(str(i) for i in chosen), None
        return "auto", None

    # ---- building the config ---------------------------------------------------------------

    def _values(self) -> dict[str, Any]:
        values: dict[str, Any] = {
            "mode": self.mode.currentText(),
            "sim.memory": self.memory.text(),
            "model.kind": self.model_kind.currentText(),
            "data.kind": self.data_kind.currentText(),
            "train.schedule": self.schedule.currentText(),
            "train.optimizer": self.optimizer.currentText(),
            "train.activation_checkpointing": self.checkpointing.currentText(),
            "train.precision": self.precision.currentText(),
            "train.lr": self.lr.text(),
            "placement.reshard_after_forward": self.reshard.isChecked(),
            "placement.cpu_offload": self.offload.isChecked(),
        }
        values.update({key: box.value() for key, box in self._spins.items()})
        return values

    def _changed(self, *_: Any) -> None:
        if self._loading:
            return
        cfg: RunConfig | None = self._base
        errors: list[str] = []
        devices, device_problem = self._device_spec()
        if device_problem:
            errors.append(device_problem)
        values = {"devices": devices, **self._values()}
        for key, value in values.items():
            try:
                cfg = set_value(cfg, key, value)
                self._mark(key, False)
            except ConfigError as e:
                errors.append(str(e))
                self._mark(key, True)
        cfg = self._with_split(cfg)
        problems = [in_form_words(p) for p in (errors or validation.problems(cfg) or self._cannot_hold(cfg))]
        self._config = None if errors else cfg
        self._problems = problems
        self._refresh(cfg)
        self.config_changed.emit(self._config, problems)
        self.prediction.request(None if self._problems else self._config)

    def _mesh_product(self, cfg: RunConfig) -> str:
        """'pp 2 × tp 2 = 4 ranks: one per device' — or what the devices are short of."""
        plan = Plan.of(cfg, 0)
        n = self._device_count(cfg)
        used = " × ".join(f"{a} {getattr(plan, a)}" for a in AXES if getattr(plan, a) > 1) or "every axis 1"
        if n is None:
            return f"{used} = {plan.world} ranks"
        verdict = "one per device" if plan.world == n else f"but {n} device{'s' if n != 1 else ''} are chosen"
        return f"{used} = {plan.world} rank{'s' if plan.world != 1 else ''}: {verdict}"

    def _cannot_hold(self, cfg: RunConfig) -> list[str]:
        """What a run would refuse before starting: a simulated device that cannot hold its
        parameters, gradients and optimizer state (shapes only, on the meta device)."""
        try:
            refused = preflight.cannot_hold(cfg, core_devices.resolve(cfg.devices, cfg.sim.memory, self._gpus))
        except ConfigError:
            return []
        return [refused] if refused else []

    def _with_split(self, cfg: RunConfig) -> RunConfig:
        """Apply the placement table's split; a split that no longer fits the model or the
        devices (after another edit) falls back to the even split."""
        n = self._device_count(cfg)
        split = self._split
        if split and (n is None or len(split) != n or sum(split) != len(layer_names(cfg.model))):
            split = self._split = ()
        return set_value(cfg, "placement.split", list(split))

    def _device_count(self, cfg: RunConfig) -> int | None:
        try:
            return len(core_devices.resolve(cfg.devices, cfg.sim.memory, self._gpus))
        except ConfigError:
            return None

    def _mark(self, key: str, bad: bool) -> None:
        widget = self._fields.get(key)
        if widget is not None and widget.property("problem") != bad:
            widget.setProperty("problem", bad)
            widget.style().unpolish(widget)
            widget.style().polish(widget)

    def _refresh(self, cfg: RunConfig) -> None:
        mode, kind = cfg.mode, cfg.model.kind
        known = REGISTRY.get(mode)
        self.mode_notes.setText(f"{known.note}\n{known.watch}" if known else "")
        big = kind in ("mlp", "transformer")
        for key in ("model.width", "model.depth"):
            self._spins[key].setEnabled(big)
        for key in ("model.heads", "model.seq_len", "model.vocab"):
            self._spins[key].setEnabled(kind == "transformer")
        piped = mode == "pipeline" or (mode == "mesh" and cfg.mesh.pp > 1)
        self._spins["train.micro_batches"].setEnabled(piped)
        self.schedule.setEnabled(piped)
        sharded = mode == "fsdp" or (mode == "mesh" and cfg.mesh.shard > 1)
        self.reshard.setVisible(sharded and "placement.reshard_after_forward" not in self._hidden)
        self.mesh_box.setVisible(mode == "mesh" and not all(f"mesh.{a}" in self._hidden for a in AXES))
        if mode == "mesh":
            self.mesh_product.setText(self._mesh_product(cfg))
        zero = bool(known and known.zero) and (mode != "mesh" or cfg.mesh.shard > 1) \
            and "placement.zero" not in self._hidden  # ZeRO-1 is ddp's, 2 and 3 FSDP's
        self.zero_label.setVisible(zero)
        # Offload is FSDP's; left enabled while ticked elsewhere, so it can be unticked.
        self.offload.setEnabled(sharded or self.offload.isChecked())
        self.offload.setVisible("placement.cpu_offload" not in self._hidden)
        self._spins["placement.zero"].setVisible(zero)
        self.sim_count.setEnabled(self.dev_sim.isChecked())
        self.memory.setEnabled(not self.dev_gpu.isChecked())
        self.share_count.setEnabled(self.share.isChecked())
        by_layers = known is not None and known.splits == "layers"
        self.placement_box.setVisible(by_layers and "placement.split" not in self._hidden)
        if by_layers:
            self._fill_placement(cfg)
        if self._problems:
            self.problems_label.setText("\n".join(f"• {p}" for p in self._problems))
            self.problems_label.show()
        else:
            self.problems_label.hide()

    # ---- placement table ------------------------------------------------------------------

    def _fill_placement(self, cfg: RunConfig) -> None:
        try:
            labels = [d.label for d in core_devices.resolve(cfg.devices, cfg.sim.memory, self._gpus)]
        except ConfigError:
            labels = []
        names = layer_names(cfg.model)
        table = self.placement
        table.setRowCount(len(names) if labels else 0)
        if not labels:
            return
        owner = self._owners(len(names), len(labels))
        for row, name in enumerate(names):
            item = table.item(row, 0)
            if item is None:
                item = QTableWidgetItem()
                item.setFlags(item.flags() & ~Qt.ItemFlag.ItemIsEditable)
                table.setItem(row, 0, item)
            item.setText(f"{row}: {name}")
            combo = table.cellWidget(row, 1)
            if not isinstance(combo, QComboBox) or combo.count() != len(labels):
                combo = QComboBox()
                combo.addItems(labels)
                combo.currentIndexChanged.connect(lambda dev, r=row: self._on_layer_moved(r, dev))
                self._wheel.guard(combo)
                table.setCellWidget(row, 1, combo)
            combo.blockSignals(True)
            for i, label in enumerate(labels):
                combo.setItemText(i, label)
            combo.setCurrentIndex(owner[row] if row < len(owner) else 0)
            combo.blockSignals(False)
        # The header sizes a column by its items, not by the combo boxes in its cells:
        # give the device column the combos' own width so "sim0" is not cut to "sim".
        combos = [table.cellWidget(r, 1) for r in range(len(names))]
        table.setColumnWidth(1, max(c.sizeHint().width() for c in combos) + 4)
        height = table.horizontalHeader().height() + sum(table.rowHeight(r) for r in range(len(names)))
        table.setFixedHeight(min(height + 4, 260))

    def _owners(self, n_layers: int, n_devices: int) -> list[int]:
        """The device of each layer under the current split."""
        if n_layers < 1 or n_devices < 1:
            return []
        split = self._split if len(self._split) == n_devices and sum(self._split) == n_layers else ()
        if not split and n_layers < n_devices:
            return list(range(n_layers))
        return [d for d, r in enumerate(split_layers(n_layers, n_devices, split)) for _ in r]

    def _on_layer_moved(self, row: int, device: int) -> None:
        """Layer `row` now goes to `device`; layers stay consecutive per device, so the
        ones before it that sat on a later device follow it, and so do later ones on an
        earlier device."""
        n_layers = self.placement.rowCount()
        n_devices = self.placement.cellWidget(row, 1).count()
        owner = self._owners(n_layers, n_devices)
        owner[row] = device
        for i in range(row):
            owner[i] = min(owner[i], device)
        for i in range(row + 1, n_layers):
            owner[i] = max(owner[i], device)
        self._split = tuple(owner.count(d) for d in range(n_devices))
        self._changed()

    def _on_even_split(self) -> None:
        self._split = ()
        self._changed()

    # ---- prediction -----------------------------------------------------------------------
