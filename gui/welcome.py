"""The first thing a person sees: the presets as a short list of choices, one line each
(the two seeds first), and what pressing Start will show.  Choosing a preset, or
Start, brings the live dashboard forward."""

from __future__ import annotations

from PySide6.QtCore import Qt, Signal
from PySide6.QtWidgets import QFrame, QLabel, QPushButton, QScrollArea, QVBoxLayout, QWidget

from ..core import lessons, presets

SUMMARIES = {
    "seed-data-parallel": "nn.DataParallel linear regression (y = 3x + noise): the batch split over the devices.",
    "seed-model-parallel": "The SplitNN over two devices: one computes while the other waits.",
    "mlp-ddp": "DDP: a full replica on every device, gradients all-reduced during backward.",
    "mlp-tensor-parallel": "Tensor parallel: every weight split over the devices, one all-reduce per block.",
    "transformer-fsdp": "A GPT sharded with FSDP: about 1/N of the model on each device.",
    "transformer-pipeline": "A GPT in 1F1B pipeline stages: the timeline shows the bubble.",
    "transformer-checkpointing": "Activation checkpointing: blocks keep only their input and recompute in backward.",
    "transformer-bf16": "bf16 mixed precision in FSDP: half the activation bytes, the same loss curve.",
    "out-of-memory": "Too big on purpose: the out-of-memory names the device and the category.",
    "transformer-fsdp-tp": "A GPT on a 2 × 2 mesh: FSDP shards what tensor parallel splits.",
    "mlp-dp-pp": "Two pipelines side by side: each has its bubble; stage copies all-reduce.",
    "transformer-fsdp-offload": "FSDP with CPU offload: shards and optimizer state on the host, so it fits.",
}

WHAT_START_SHOWS = (
    "Press <b>Start</b> (Ctrl+R) to train the settings on the left, for real, on simulated "
    "devices or your GPUs. You will see each device's memory fill by category (parameters, "
    "gradients, optimizer state, activations) against its capacity and the prediction, the "
    "loss fall step by step, the samples per second, and which device is busy when.")


class Welcome(QWidget):
    chosen = Signal(str)
    """A preset's name: the person picked it."""
    lesson_chosen = Signal(str)
    """A lesson's name: the person wants to be guided."""
    dismissed = Signal()

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent, objectName="welcome")
        # The lessons and presets scroll: the page must not make the window taller than a
        # 720-pixel screen (the dashboard shares its stack).
        content = QWidget(objectName="welcomeContent")
        scroll = QScrollArea(widgetResizable=True, frameShape=QFrame.Shape.NoFrame)
        scroll.setWidget(content)
        outer = QVBoxLayout(self)
        outer.setContentsMargins(0, 0, 0, 0)
        outer.addWidget(scroll)
        v = QVBoxLayout(content)
        v.setContentsMargins(32, 24, 32, 24)
        title = QLabel("<h2>paralab: watch multi-GPU training fill the devices</h2>")
        v.addWidget(title)
        v.addWidget(QLabel("Follow a guided lesson, step by step (a panel on the right leads):"))
        self.lesson_buttons: dict[str, QPushButton] = {}
        for name, title, _summary in lessons.catalog():
            self.lesson_buttons[name] = self._choice(v, title, lambda _=False, n=name: self.lesson_chosen.emit(n))
        v.addSpacing(8)
        v.addWidget(QLabel("Or pick a preset (it fills the settings on the left):"))
        self.buttons: dict[str, QPushButton] = {}
        for name in presets.names():
            text = f"{name} — {SUMMARIES.get(name, '')}".rstrip(" —")
            self.buttons[name] = self._choice(v, text, lambda _=False, n=name: self.chosen.emit(n))
        start = QLabel(WHAT_START_SHOWS, wordWrap=True)
        start.setTextFormat(Qt.TextFormat.RichText)
        v.addSpacing(12)
        v.addWidget(start)
        skip = QPushButton("Show the dashboard", objectName="welcomeSkip")
        skip.clicked.connect(self.dismissed.emit)
        v.addWidget(skip, alignment=Qt.AlignmentFlag.AlignLeft)
        v.addStretch(1)

    @staticmethod
    def _choice(v: QVBoxLayout, text: str, slot) -> QPushButton:
        button = QPushButton(text, objectName="welcomePreset")
        button.setFlat(True)
        button.setCursor(Qt.CursorShape.PointingHandCursor)
        button.setStyleSheet("text-align: left; padding: 4px 8px;")
        button.clicked.connect(slot)
        v.addWidget(button)
        return button
