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
import math

import torch
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor.parallel import parallelize_module

from ..data import make_dataset
from ..models import build_model, num_layers, split_layers, tensor_splits
from ..plan import AXES, Plan
from ..shapes import FLOAT, Rule, chunk_len, named_shapes, stage_layers, tensor_parallel_dims
from ..strategy import Trainer
from . import make_optimizer, materialise, standard_step
from .fsdp import DefaultAllGather, _CommTimer, offload_policy, on_host
from .levers import checkpoint_blocks
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
    checkpoint_blocks(model, cfg.train.activation_checkpointing, ctx.ledger)
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


def memory(f: Rule) -> list[dict[str, int]]:
    """The formula's rule, rank by rank: its stage's layers (pp), each block's tp slice,
    that sharded over `shard` (padded as FSDP pads), its share of the batch (dp × shard)
    with the pipeline's micro-batches in flight; a block's split activations divided by tp."""
    return [_rank_bytes(f, r) for r in range(f.n)]


def _rank_bytes(f: Rule, rank: int) -> dict[str, int]:
    cfg, sh, t = f.cfg, f.sh, f.cfg.train
    plan = Plan.of(cfg, 0)
    at = plan.coordinate(rank)
    stage, ways = at["pp"], plan.batch_ways
    layers = stage_layers(cfg, plan.pp)[stage]
    params, unsharded, tp_dim = 0, {}, tensor_parallel_dims(cfg.model)
    for name, shape in named_shapes(cfg.model):
        layer = int(name.split(".")[0])
        if layer not in layers:
            continue
        dims = list(shape)
        dim = tp_dim(name, shape) if plan.tp > 1 else None
        if dim is not None and dim < len(dims):
            dims[dim] = chunk_len(dims[dim], plan.tp, at["tp"])
        whole = math.prod(dims) * FLOAT
        unsharded[layer] = unsharded.get(layer, 0) + whole  # what FSDP gathers: a layer, tp-sliced
        if plan.shard > 1 and dims:  # FSDP pads dim 0 to a multiple of the shard count
            whole = -(-dims[0] // plan.shard) * math.prod(dims[1:]) * FLOAT
        params += whole
    samples = t.batch_size / t.grad_accumulation / ways  # one micro-step's share
    m = t.micro_batches if plan.pp > 1 else 1
    in_flight = samples if plan.pp == 1 or t.schedule == "gpipe" else min(m, plan.pp - stage) * samples / m
    splits = tensor_splits(cfg.model)
    here = sum(1 for s in splits if s.layers <= set(layers)) / max(len(splits), 1)
    split = sh.split * here * (1 - 1 / plan.tp)
    first, last = stage == 0, stage == plan.pp - 1
    acts = in_flight * (sum(sh.saved[i] for i in layers) - split) + (sh.fixed if first or last else 0)
    other = in_flight * sh.unsaved if last else samples * sh.out[layers.stop - 1]
    if ways == 1:
        return f.device(params, in_flight, layers, acts=acts, other=other)
    # FSDP units over dp × shard (plain replicas when shard = 1 are units too).
    # Accumulating without gradient sync, a rank keeps its unsharded gradients between micro-steps.
    largest, total = max(unsharded.values()), sum(unsharded.values())
    accumulating = total if t.grad_accumulation > 1 else 0
    return f.fsdp_peak(params, in_flight, acts, other,
                       lambda backward: f.gathered(largest, total, backward) + accumulating, layers,
                       pipelined=plan.pp > 1)
