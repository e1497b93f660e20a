"""mesh: the axes of a device mesh composed — pipeline × data parallel × FSDP × tensor parallel.

The config's degrees (core.plan: pp, dp, shard, tp, outermost first) become one
DeviceMesh with named axes, and the model is parallelised in one fixed order, the order
torchtitan applies them in and the order the lesson reads:

  1. pipeline   this rank's stage keeps its consecutive layers (mesh.pp stages); every
                other axis then works inside the stage
  2. tensor     each block's weight matrices are split over the tp group, as in
                tensor-parallel (columns, then rows); the ends stay whole
  3. shards     every layer is an FSDP2 unit over the dp × shard axes: sharded over
                `shard`, replicated over `dp` (HSDP; with shard = 1, plain replicas
                whose gradients are all-reduced)
  4. values     the model was built on the meta device and is given single's values,
                each rank copying in only its own tensor-parallel slice before FSDP
                cuts that into shards

The batch is split over dp × shard (a tp group shares its share); the pipeline cuts each
share into micro-batches, and the last stage's ranks report the loss.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor.parallel import parallelize_module

from ..data import make_dataset
from ..models import build_model, num_layers, split_layers
from ..plan import AXES, Plan
from ..strategy import Trainer
from . import make_optimizer, materialise, standard_step
from .fsdp import DefaultAllGather, _CommTimer, offload_policy, on_host
from .levers import checkpoint_blocks, ledger_saved
from .pipeline import pipelined
from .tensor_parallel import tp_plan


def apply_mesh(ctx) -> Trainer:
    cfg, device = ctx.cfg, ctx.local_devices[0]
    plan = Plan.of(cfg, ctx.world)
    mesh = init_device_mesh("cuda" if device.kind == "cuda" else "cpu", plan.shape, mesh_dim_names=AXES)
    at = plan.coordinate(ctx.rank)

    # 1. pipeline: this stage's layers, built on meta (nothing allocated yet)
    layers = split_layers(num_layers(cfg.model), plan.pp, cfg.placement.split)[at["pp"]]
    whole = build_model(cfg.model, cfg.seed, device="meta")
    model = nn.Sequential(*(whole[j] for j in layers))
    # 2. tensor parallel inside each block
    if plan.tp > 1:
        parallelize_module(model, mesh["tp"], tp_plan(cfg.model, layers))
    # 2b. activation checkpointing, around the split blocks (their recompute redoes the
    # tensor-parallel all-reduces), inside the FSDP units
    checkpoint_blocks(model, cfg.train.activation_checkpointing, ledger_saved(ctx.ledger))
    # 4 before 3: FSDP shards the values it is given, so each rank first copies in its own
    # tensor-parallel slice (never the whole layer beyond one at a time)
    materialise(model, cfg, device.torch_device, layers)
    # 3. shards and replicas: bottom-up, each layer a unit, then the root
    timer = _CommTimer(device)
    if plan.batch_ways > 1:
        dp_mesh = mesh["dp", "shard"] if plan.dp > 1 else mesh["shard"]
        reshard = cfg.placement.reshards_after_forward()  # ZeRO-3, or ZeRO-2
        # bf16: FSDP gathers bf16 copies of the fp32 shards and reduces gradients in fp32.
        policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) \
            if cfg.train.precision == "bf16" else MixedPrecisionPolicy()
        # placement.cpu_offload (shard > 1): the shards FSDP cuts from the values go to the host.
        offload = offload_policy(cfg, device)
        for layer in model:
            fully_shard(layer, mesh=dp_mesh, reshard_after_forward=reshard, mp_policy=policy,
                        offload_policy=offload)
            if DefaultAllGather is not None and hasattr(layer, "set_custom_all_gather"):
                layer.set_custom_all_gather(timer.all_gather)
                layer.set_custom_reduce_scatter(timer.reduce_scatter)
        fully_shard(model, mesh=dp_mesh, reshard_after_forward=reshard, mp_policy=policy, offload_policy=offload)
        if cfg.placement.cpu_offload:
            on_host(ctx.ledger, model.parameters(), device)

    data = make_dataset(cfg.data, cfg.model, cfg.seed).to(device.torch_device)
    share = plan.batch_index(ctx.rank)

    def batch_of(i):
        return data.shard(i, cfg.train.batch_size, share, plan.batch_ways)

    if plan.pp > 1:
        trainer = pipelined(ctx, model, layers, at["pp"], plan.pp, mesh["pp"].get_group(), batch_of, data)
        inner = trainer.step

        def piped(i, probe):
            timer.probe = probe if probe.active else None
            return inner(i, probe)

        return Trainer(piped, trainer.optimizers)

    optimizer = make_optimizer(model.parameters(), cfg.train)
    ctx.ledger.add_params(model.parameters(), device.index)
    ctx.ledger.add_optimizer(optimizer)
    ctx.ledger.checkpoint("setup")

    @contextlib.contextmanager
    def sync(last: bool):
        # Gradient accumulation: reduce only after the last micro-step.
        model.set_requires_gradient_sync(last)
        yield

    def step(i, probe):
        x, y = batch_of(i)
        timer.probe = probe if probe.active else None
        return standard_step(cfg, model, optimizer, probe, device.index, x, y,
                             sync=sync if plan.batch_ways > 1 else None)

    return Trainer(step, [optimizer], model=model)
