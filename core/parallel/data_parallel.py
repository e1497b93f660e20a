"""data-parallel: torch.nn.DataParallel, as the data-parallel seed uses it.

One process drives every device.  Each step DataParallel
  scatters   the global batch into one chunk per device (torch.chunk: sizes may be uneven),
  broadcasts the model from device 0 into a fresh replica on every other device,
  runs       each replica on its chunk,
  gathers    the outputs onto device 0, where the loss is taken,
  reduces    the replicas' gradients onto device 0's parameters during backward.
Only device 0 holds gradients and optimizer state, and it alone steps while the others
wait: it holds the most memory, the imbalance DDP was made to remove.

On distinct GPUs this is nn.DataParallel itself, its steps timed.  Simulated devices
(all on the CPU) and logical devices sharing one GPU cannot be handed to nn.DataParallel,
so the same steps run here device by device with the same math; the devices then take
turns on the one CPU or GPU where real GPUs would run the replicas at once.
"""

from __future__ import annotations

from time import perf_counter

import torch
from torch import nn
from torch.func import functional_call

from ..data import make_dataset
from ..models import build_model, loss_fn
from ..shapes import Rule, peak
from ..strategy import Trainer
from . import learned_line, make_optimizer
from .levers import autocast, micro_batches, scaled


def apply_data_parallel(ctx) -> Trainer:
    cfg, devices = ctx.cfg, ctx.local_devices
    model = build_model(cfg.model, cfg.seed).to(devices[0].torch_device)
    data = make_dataset(cfg.data, cfg.model, cfg.seed).to(devices[0].torch_device)
    optimizer = make_optimizer(model.parameters(), cfg.train)
    ctx.ledger.add_params(model.parameters(), devices[0].index)
    ctx.ledger.add_optimizer(optimizer)
    ctx.ledger.checkpoint("setup")
    whole_gpus = len(devices) > 1 and all(d.kind == "cuda" and d.share == 1 for d in devices)
    make_step = _nn_data_parallel if whole_gpus else _device_by_device
    return Trainer(make_step(ctx, model, optimizer, data), [optimizer], learned_line(model))


def _copy(probe, t: torch.Tensor, device) -> torch.Tensor:
    """A copy onto `device` (a real copy on simulated devices too), counted there."""
    with probe.at(device.index, "communication"):
        return t.to(device.torch_device, copy=True)


def _spans(probe, devices, phase: str, start: float) -> None:
    if probe.active:
        end = perf_counter()
        for d in devices:
            probe.span(d.index, phase, start, end)


def _device_by_device(ctx, model: nn.Module, optimizer, data):
    """nn.DataParallel's forward and backward, one logical device after the other."""
    cfg, ledger = ctx.cfg, ctx.ledger
    first = ctx.local_devices[0]
    names, params = zip(*model.named_parameters())

    def step(i, probe):
        step_start = perf_counter()
        x, y = data.batch(i, cfg.train.batch_size)
        k = cfg.train.grad_accumulation
        losses = [micro(probe, xs, ys, k, j == 0) for j, (xs, ys) in enumerate(micro_batches(cfg, x, y))]
        b, n = cfg.train.batch_size // k, len(ctx.local_devices)
        used = -(-b // -(-b // n))  # how many chunks torch.chunk makes: fewer than n when b is small
        _optimizer_step(probe, ledger, optimizer, first, ctx.local_devices[1:used])
        _spans(probe, ctx.local_devices[used:], "idle", step_start)  # no samples left for them: they wait all step
        return losses[0] if k == 1 else torch.stack(losses).mean()

    def micro(probe, x, y, k: int, zero_grad: bool):
        """One micro-batch: scatter, broadcast, forward, gather, loss, backward, reduce."""
        start = perf_counter()
        chunks = x.chunk(len(ctx.local_devices))  # may be fewer chunks than devices, as in DataParallel
        devices = ctx.local_devices[:len(chunks)]
        others = devices[1:]
        chunks = [chunks[0]] + [_copy(probe, c, d) for c, d in zip(chunks[1:], others)]
        _spans(probe, devices, "communication", start)  # scatter

        # Broadcast: each other device gets its own copy of the parameters, made anew
        # every step; as leaves they collect that device's gradients for the reduce.
        start = perf_counter()
        replicas = [[_copy(probe, p.detach(), d).requires_grad_() for p in params] for d in others]
        if probe.active:
            for d, replica in zip(others, replicas):
                ledger.set_params(replica, d.index)
        _spans(probe, devices, "communication", start)

        outs = []
        for n, (d, chunk) in enumerate(zip(devices, chunks)):
            with probe.phase(d.index, "forward"), autocast(cfg, d.torch_device.split(":")[0]):
                out = model(chunk) if n == 0 else functional_call(model, dict(zip(names, replicas[n - 1])), (chunk,))
                probe.other(d.index, chunk, out.detach())  # detached: the ledger must not keep the graph
            outs.append(out)

        start = perf_counter()
        with probe.at(first.index, "communication"):
            gathered = torch.cat([o.to(first.torch_device) for o in outs])
        _spans(probe, devices, "communication", start)  # gather

        start = perf_counter()
        with probe.phase(first.index, "forward"):
            loss = loss_fn(cfg.model, gathered.float(), y)
            probe.other(first.index, x, y, outs[0].detach(), gathered.detach(), loss.detach())
        _spans(probe, others, "idle", start)

        if zero_grad:
            optimizer.zero_grad(set_to_none=True)
        start = perf_counter()
        with probe.phase(first.index, "backward"):
            # Back through the loss and the gather: each device's share of the output gradient.
            out_grads = torch.autograd.grad(scaled(loss, k), outs)
        _spans(probe, others, "idle", start)
        for d, out, grad in zip(devices, outs, out_grads):
            with probe.phase(d.index, "backward"):
                torch.autograd.backward(out, grad)

        start = perf_counter()
        for replica in replicas:  # reduce: every replica's gradients summed onto device 0's
            for p, r in zip(params, replica):
                if r.grad is not None:
                    with probe.at(first.index, "communication"):
                        g = r.grad.to(p.device)
                        p.grad = g if p.grad is None else p.grad.add_(g)
        _spans(probe, devices, "communication", start)
        # The replicas die here, as DataParallel's do after backward: drop all that leads to them.
        loss = loss.detach()
        del replicas, outs, out_grads, out, gathered
        if probe.active:
            for d in others:
                ledger.set_params([], d.index)
        return loss

    return step


class _TimedDataParallel(nn.DataParallel):
    """nn.DataParallel with its scatter, broadcast, replica forwards and gather timed,
    and each replica's parameters and activations counted on its own device."""

    def __init__(self, module: nn.Module, devices, ledger) -> None:
        super().__init__(module, device_ids=[d.gpu for d in devices])
        self.devices, self.ledger, self.probe = devices, ledger, None

    def scatter(self, inputs, kwargs, device_ids):
        start = perf_counter()
        scattered = super().scatter(inputs, kwargs, device_ids)
        _spans(self.probe, self.devices[:len(scattered[0])], "communication", start)
        return scattered

    def replicate(self, module, device_ids):
        start = perf_counter()
        replicas = super().replicate(module, device_ids)
        if self.probe.active:
            # Replica 0 shares device 0's parameters; the others' are broadcast copies,
            # kept by replicate() in _former_parameters since they are no longer leaves.
            for d, replica in zip(self.devices[1:], replicas[1:]):
                self.ledger.set_params([t for m in replica.modules() for t in m._former_parameters.values()],
                                       d.index)
        _spans(self.probe, self.devices[:len(replicas)], "communication", start)
        return replicas

    def parallel_apply(self, replicas, inputs, kwargs):
        probe, ledger = self.probe, self.ledger
        times: dict[int, tuple[float, float]] = {}

        def timed(replica, d):
            def run(*args, **kw):
                start = perf_counter()
                if not probe.active:
                    return replica(*args, **kw)
                # Saved-tensor hooks are per thread, and each replica runs in its own thread.
                with ledger.recording(d.index):
                    out = replica(*args, **kw)
                times[d.index] = (start, perf_counter())
                return out
            return run

        outputs = super().parallel_apply([timed(r, d) for r, d in zip(replicas, self.devices)], inputs, kwargs)
        if probe.active:
            for index, (start, end) in times.items():
                probe.span(index, "forward", start, end)
            ledger.checkpoint("forward")
        return outputs

    def gather(self, outputs, output_device):
        start = perf_counter()
        gathered = super().gather(outputs, output_device)
        _spans(self.probe, self.devices[:len(outputs)], "communication", start)
        return gathered


def _nn_data_parallel(ctx, model: nn.Module, optimizer, data):
    """Distinct GPUs: nn.DataParallel itself; replicas really run at once."""
    cfg, ledger = ctx.cfg, ctx.ledger
    first, others = ctx.local_devices[0], ctx.local_devices[1:]
    dp = _TimedDataParallel(model, ctx.local_devices, ledger)

    def step(i, probe):
        dp.probe = probe
        x, y = data.batch(i, cfg.train.batch_size)
        k, losses = cfg.train.grad_accumulation, []
        for j, (xs, ys) in enumerate(micro_batches(cfg, x, y)):
            with autocast(cfg, "cuda"):  # DataParallel carries autocast into its replicas' threads
                out = dp(xs)
            start = perf_counter()
            with probe.phase(first.index, "forward"):
                loss = loss_fn(cfg.model, out.float(), ys)
                probe.other(first.index, xs, ys, out.detach(), loss.detach())
            _spans(probe, others, "idle", start)
            if j == 0:
                optimizer.zero_grad(set_to_none=True)
            start = perf_counter()
            with probe.phase(first.index, "backward"):
                # Autograd runs every replica's backward on its own GPU, then the reduce onto device 0.
                scaled(loss, k).backward()
            _spans(probe, others, "backward", start)
            losses.append(loss.detach())
        _optimizer_step(probe, ledger, optimizer, first, others)
        return losses[0] if k == 1 else torch.stack(losses).mean()

    return step


def _optimizer_step(probe, ledger, optimizer, first, others) -> None:
    """After backward the replicas are gone (the ledger stops counting them); device 0
    steps the optimizer while the others wait."""
    if probe.active:
        for d in others:
            ledger.set_params([], d.index)
    start = perf_counter()
    with probe.phase(first.index, "optimizer"):
        optimizer.step()
    _spans(probe, others, "idle", start)


def memory(f: Rule) -> list[dict[str, int]]:
    """The formula's rule.  Device 0: the module, its gradients and state, chunk 0 (a view
    of the whole batch) and the gathered output; the others: a fresh replica and their
    chunk, then after backward the replica's gradients.  The loss is taken on device 0:
    what it saves is not on the others, the output is."""
    sh, B = f.sh, f.batch
    size = -(-B // f.n)  # torch.chunk's rule, as nn.DataParallel's scatter uses
    chunk = [len(range(i, min(i + size, B))) for i in range(0, B, size)] + [0] * f.n
    out = [f.device(f.total, chunk[0], other=(B - chunk[0]) * sh.io + B * sh.out[-1] + B * sh.unsaved)]
    for k in range(1, f.n):
        fwd = f.device(f.total, chunk[k], grads=0, other=chunk[k] * sh.out[-1], optimizer=0,
                       acts=chunk[k] * (sum(sh.saved) - sh.loss))
        out.append(peak(fwd, {**fwd, "grads": f.total, "activations": 0}))
    return out
