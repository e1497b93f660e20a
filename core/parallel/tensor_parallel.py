"""tensor-parallel: DTensor tensor parallelism — one rank per device, every device sees
the whole batch, and each wide layer is split across the devices (Megatron style).

In a block the first Linear is split by columns (each device computes some of the
hidden units, or some of the attention heads) and the second by rows (each device
multiplies its slice; one all-reduce sums the partial outputs).  So each block costs
one all-reduce in forward and one in backward, and its weights, their gradients and
their optimizer state sit 1/N on each device.

The narrow ends stay whole on every device (replicated): the MLP's first and last
Linear, the transformer's embedding and norm + LM head, and the LayerNorms.  Their
gradients come out the same on every device, because every device computes them from
the same (all-reduced) activations.
Communication is not timed here: DTensor issues its all-reduces inside the layers and
waits on them lazily, with no hook to hang a stopwatch on.
"""

from __future__ import annotations

from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    ParallelStyle,
    RowwiseParallel,
    parallelize_module,
)

from ..config import ModelConfig
from ..data import make_dataset
from ..models import build_model, tensor_splits
from ..shapes import Rule, tensor_parallel_dims
from ..strategy import Trainer
from . import make_optimizer, materialise, standard_step
from .levers import checkpoint_blocks


def tp_plan(cfg: ModelConfig, layers: range) -> dict[str, ParallelStyle]:
    """parallelize_module's plan for a Sequential of build_model's `layers` (a pipeline
    stage's, or all): each pair of models.tensor_splits, columns then rows, that lies
    wholly in these layers; the ends are not in it, so they stay whole."""
    def local(path: str) -> str:
        index, _, rest = path.partition(".")
        return ".".join(p for p in (str(int(index) - layers.start), rest) if p)

    plan: dict[str, ParallelStyle] = {}
    for split in tensor_splits(cfg):
        if split.layers <= set(layers):
            plan.update({local(p): ColwiseParallel() for p in split.columns})
            plan[local(split.rows)] = RowwiseParallel()
    return plan


def apply_tensor_parallel(ctx) -> Trainer:
    cfg, device = ctx.cfg, ctx.local_devices[0]
    mesh = init_device_mesh("cuda" if device.kind == "cuda" else "cpu", (ctx.world,))
    model = build_model(cfg.model, cfg.seed, device="meta")  # sharded on meta, then materialised
    parallelize_module(model, mesh, tp_plan(cfg.model, range(len(model))))
    # After the split, as torchtitan orders them: a checkpointed block recomputes its
    # sharded matmuls and their all-reduces in backward.
    checkpoint_blocks(model, cfg.train.activation_checkpointing, ctx.ledger)
    materialise(model, cfg, device.torch_device)
    data = make_dataset(cfg.data, cfg.model, cfg.seed).to(device.torch_device)
    optimizer = make_optimizer(model.parameters(), cfg.train)
    ctx.ledger.add_params(model.parameters(), device.index)  # the ledger counts local shards
    ctx.ledger.add_optimizer(optimizer)
    ctx.ledger.checkpoint("setup")
    d = device.index

    def step(i, probe):
        x, y = data.batch(i, cfg.train.batch_size)  # the whole batch on every device
        return standard_step(cfg, model, optimizer, probe, d, x, y)

    return Trainer(step, [optimizer], model=model)


def memory(f: Rule) -> list[dict[str, int]]:
    """The formula's rule: each weight matrix models.tensor_splits names is cut in n (the
    rest whole), the whole batch on every device, and the activations inside the split
    blocks divided by n."""
    shard = f.sharded(tensor_parallel_dims(f.cfg.model))
    acts = f.whole - f.batch * f.sh.split * (1 - 1 / f.n)
    return [f.device(shard[r], f.batch, acts=acts, other=f.batch * f.sh.unsaved) for r in range(f.n)]
