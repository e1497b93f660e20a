"""ddp: DistributedDataParallel — one rank per device, each with a full replica of the
model and its own slice of the global batch.  During backward DDP all-reduces the
gradients bucket by bucket, so every replica takes the same optimizer step.

Memory: params, grads and optimizer state are replicated on every device; DDP also
keeps its all-reduce buckets (a flat copy of the gradients), counted as `other`.
Communication: a comm hook wraps the default all-reduce and, on sampled steps, times
each bucket from the moment it is ready to the moment its all-reduce has finished.
"""

from __future__ import annotations

import contextlib
import weakref
from time import perf_counter

import torch
import torch.distributed as dist
from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook
from torch.distributed.optim import ZeroRedundancyOptimizer
from torch.nn.parallel import DistributedDataParallel

from ..data import make_dataset
from ..models import build_model
from ..shapes import Rule
from ..strategy import Trainer
from . import OPTIMIZER_CLASSES, learned_line, make_optimizer, standard_step
from .levers import checkpoint_blocks


def apply_ddp(ctx) -> Trainer:
    cfg, device = ctx.cfg, ctx.local_devices[0]
    # Same seed on every rank, so every replica starts identical (DDP checks by broadcasting).
    model = build_model(cfg.model, cfg.seed).to(device.torch_device)
    checkpoint_blocks(model, cfg.train.activation_checkpointing, ctx.ledger)
    ddp = DistributedDataParallel(model, device_ids=[device.gpu] if device.kind == "cuda" else None)
    data = make_dataset(cfg.data, cfg.model, cfg.seed).to(device.torch_device)
    if cfg.placement.zero == 1:
        # ZeRO-1: each rank keeps the optimizer state of its share of the parameters only,
        # steps those, and broadcasts them to the others after the step.
        optimizer = ZeroRedundancyOptimizer(ddp.parameters(), optimizer_class=OPTIMIZER_CLASSES[cfg.train.optimizer],
                                            lr=cfg.train.lr)
        local = optimizer.optim
    else:
        optimizer = local = make_optimizer(ddp.parameters(), cfg.train)
    ctx.ledger.add_params(model.parameters(), device.index)
    ctx.ledger.add_optimizer(local)
    ctx.ledger.checkpoint("setup")
    d, rank = device.index, ctx.rank
    sampled = {"probe": None}
    # The buckets' storages, held weakly: DDP rebuilds its buckets after step 1, and holding
    # the old ones here would count (and keep) memory that DDP itself has let go.
    buckets: dict[int, weakref.ref] = {}

    def held():
        return [s for ref in buckets.values() if (s := ref()) is not None]

    # No annotations: DDP checks them, and this module's are strings (__future__).
    def timed_allreduce(group, bucket):
        buckets[bucket.index()] = weakref.ref(bucket.buffer().untyped_storage())
        if bucket.is_last():  # buckets are rebuilt once, after step 1: forget the old ones
            for k in [k for k in buckets if k > bucket.index()]:
                del buckets[k]
        probe = sampled["probe"]
        if probe is None:
            return allreduce_hook(group, bucket)
        start = perf_counter()

        def done(fut: torch.futures.Future) -> torch.Tensor:
            if device.kind == "cuda":  # NCCL completes on the stream, not on the host
                torch.cuda.current_stream().synchronize()
            probe.span(d, "communication", start, perf_counter())
            return fut.value()

        return allreduce_hook(group, bucket).then(done)

    ddp.register_comm_hook(dist.group.WORLD, timed_allreduce)

    def sync(last: bool):  # gradient accumulation: all-reduce only after the last micro-step
        return contextlib.nullcontext() if last else ddp.no_sync()

    def step(i, probe):
        x, y = data.shard(i, cfg.train.batch_size, rank, ctx.world)
        sampled["probe"] = probe if probe.active else None
        # backward returns once every bucket's all-reduce is done
        return standard_step(cfg, ddp, optimizer, probe, d, x, y, sync=sync, held=held)

    return Trainer(step, [optimizer], learned_line(model), model=ddp)


def memory(f: Rule) -> list[dict[str, int]]:
    """The formula's rule: every device holds the whole model and its share of the batch.
    DDP's buckets are one more flat copy of the gradients (other); with ZeRO-1
    (placement.zero 1) each rank keeps the optimizer state of 1/n of the parameters."""
    sh = f.sh
    optimizer = f.state * f.total / f.n if f.cfg.placement.zero == 1 else None
    acts = sh.fixed + f.per * sum(sh.saved) + f.slices
    return [f.device(f.total, f.per, acts=acts, other=f.per * sh.unsaved + f.total, optimizer=optimizer)
            for _ in range(f.n)]
