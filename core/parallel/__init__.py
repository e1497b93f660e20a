"""One module per parallelism mode, each an `apply_*` function, and what they share.

`apply_*(ctx)` takes the rank's context (config, devices, rank, ledger) and returns a
Trainer: the function that runs one training step and the optimizers it steps (the API
is core.strategy; what each mode is, core.modes).  `memory(rule)` is the mode's rule for the
formula (core.formula): who holds which bytes, from the model's shapes (core.shapes).  The training loop around it (control,
sampling, events) is the same for every mode and lives in `core.worker`.
"""

from __future__ import annotations

import contextlib
import importlib
from collections.abc import Callable
from typing import Any

import torch

from ..config import RunConfig, TrainConfig
from ..models import loss_fn, stream_layers
from ..modes import mode
from ..shapes import Rule
from ..strategy import Probe, RankContext, Trainer
from .levers import autocast, micro_batches, scaled


def learned_line(model: torch.nn.Module) -> Callable[[], str] | None:
    """For a one-input one-output Linear (the data-parallel seed): 'learned y = 2.998·x + 0.003'."""
    params = list(model.parameters())
    if len(params) != 2 or params[0].numel() != 1:
        return None
    def line() -> str:
        b = params[1].item()
        return f"learned y = {params[0].item():.3f}·x {'-' if b < 0 else '+'} {abs(b):.3f}"

    return line


def apply(ctx: RankContext) -> Trainer:
    """The Trainer of the config's mode: `apply_<module>(ctx)` from its own module."""
    module = mode(ctx.cfg.mode).module
    return getattr(importlib.import_module(f"{__name__}.{module}"), f"apply_{module}")(ctx)


def memory(rule: Rule) -> list[dict[str, int]]:
    """The formula's rule of the config's mode, `memory(rule)` from its own module: each
    device's bytes by category, from the model's shapes (core.shapes)."""
    module = mode(rule.cfg.mode).module
    return importlib.import_module(f"{__name__}.{module}").memory(rule)


def standard_step(cfg: RunConfig, model: torch.nn.Module, optimizer: torch.optim.Optimizer, probe: Probe,
                  device: int, x: torch.Tensor, y: torch.Tensor, *,
                  sync: Callable[[bool], Any] | None = None,
                  held: Callable[[], list] | None = None) -> torch.Tensor:
    """One training step as the seeds write it, each phase under the probe: forward and
    loss; zero_grad (so last step's gradients live through the forward, as in the seeds);
    backward; optimizer step.

    With train.grad_accumulation = k the batch runs as k micro-batches, forward and
    backward each, before the one optimizer step; `sync(last)` is the context a micro-step's
    backward runs in (DDP's no_sync, FSDP's gradient sync, off but for the last).  `held()`
    names more tensors of the step as `other` (DDP's buckets).  The loss returned is the
    batch's: the mean of the micro-batches' (equal sizes)."""
    k = cfg.train.grad_accumulation
    bf16 = cfg.train.precision == "bf16"
    losses = []
    for j, (xs, ys) in enumerate(micro_batches(cfg, x, y)):
        with probe.phase(device, "forward"), autocast(cfg, xs.device.type):
            out = model(xs)
            loss = loss_fn(cfg.model, out.float() if bf16 else out, ys)
            if probe.active:
                probe.other(device, xs, ys, out, loss, *(held() if held else ()))
        with probe.phase(device, "backward"):
            if j == 0:
                optimizer.zero_grad(set_to_none=True)
            with sync(j == k - 1) if sync else contextlib.nullcontext():
                scaled(loss, k).backward()
            if probe.active and held:
                probe.other(device, xs, ys, out, loss, *held())
        losses.append(loss.detach() if k > 1 else loss)
    with probe.phase(device, "optimizer"):
        optimizer.step()
    return losses[0] if k == 1 else torch.stack(losses).mean()


def make_optimizer(params, train: TrainConfig) -> torch.optim.Optimizer:
    """The optimizer as torch runs it on a GPU: `foreach` (one kernel per operation over every
    parameter), which torch picks by default on CUDA but not on the CPU.  Simulated devices
    then allocate and take the time a GPU's optimizer step would; the update is the same."""
    params = list(params)
    # Plain tensors only: a foreach kernel cannot mix tensor parallel's whole (replicated)
    # ends with its DTensor blocks, and on fake tensors DTensor's foreach ops allocate what a
    # run does not (the estimate would count it); FSDP and tensor parallel step one
    # parameter at a time, which costs them launches in the modelled optimizer phase.
    foreach = not any(type(p).__name__ == "DTensor" for p in params)
    return OPTIMIZER_CLASSES[train.optimizer](params, lr=train.lr, foreach=foreach)


OPTIMIZER_CLASSES = {"sgd": torch.optim.SGD, "adam": torch.optim.Adam, "adamw": torch.optim.AdamW}


def materialise(model: torch.nn.Module, cfg: RunConfig, device: str | torch.device,
                layers: range | None = None) -> None:
    """Give a model that was built on the meta device and then sharded (FSDP2, DTensor)
    its storage on `device` and build_model's values, keeping only this rank's shards:
    each layer is made whole on the CPU one at a time (models.stream_layers) and the
    rank's slice of each tensor copied in, as torchtitan initialises a sharded model.
    So a rank never holds the whole model, only its shards and one layer.  `layers`: the
    model's layers are these of build_model's (a pipeline stage's), not all of them."""
    from torch._guards import active_fake_mode
    from torch.distributed.tensor import DTensor
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    model.to_empty(device=device)
    if active_fake_mode() is not None:
        return  # a trace on fake tensors: shapes are all it needs
    with torch.no_grad():
        for i, whole in stream_layers(cfg.model, cfg.seed):
            if layers is not None and i not in layers:
                continue
            source = {**dict(whole.named_parameters()), **dict(whole.named_buffers())}
            mine = model[i - (layers.start if layers is not None else 0)]
            for name, t in [*mine.named_parameters(), *mine.named_buffers()]:
                value = source[name]
                if isinstance(t, DTensor):
                    shape, offset = compute_local_shape_and_global_offset(value.shape, t.device_mesh, t.placements)
                    value = value[tuple(slice(o, o + n) for o, n in zip(offset, shape))]
                    t = t.to_local()
                t.copy_(value)
