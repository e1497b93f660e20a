"""fsdp: fully sharded data parallel (FSDP2 `fully_shard`) — one rank per device, each
with its slice of the global batch, as in ddp, but each device keeps only 1/N of every
parameter, gradient and optimizer state (ZeRO-3).

Each layer of the nn.Sequential is one FSDP unit: just before it runs, its full
parameters are all-gathered; after backward its gradients are reduce-scattered so each
device keeps the gradient of its own shard.  placement.reshard_after_forward=True frees
the gathered parameters after forward and gathers them again in backward (least
memory); False keeps them until backward (ZeRO-2-like: one all-gather fewer).

Memory: params, grads and optimizer count the local shards (padded so dim 0 splits
evenly over the devices).  The gathered full parameters are working copies, not what
the device owns: FSDP makes them by resizing storages, which the recorder sees, and
they count as `temporaries` while they are alive — never as activations (the ledger
skips parameters that autograd saves), even when kept from forward until backward.
Communication: every all-gather and reduce-scatter is timed on sampled steps.

placement.cpu_offload (FSDP2's CPUOffloadPolicy): the shards, their gradients and the
optimizer state live in host memory and the optimizer steps there; each all-gather first
copies the shard to the device, each reduce-scatter's output is copied back to the host.
On a simulated device host and device are the same CPU memory and those copies are no-ops,
so the ledger is told which storages are the host's (core.memory).
"""

from __future__ import annotations

import contextlib
import warnings
from time import perf_counter

import torch
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import (
    CPUOffloadPolicy,
    MixedPrecisionPolicy,
    OffloadPolicy,
    fully_shard,
)

try:  # FSDP's default collectives, to wrap with a stopwatch (torch >= 2.8; private names)
    from torch.distributed.fsdp._fully_shard._fsdp_collectives import (
        DefaultAllGather,
        DefaultReduceScatter,
    )
except ImportError:  # older torch: train untimed
    DefaultAllGather = DefaultReduceScatter = None

from ..data import make_dataset
from ..models import build_model
from ..shapes import Rule
from ..strategy import Trainer
from . import make_optimizer, materialise, standard_step
from .levers import checkpoint_blocks

# A Linear on a 3-D input returns a view of its 2-D matmul, so FSDP2 warns that an in-place
# op on that output would skip its hook; paralab's models never modify a layer's output in
# place (residuals are `x + f(x)`), so the warning would only alarm the person at the terminal.
warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module .* returned a view tensor")


def apply_fsdp(ctx) -> Trainer:
    cfg, device = ctx.cfg, ctx.local_devices[0]
    mesh = init_device_mesh("cuda" if device.kind == "cuda" else "cpu", (ctx.world,))
    # Built on the meta device and sharded there; each rank then materialises its shards
    # only, with single's initial values (a rank never holds the whole model).
    model = build_model(cfg.model, cfg.seed, device="meta")
    # Checkpointing inside FSDP, as torchtitan orders them: FSDP gathers a block's
    # parameters before its forward and again before its backward, which recomputes it.
    checkpoint_blocks(model, cfg.train.activation_checkpointing, ctx.ledger)
    reshard = cfg.placement.reshards_after_forward()  # ZeRO-3, or ZeRO-2 (placement.zero)
    # bf16: FSDP gathers the parameters in bf16 and computes in bf16; the shards it keeps,
    # their gradients (reduce-scattered in fp32) and the optimizer state stay fp32.
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) \
        if cfg.train.precision == "bf16" else MixedPrecisionPolicy()
    # Bottom-up: each layer is a unit, then the root takes whatever is left (nothing here).
    offload = offload_policy(cfg, device)
    for layer in model:
        fully_shard(layer, mesh=mesh, reshard_after_forward=reshard, mp_policy=policy, offload_policy=offload)
    fully_shard(model, mesh=mesh, reshard_after_forward=reshard, mp_policy=policy, offload_policy=offload)
    # FSDP wants offloaded shards made on the CPU (it copies them to the device to gather).
    materialise(model, cfg, "cpu" if cfg.placement.cpu_offload else device.torch_device)
    timer = _CommTimer(device)
    if DefaultAllGather is not None and hasattr(model, "set_custom_all_gather"):
        for layer in model:
            layer.set_custom_all_gather(timer.all_gather)
            layer.set_custom_reduce_scatter(timer.reduce_scatter)
    data = make_dataset(cfg.data, cfg.model, cfg.seed).to(device.torch_device)
    optimizer = make_optimizer(model.parameters(), cfg.train)  # on the shards only
    ctx.ledger.add_params(model.parameters(), device.index)
    ctx.ledger.add_optimizer(optimizer)
    if cfg.placement.cpu_offload:
        on_host(ctx.ledger, model.parameters(), device)
    ctx.ledger.checkpoint("setup")
    d, rank = device.index, ctx.rank

    @contextlib.contextmanager
    def sync(last: bool):
        # Gradient accumulation: reduce-scatter only after the last micro-step; until then
        # every rank accumulates the whole (unsharded) gradients.
        model.set_requires_gradient_sync(last)
        yield

    def step(i, probe):
        x, y = data.shard(i, cfg.train.batch_size, rank, ctx.world)
        timer.probe = probe if probe.active else None
        return standard_step(cfg, model, optimizer, probe, d, x, y,
                             sync=sync if cfg.train.grad_accumulation > 1 else None)

    return Trainer(step, [optimizer], model=model)


def offload_policy(cfg, device) -> OffloadPolicy:
    """placement.cpu_offload: FSDP keeps shards, gradients and optimizer state on the host.
    Pinned host memory lets a GPU's copies run asynchronously; a simulated device has none."""
    if not cfg.placement.cpu_offload:
        return OffloadPolicy()
    return CPUOffloadPolicy(pin_memory=device.kind == "cuda")


def on_host(ledger, params, device) -> None:
    """Tell the ledger that this device's shards, their gradients and the optimizer state
    are host memory.  On a simulated device FSDP's device-to-host copy of a reduce-scattered
    gradient is a no-op (both are the CPU): the gradient leaves the device when FSDP hands it
    over (it calls the shard's post-accumulate-grad hooks then), as a GPU's copy would free
    the reduce-scatter's output.  A GPU's allocator sees its own memory: no hook there (it
    would make FSDP's copy synchronous)."""
    ledger.offload(device.index)
    if device.kind != "sim":
        return
    for p in params:
        p.register_post_accumulate_grad_hook(lambda p: ledger.to_host(p.grad, device.index))


class _CommTimer:
    """FSDP's own collectives with a stopwatch around them on sampled steps.  FSDP
    calls both synchronously by default, so the call is the whole collective on the
    CPU (gloo); on CUDA the host waits for the stream, only on sampled steps."""

    def __init__(self, device) -> None:
        self.device = device
        self.probe = None
        if DefaultAllGather is None:
            return
        timer = self

        class AllGather(DefaultAllGather):
            def __call__(self, *args, **kwargs):
                return timer.timed(super().__call__, *args, **kwargs)

        class ReduceScatter(DefaultReduceScatter):
            def __call__(self, *args, **kwargs):
                return timer.timed(super().__call__, *args, **kwargs)

        self.all_gather, self.reduce_scatter = AllGather(), ReduceScatter()

    def timed(self, collective, *args, **kwargs):
        probe = self.probe
        if probe is None:
            return collective(*args, **kwargs)
        start = perf_counter()
        work = collective(*args, **kwargs)
        if work is not None:  # an asynchronous call (FSDP's unshard_async_op)
            work.wait()
        if self.device.kind == "cuda":
            torch.cuda.current_stream().synchronize()
        probe.span(self.device.index, "communication", start, perf_counter())
        return work


def memory(f: Rule) -> list[dict[str, int]]:
    """The formula's rule: each device holds 1/n of every parameter (dim 0, padded as FSDP
    pads), its gradient and optimizer state, and its share of the batch, and what FSDP
    gathers (Rule.gathered; bf16 gathers bf16 copies, no autocast copy).  Accumulating
    without gradient sync, every rank keeps the whole unsharded gradients between
    micro-steps."""
    sh, t = f.sh, f.cfg.train
    shard = f.sharded(lambda name, shape: 0, pad=True)
    accumulating = f.total if t.grad_accumulation > 1 else 0

    def gathered(backward: bool) -> float:
        return f.gathered(max(sh.params), f.total, backward) + accumulating

    acts = sh.fixed + f.per * sum(sh.saved) + f.slices
    return [f.fsdp_peak(shard[r], f.per, acts, f.per * sh.unsaved, gathered) for r in range(f.n)]
