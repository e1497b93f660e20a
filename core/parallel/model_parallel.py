"""model-parallel: the model-parallel seed's naive split, for any model and device count.

Consecutive layers live on consecutive devices (models.split_layers: 3 layers on 2
devices -> 1 | 2, the seed's SplitNN).  The batch goes through the devices one after
the other and the gradients come back the same way, so only one device works at a time
while the others idle: the waste pipeline parallelism fills with micro-batches.  One
optimizer steps every parameter, each on its own device, as in the seed.

At each boundary the activation is copied to the next device (`.to()`, as the seed's
`.cuda(1)`; a real copy on simulated devices too) and detached there, so that backward
can run part by part and be timed on the device that does it.
"""

from __future__ import annotations

from time import perf_counter

import torch

from ..data import Dataset, make_dataset
from ..models import build_model, loss_fn, split_layers
from ..shapes import Rule, stage_layers
from ..spans import minus
from ..strategy import Trainer
from . import learned_line, make_optimizer
from .levers import autocast, checkpoint_blocks, micro_batches, scaled


def apply_model_parallel(ctx) -> Trainer:
    cfg, devices = ctx.cfg, ctx.local_devices
    first, last = devices[0], devices[-1]
    model = build_model(cfg.model, cfg.seed)
    ranges = split_layers(len(model), len(devices), cfg.placement.split)
    parts = [model[r.start:r.stop].to(d.torch_device) for r, d in zip(ranges, devices)]
    checkpoint_blocks(model, cfg.train.activation_checkpointing, ctx.ledger)
    whole = make_dataset(cfg.data, cfg.model, cfg.seed)
    data = Dataset(whole.inputs.to(first.torch_device), whole.targets.to(last.torch_device))
    # The seed's one optimizer, held as one per device: each device updates its own layers,
    # and its optimizer state is allocated (and counted) there.  Adam's and SGD's update
    # of one parameter does not depend on the others, so the numbers are the seed's.
    optimizers = [make_optimizer(part.parameters(), cfg.train) for part in parts]
    for part, d, optimizer in zip(parts, devices, optimizers):
        ctx.ledger.add_params(part.parameters(), d.index)
        ctx.ledger.add_optimizer(optimizer)
    ctx.ledger.checkpoint("setup")

    def step(i, probe):
        x, y = data.batch(i, cfg.train.batch_size)
        busy: dict[int, list[tuple[float, float]]] = {d.index: [] for d in devices}

        def sent(src, dst, start: float) -> None:  # a copy between two devices keeps both busy
            end = perf_counter()
            for device in (src, dst):
                busy[device.index].append((start, end))
                probe.span(device.index, "communication", start, end)

        k, losses = cfg.train.grad_accumulation, []
        for j, (xs, ys) in enumerate(micro_batches(cfg, x, y)):
            loss = _micro_step(cfg, parts, devices, probe, sent, busy, xs, ys, k,
                               zero_grad=optimizers if j == 0 else [])
            losses.append(loss)

        for optimizer, d in zip(optimizers, devices):
            start = perf_counter()
            with probe.phase(d.index, "optimizer"):
                optimizer.step()
            busy[d.index].append((start, perf_counter()))
        if probe.active:
            _idle(probe, busy)
        return losses[0] if k == 1 else torch.stack(losses).mean()

    return Trainer(step, optimizers, learned_line(model))


def _micro_step(cfg, parts, devices, probe, sent, busy, x, y, k: int, zero_grad) -> torch.Tensor:
    """Forward through the devices one after the other, then backward the same way back;
    gradients add up over the micro-batches (the loss divided by k)."""
    last = devices[-1]
    inputs, outputs = [x], []
    for n, (part, d) in enumerate(zip(parts, devices)):
        if n:
            start = perf_counter()
            with probe.at(d.index, "communication"):
                inputs.append(outputs[-1].detach().to(d.torch_device, copy=True).requires_grad_())
            sent(devices[n - 1], d, start)
        start = perf_counter()
        with probe.phase(d.index, "forward"), autocast(cfg, d.torch_device.split(":")[0]):
            out = part(inputs[n])
            if d is last:
                loss = loss_fn(cfg.model, out.float(), y)
                probe.other(d.index, inputs[n].detach(), y, out.detach(), loss.detach())
            else:
                probe.other(d.index, inputs[n].detach(), out.detach())
        busy[d.index].append((start, perf_counter()))
        outputs.append(out)

    for optimizer in zero_grad:
        optimizer.zero_grad(set_to_none=True)
    for n in reversed(range(len(parts))):
        d = devices[n]
        if d is not last:
            start = perf_counter()
            with probe.at(d.index, "communication"):
                grad = inputs[n + 1].grad.to(d.torch_device, copy=True)
            sent(devices[n + 1], d, start)
        start = perf_counter()
        with probe.phase(d.index, "backward"):
            if d is last:
                scaled(loss, k).backward()
            else:
                outputs[n].backward(grad)
        busy[d.index].append((start, perf_counter()))
    return loss.detach()


def _idle(probe, busy: dict[int, list[tuple[float, float]]]) -> None:
    """A device idles while another one works and it does not: it waits for its turn."""
    for device, own in busy.items():
        others = [iv for d, ivs in busy.items() if d != device for iv in ivs]
        for start, end in minus(others, own):
            probe.span(device, "idle", start, end)


def memory(f: Rule) -> list[dict[str, int]]:
    """The formula's rule: each device its stage's layers and, for the whole batch, what
    they save and the output it sends on."""
    out = []
    for s, layers in enumerate(stage_layers(f.cfg, f.n)):
        p, saved, sent, fixed = f.stage(layers, last=s == f.n - 1)
        out.append(f.device(p, f.batch, layers, acts=f.batch * saved + fixed, other=f.batch * sent))
    return out
