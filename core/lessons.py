"""Lessons: guided sequences of runs, shipped as TOML files in paralab.resources.lessons.

A lesson has a title and steps.  Each step starts from a preset (`preset = "name"`) or
from the previous step's config, applies its changes (`set`, dotted keys as `--set`
takes them), and says which of the form's controls to show or hide, what to look at (a
view, a device) and a question whose answer is revealed on demand.  `load` builds and
validates every step's RunConfig with the same checks a run gets, so a broken lesson
fails at once with a sentence naming the lesson and the step, never half way through a
class.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from importlib import resources
from typing import Any

import tomllib

from . import devices, presets, validation
from .config import ConfigError, RunConfig, shown

PACKAGE = "paralab.resources.lessons"
VIEWS = ("gauges", "loss", "rate", "utilization", "memory", "timeline")
"""What a step can point at: the dashboard's views (gui/dashboard.py)."""
CONTROLS = (
    "mode", "devices", "sim.memory", "model.kind", "model.width", "model.depth", "model.heads",
    "model.seq_len", "model.vocab", "data.kind", "train.batch_size", "train.micro_batches",
    "train.schedule", "train.optimizer", "train.lr", "train.steps", "seed", "placement.split",
    "placement.reshard_after_forward", "mesh.pp", "mesh.dp", "mesh.shard", "mesh.tp",
    "train.grad_accumulation", "train.activation_checkpointing", "train.precision", "placement.zero",
    "placement.cpu_offload",
)
"""The settings the form has a field for (gui/config_panel.py); a step shows or hides these."""
OUTCOMES = ("ok", "oom")
LESSON_KEYS = {"title", "summary", "order", "steps"}
STEP_KEYS = {"text", "preset", "set", "show", "hide", "look", "device", "question", "answer", "expect"}


@dataclass(frozen=True, slots=True)
class Step:
    text: str
    config: RunConfig
    hidden: frozenset[str]
    """Controls the form hides in this step."""
    look: str = ""
    """One of VIEWS, or '' for nothing in particular."""
    device: int | None = None
    """A device to outline (its gauge and memory plot)."""
    question: str = ""
    answer: str = ""
    expect: str = "ok"
    """How a run of this step ends: 'ok', or 'oom' where running out of memory is the point."""


@dataclass(frozen=True, slots=True)
class Lesson:
    name: str
    title: str
    summary: str
    steps: tuple[Step, ...]


def catalog() -> list[tuple[str, str, str]]:
    """(name, title, summary) of every lesson, in teaching order; reads the files only."""
    found = []
    for f in resources.files(PACKAGE).iterdir():
        if f.name.endswith(".toml"):
            data = _read(f.name[:-5])
            order = data.get("order", 999)
            found.append((order if isinstance(order, int) else 999, f.name[:-5], str(data.get("title", "")),
                          str(data.get("summary", ""))))
    return [(name, title, summary) for _, name, title, summary in sorted(found)]


def names() -> list[str]:
    return [name for name, _, _ in catalog()]


def load(name: str) -> Lesson:
    """A lesson by name (never a path), every step built and validated."""
    if name not in names():
        raise ConfigError(f"there is no lesson {shown(name)}; lessons: {', '.join(names())}")
    return parse(_read(name), name)


def parse(data: dict[str, Any], name: str) -> Lesson:
    where = f"lesson {name!r}"
    _no_unknown(data, LESSON_KEYS, where)
    if not isinstance(data.get("order", 0), int) or not isinstance(data.get("title", ""), str):
        raise ConfigError(f"{where}: order must be a whole number and title text")
    steps = data.get("steps")
    if not isinstance(steps, list) or not steps:
        raise ConfigError(f"{where} has no steps; add [[steps]] tables")
    built: list[Step] = []
    previous: RunConfig | None = None
    for i, raw in enumerate(steps, 1):
        try:
            step = _step(raw, previous, str(data.get("title", name)))
        except ConfigError as e:
            raise ConfigError(f"{where}, step {i}: {e}") from None
        built.append(step)
        previous = step.config
    return Lesson(name, str(data.get("title", name)), str(data.get("summary", "")), tuple(built))


def _read(name: str) -> dict[str, Any]:
    text = (resources.files(PACKAGE) / f"{name}.toml").read_text(encoding="utf-8")
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"lesson {name!r} is not valid TOML: {e}") from None


def _step(raw: Any, previous: RunConfig | None, title: str) -> Step:
    if not isinstance(raw, dict):
        raise ConfigError(f"a step must be a table of settings, not {shown(raw)}")
    _no_unknown(raw, STEP_KEYS, "the step")
    if "preset" in raw:
        base = presets.load(str(raw["preset"]))
    elif previous is None:
        raise ConfigError("the first step must name a preset to start from")
    else:
        base = previous
    # The lesson's text replaces the preset's: the form must not tell another story.
    cfg = replace(base.with_overrides(_dotted(raw.get("set", {}))), name=title, description="")
    problems = validation.problems(cfg)
    if problems:
        raise ConfigError("; ".join(problems))
    step = Step(text=_text(raw, "text", required=True), config=cfg, hidden=_hidden(raw),
                look=str(raw.get("look", "")), device=raw.get("device"),
                question=_text(raw, "question"), answer=_text(raw, "answer"),
                expect=str(raw.get("expect", "ok")))
    _check(step)
    return step


def _check(step: Step) -> None:
    if step.look and step.look not in VIEWS:
        raise ConfigError(f"look {shown(step.look)} is not one of: {', '.join(VIEWS)}")
    if step.device is not None:
        n = devices.count(step.config.devices)
        if not isinstance(step.device, int) or isinstance(step.device, bool) or not 0 <= step.device < (n or 1):
            raise ConfigError(f"device {shown(step.device)} is not a device of {step.config.devices}")
    if bool(step.question) != bool(step.answer):
        raise ConfigError("a question needs its answer (and an answer its question)")
    if step.expect not in OUTCOMES:
        raise ConfigError(f"expect {shown(step.expect)} is not one of: {', '.join(OUTCOMES)}")


def _hidden(raw: dict[str, Any]) -> frozenset[str]:
    """`show` lists the only controls shown; `hide` lists those hidden; neither: all shown."""
    if "show" in raw and "hide" in raw:
        raise ConfigError("give show or hide, not both")
    listed = raw.get("show", raw.get("hide", []))
    if not isinstance(listed, list) or not all(isinstance(k, str) for k in listed):
        raise ConfigError(f"show and hide take a list of settings, not {shown(listed)}")
    unknown = [k for k in listed if k not in CONTROLS]
    if unknown:
        raise ConfigError(f"{shown(unknown[0])} is not a control of the form; controls: {', '.join(CONTROLS)}")
    return frozenset(CONTROLS) - frozenset(listed) if "show" in raw else frozenset(listed)


def _dotted(changes: Any, prefix: str = "") -> dict[str, Any]:
    """{"train.steps": 3} from `set = {"train.steps" = 3}` or from TOML's nested `train.steps = 3`."""
    if not isinstance(changes, dict):
        raise ConfigError(f"set must be a table of dotted settings, not {shown(changes)}")
    out: dict[str, Any] = {}
    for key, value in changes.items():
        if isinstance(value, dict):
            out.update(_dotted(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _text(raw: dict[str, Any], key: str, required: bool = False) -> str:
    value = raw.get(key, "")
    if not isinstance(value, str) or (required and not value.strip()):
        raise ConfigError(f"{key} must be {'some ' if required else ''}text")
    # Lines of a TOML multi-line string join into paragraphs; a blank line starts the next.
    return "\n\n".join(" ".join(p.split()) for p in re.split(r"\n\s*\n", value.strip()))


def _no_unknown(data: dict[str, Any], known: set[str], where: str) -> None:
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(f"{where} has an unknown key {shown(unknown[0])}; known: {', '.join(sorted(known))}")
