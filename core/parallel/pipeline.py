"""pipeline: one stage per rank, micro-batches flowing through torch.distributed.pipelining.

Each rank builds the whole model from the seed and keeps only its layers (the same
split as model-parallel).  The global batch is cut into micro-batches: GPipe runs every
forward, then every backward; 1F1B starts backwards as soon as the last stage can, so
fewer micro-batches' activations are alive at once.  Either way a stage waits while
the pipeline fills and drains: that wait, the *bubble*, is what this mode shows.  On
sampled steps every micro-batch's forward and backward becomes a span, and the gaps in
between, where the rank sits in send/recv waiting for a neighbour, become idle spans.
"""

from __future__ import annotations

import contextlib
from time import perf_counter

import torch
import torch.distributed as dist
from torch import nn
from torch._guards import active_fake_mode
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe

from ..data import make_dataset
from ..models import build_model, loss_fn, num_layers, split_layers, stream_layers
from ..shapes import Rule, peak, stage_layers
from ..spans import gaps
from ..strategy import Trainer
from . import make_optimizer
from .levers import autocast, checkpoint_blocks

SCHEDULES = {"gpipe": ScheduleGPipe, "1f1b": Schedule1F1B}


class _TimedStage(PipelineStage):
    """A PipelineStage that notes when each micro-batch's forward and backward ran.

    Both schedules call forward_one_chunk / backward_one_chunk once per micro-batch and
    do their send/recv outside them (schedules.py), so these edges are the compute.
    Module hooks would not do: the backward hook of the first stage fires before its
    weight gradients exist, since its input needs no gradient."""

    def __init__(self, *args, ledger, device_index: int, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.ledger, self.device_index = ledger, device_index
        self.probe = None
        self.compute: list[list] = []
        """[phase, start, end, end of the memory checkpoint] per micro-batch, on sampled steps."""

    def _timed(self, phase: str, run, *args, **kwargs):
        self.probe.where = (self.device_index, phase)
        if not self.probe.active:
            return run(*args, **kwargs)
        start = perf_counter()
        out = run(*args, **kwargs)
        span = [phase, start, perf_counter(), 0.0]
        # Taken while the other micro-batches are still in flight: the pipeline's peak.
        self.ledger.checkpoint(phase)
        span[3] = perf_counter()  # the checkpoint is the probe's time, not the rank's: not idle
        self.compute.append(span)
        return out

    def forward_one_chunk(self, *args, **kwargs):
        return self._timed("forward", super().forward_one_chunk, *args, **kwargs)

    def backward_one_chunk(self, *args, **kwargs):
        return self._timed("backward", super().backward_one_chunk, *args, **kwargs)

    def buffers(self) -> list[torch.Tensor]:
        """The receive buffers the stage keeps for every micro-batch's activations and gradients."""
        infos = [*self.args_recv_info.values(), *self.grad_recv_info.values()]
        return [i.buffer for chunk in infos for i in chunk if isinstance(i.buffer, torch.Tensor)]


def apply_pipeline(ctx) -> Trainer:
    cfg, device = ctx.cfg, ctx.local_devices[0]
    rank, world, batch_size = ctx.rank, ctx.world, cfg.train.batch_size
    if not dist.is_initialized():
        # One device: a one-stage pipeline (plain gradient accumulation) still needs a group.
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)

    layers = split_layers(num_layers(cfg.model), world, cfg.placement.split)[rank]
    # Only this stage's layers are kept (the others are made one at a time and dropped, to
    # draw the same values as build_model): a rank never holds the whole model.
    submod = nn.Sequential(*(layer for j, layer in stream_layers(cfg.model, cfg.seed) if j in layers))
    submod = submod.to(device.torch_device)
    checkpoint_blocks(submod, cfg.train.activation_checkpointing, ctx.ledger)
    data = make_dataset(cfg.data, cfg.model, cfg.seed).to(device.torch_device)
    return pipelined(ctx, submod, layers, rank, world, None, lambda i: data.batch(i, batch_size), data)


def pipelined(ctx, submod: nn.Module, layers: range, stage_index: int, stages: int, group,
              batch_of, data) -> Trainer:
    """The Trainer of one pipeline stage: `submod` (this stage's `layers`, however else it
    is parallelised) fed micro-batches of `batch_of(step)` by the configured schedule,
    talking to its neighbour stages over `group` (None: the default group)."""
    cfg, device = ctx.cfg, ctx.local_devices[0]
    d, m = device.index, cfg.train.micro_batches
    device_type = device.torch_device.split(":")[0]
    example_in, example_out = _example_io(cfg, data, layers, batch_of(1)[0].shape[0] // m, device_type)
    stage = _TimedStage(submod, stage_index, stages, torch.device(device.torch_device),
                        input_args=example_in, output_args=example_out, group=group,
                        ledger=ctx.ledger, device_index=d)
    first, last = stage_index == 0, stage_index == stages - 1

    def stage_loss(out, y):
        loss = loss_fn(cfg.model, out.float(), y)  # float32 loss under bf16, as the other modes
        if stage.probe.active and stage.compute:
            # The loss is part of the last stage's forward.
            stage.compute[-1][2] = stage.compute[-1][3] = perf_counter()
        return loss

    schedule = SCHEDULES[cfg.train.schedule](stage, n_microbatches=m, loss_fn=stage_loss)
    optimizer = make_optimizer(submod.parameters(), cfg.train)
    ctx.ledger.add_params(submod.parameters(), d)
    ctx.ledger.add_optimizer(optimizer)
    ctx.ledger.checkpoint("setup")

    def step(i, probe):
        x, y = batch_of(i)
        mine = ([x] if first else []) + ([y] if last else [])
        stage.probe, stage.compute = probe, []
        losses: list[torch.Tensor] = []
        probe.other(d, *mine, *stage.buffers())
        # Gradients accumulate over the micro-batches; the schedule divides by m.
        optimizer.zero_grad(set_to_none=True)
        start = perf_counter()
        recording = ctx.ledger.recording(d) if probe.active else contextlib.nullcontext()
        # activations of every micro-batch in flight count on this device
        with recording, autocast(cfg, device_type):
            schedule.step(*([x] if first else []), **({"target": y, "losses": losses} if last else {}),
                          return_outputs=False)
        end = perf_counter()
        if probe.active:
            _spans(probe, d, stage.compute, start, end)
            probe.other(d, *mine, *stage.buffers(), *losses)
            ctx.ledger.checkpoint("backward")
        with probe.phase(d, "optimizer"):
            optimizer.step()
        # Equal micro-batches and a mean loss: the mean of their losses is the batch's loss.
        return torch.stack(losses).mean().detach() if last else None

    return Trainer(step, [optimizer])


def _example_io(cfg, data, layers: range, micro: int, device_type: str) -> tuple[torch.Tensor, torch.Tensor]:
    """This stage's input and output for one micro-batch, as meta tensors: the shapes,
    dtypes and requires_grad the stage sends and receives, found without computing.  In
    bf16 the dtypes are autocast's (an MLP sends bf16, a transformer's residual stream
    stays float32): found on fake tensors, which autocast casts as it would real ones."""
    if cfg.train.precision == "bf16":
        fake = contextlib.nullcontext() if active_fake_mode() else FakeTensorMode(allow_non_fake_inputs=True)
        with fake, autocast(cfg, device_type):
            stage_in, stage_out = _flow(build_model(cfg.model, cfg.seed, device=device_type), data, layers, micro)
        return tuple(torch.empty(t.shape, dtype=t.dtype, device="meta").requires_grad_(t.requires_grad)
                     for t in (stage_in, stage_out))
    return _flow(build_model(cfg.model, cfg.seed, device="meta"), data, layers, micro)


def _flow(model: nn.Module, data, layers: range, micro: int) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.empty_like(data.batch(1, micro)[0], device=next(model.parameters()).device)
    for j in range(layers.start):
        x = model[j](x)
    stage_in = x
    for j in layers:
        x = model[j](x)
    return stage_in, x


def _spans(probe, device: int, compute: list[list], start: float, end: float) -> None:
    """Compute spans as timed, and every gap of the schedule between them as idle."""
    for phase, s, e, _ in compute:
        probe.span(device, phase, s, e)
    # A span's memory checkpoint (up to `resume`) is the probe's time, not a wait.
    for s, e in gaps([(s, resume) for _, s, _, resume in compute], start, end):
        probe.span(device, "idle", s, e)

def memory(f: Rule) -> list[dict[str, int]]:
    """The formula's rule: each device its stage's layers, with the micro-batches in flight
    at the end of its last forward (GPipe: all of them; 1F1B: at most the stages from here
    to the end) and a gradient buffer per micro-batch for what it sends on."""
    t, sh, B, out = f.cfg.train, f.sh, f.batch, []
    m = t.micro_batches
    for s, layers in enumerate(stage_layers(f.cfg, f.n)):
        last = s == f.n - 1
        p, saved, _, fixed = f.stage(layers, last)
        in_flight = B if t.schedule == "gpipe" else min(m, f.n - s) * B / m
        buffers = 0 if last else B * sh.out[layers.stop - 1]
        # zero_grad runs before the schedule: gradients exist mid-step only once a
        # micro-batch's backward has run, which 1F1B does before the last forward.
        grads = p if t.schedule == "1f1b" and m > f.n - s else 0
        fwd = f.device(p, in_flight, layers, grads=grads, acts=in_flight * saved + fixed, other=buffers)
        out.append(peak(fwd, f.device(p, 0, layers, acts=0, other=buffers)))
    return out
