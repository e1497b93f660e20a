"""What the main window does with files: open and save a config, export the events (JSONL,
CSV) and the plots (PNG).

A mixin of MainWindow (it uses the window's panel, controller, dashboard, banner and status
bar), kept apart so that the window's own file stays about running and showing a run.
"""

from __future__ import annotations

import csv
import shutil
from pathlib import Path
from typing import Any

from PySide6.QtWidgets import QFileDialog

from ..core.config import ConfigError, RunConfig
from ..core.events import CATEGORIES, RunStarted, read_events, to_dict

CSV_COLUMNS = ["event", "time_s", "step", "device", "loss", "samples_per_s", "lr", *CATEGORIES,
               "peak_bytes", "capacity_bytes", "phase", "op", "start_s", "end_s", "clock", "name", "message_bytes",
               "percent", "source", "status", "message", "steps", "param_count"]


class Files:
    """File › Open/Save config…, Export events…, Export plots…."""

    def open_config(self, path: str | Path) -> bool:
        try:
            cfg = RunConfig.load(path)
            beyond = self.panel.beyond_the_form(cfg)
            if beyond:
                raise ConfigError(beyond)
            self.panel.set_config(cfg)
            return True
        except ConfigError as e:
            self.banner.show_message(f"Bad config: {e}")
            return False

    def save_config(self, path: str | Path) -> bool:
        cfg = self.panel.config()
        if cfg is None:
            self.banner.show_message("Cannot save: " + "; ".join(self.panel.problems()))
            return False
        try:
            cfg.save(path)
        except OSError as e:
            self.banner.show_message(f"Cannot save {path}: {e.strerror or e}")
            return False
        return True

    def export_events(self, path: str | Path, fmt: str) -> bool:
        """The events of the current or last run, as JSONL (the run's own file) or CSV."""
        src = self.controller.metrics_path
        if src is None or not src.exists():
            self.statusBar().showMessage("There are no events yet: start a run first.", 5000)
            return False
        try:
            if fmt == "jsonl":
                shutil.copyfile(src, path)
            else:
                with open(path, "w", newline="", encoding="utf-8") as f:
                    w = csv.DictWriter(f, CSV_COLUMNS, extrasaction="ignore")
                    w.writeheader()
                    for e in read_events(src):
                        w.writerow(csv_row(e))
        except OSError as e:
            self.banner.show_message(f"Cannot write {path}: {e.strerror or e}")
            return False
        return True

    def export_png(self, path: str | Path) -> bool:
        try:
            self.dashboard.export_png(str(path))
        except OSError as e:
            self.banner.show_message(f"Cannot write {path}: {e.strerror or e}")
            return False
        return True

    def _open_config_dialog(self) -> None:
        path, _ = QFileDialog.getOpenFileName(self, "Open config", "", "TOML config (*.toml);;All files (*)")
        if path:
            self.open_config(path)

    def _save_config_dialog(self) -> None:
        path, _ = QFileDialog.getSaveFileName(self, "Save config", "paralab.toml", "TOML config (*.toml)")
        if path:
            self.save_config(path)

    def _export_png_dialog(self) -> None:
        path, _ = QFileDialog.getSaveFileName(self, "Export plots", "paralab.png", "PNG image (*.png)")
        if path:
            self.export_png(path)

    def _export_events_dialog(self, fmt: str) -> None:
        path, _ = QFileDialog.getSaveFileName(self, "Export events", f"paralab-events.{fmt}",
                                              f"{fmt.upper()} (*.{fmt})")
        if path:
            self.export_events(path, fmt)


def csv_row(event: Any) -> dict[str, Any]:
    """One CSV row: memory bytes spread into one column per category.  Columns keep one
    meaning each: `params` holds bytes, so the start's parameter count is `param_count`,
    and a communication span's message size is `message_bytes`."""
    row = to_dict(event)
    if isinstance(event, RunStarted):
        row["param_count"] = row.pop("params", None)
    held = row.pop("bytes", None)
    if isinstance(held, dict):
        row.update(held)
    elif held is not None:
        row["message_bytes"] = held
    return row
