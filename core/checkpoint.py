"""Carry a run's weights and optimizer state from one layout to another.

A run that switches layout (DDP → FSDP, 2 devices → 4) saves with
torch.distributed.checkpoint: every rank writes what it holds — a replica, its shards,
its tensor-parallel slices — under the parameters' names, and the next run's ranks each
load what their own layout holds; DCP reshards between the two.  The names are the
model's own (get_state_dict strips DDP's and FSDP's wrappers), so any layout that holds
whole named modules can switch to any other.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from .config import ConfigError
from .strategy import RankContext, Trainer

STEP_FILE = "paralab.json"
SWITCHABLE = ("single", "ddp", "fsdp", "tensor-parallel", "mesh")
"""Modes whose Trainer holds one model under build_model's names (a mesh without a pipeline)."""


def switch_problem(cfg: Any) -> str:
    """Why this config's run cannot save or load a switch; '' when it can."""
    if cfg.mode not in SWITCHABLE or (cfg.mode == "mesh" and cfg.mesh.pp > 1):
        return (f"mode {cfg.mode} holds its model in pieces under other names and cannot switch "
                f"layout yet; switch between {', '.join(SWITCHABLE[:-1])} and mesh without pp")
    return ""


def save(trainer: Trainer, ctx: RankContext, path: str, step: int) -> None:
    """Every rank writes its part of the model and optimizer state (a collective); rank 0
    then notes after which step, and in which layout."""
    model_state, optim_state = get_state_dict(trainer.model, trainer.optimizers)
    dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=path, process_group=_group(ctx))
    if ctx.rank == 0:
        note = {"step": step, "mode": ctx.cfg.mode, "devices": ctx.cfg.devices, "model": ctx.cfg.to_dict()["model"]}
        (Path(path) / STEP_FILE).write_text(json.dumps(note) + "\n", encoding="utf-8")


def saved(path: str) -> dict[str, Any]:
    """What a saved state says of itself: after which step, and the layout and model it
    was saved from; a ConfigError sentence when `path` holds none."""
    try:
        note = json.loads((Path(path) / STEP_FILE).read_text(encoding="utf-8"))
        int(note["step"])
        return note
    except (OSError, ValueError, KeyError, TypeError):
        raise ConfigError(f"{path} holds no saved paralab state (a run's save_at_end or switch writes one)") from None


def load(trainer: Trainer, ctx: RankContext, path: str) -> None:
    """Every rank reads what its own layout holds of the saved state (a collective)."""
    model_state, optim_state = get_state_dict(trainer.model, trainer.optimizers)
    state = {"model": model_state, "optim": optim_state}
    dcp.load(state, checkpoint_id=path, process_group=_group(ctx))
    set_state_dict(trainer.model, trainer.optimizers, model_state_dict=state["model"],
                   optim_state_dict=state["optim"])


def _group(ctx: RankContext) -> Any:
    # DCP coordinates its ranks over gloo (small CPU messages), whatever the training's backend.
    return ctx.control_group if dist.is_initialized() and ctx.world > 1 else None
