"""Presets: RunConfigs shipped as TOML files in paralab.resources.presets."""

from __future__ import annotations

from importlib import resources

from .config import ConfigError, RunConfig, shown

# The seeds come first in every list.
FIRST = ("seed-data-parallel", "seed-model-parallel")


def names() -> list[str]:
    found = sorted(f.name[:-5] for f in resources.files("paralab.resources.presets").iterdir()
                   if f.name.endswith(".toml"))
    return [n for n in FIRST if n in found] + [n for n in found if n not in FIRST]


def load(name: str) -> RunConfig:
    """A preset by name: only the names `names()` lists (never a path)."""
    if name not in names():
        raise ConfigError(f"there is no preset {shown(name)}; presets: {', '.join(names())}")
    file = resources.files("paralab.resources.presets") / f"{name}.toml"
    return RunConfig.loads(file.read_text(encoding="utf-8"), source=f"preset {name}")
