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
    RowwiseParallel,
    parallelize_module,
)

from ..data import make_dataset
from ..models import ResidualMLPBlock, TransformerBlock, build_model
from ..strategy import Trainer
from . import make_optimizer, materialise, standard_step
from .levers import checkpoint_blocks, ledger_saved


def _plan(block):
    if isinstance(block, ResidualMLPBlock):
        return {"fc1": ColwiseParallel(), "fc2": RowwiseParallel()}
    if isinstance(block, TransformerBlock):
        # q, k, v by columns = whole heads per device (Attention counts its heads from q).
        return {"attn.q": ColwiseParallel(), "attn.k": ColwiseParallel(), "attn.v": ColwiseParallel(),
                "attn.out": RowwiseParallel(),
                "ffn.up": ColwiseParallel(), "ffn.down": RowwiseParallel()}
    return None  # an end layer: replicated


def apply_tensor_parallel(ctx) -> Trainer:
    cfg, device = ctx.cfg, ctx.local_devices[0]
    mesh = init_device_mesh("cuda" if device.kind == "cuda" else "cpu", (ctx.world,))
    model = build_model(cfg.model, cfg.seed, device="meta")  # sharded on meta, then materialised
    for block in model:
        plan = _plan(block)
        if plan:
            parallelize_module(block, mesh, plan)
    # After the split, as torchtitan orders them: a checkpointed block recomputes its
    # sharded matmuls and their all-reduces in backward.
    checkpoint_blocks(model, cfg.train.activation_checkpointing, ledger_saved(ctx.ledger))
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

    return Trainer(step, [optimizer])
