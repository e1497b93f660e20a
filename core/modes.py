"""What each parallelism mode is: the one registry.

Validation, the estimate (formula and trace), the panel and the runtime all read a mode's
facts from here, so a new mode touches this table plus its own module under
`core.parallel`.  Plain data: this module imports nothing from paralab, so anything may
import it.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Mode:
    name: str
    module: str
    """Module under core.parallel that defines the mode: `apply_<module>(ctx)`, its runtime
    (core.strategy), and `memory(rule)`, its rule for the formula (core.shapes)."""
    one_process_per_device: bool
    """True: one rank per logical device (torch.distributed); False: one process drives all."""
    splits: str
    """What it divides over the devices: nothing, batch (replicas, each a share of the
    batch), layers (consecutive layers per device), parameters (shards, gathered when
    used), tensors (each weight matrix cut) or composed (the mesh's axes, core.plan)."""
    note: str
    """What it does, in the panel's words."""
    watch: str
    """What to look at while it runs."""
    axis: str = ""
    """The device-mesh axis it is the one-axis shortcut of (dp, shard, tp, pp); '' none."""
    symmetric: bool = False
    """Ranks run the same program on their own shard or share of the batch: ranks whose
    tensors have the same sizes trace the same, so the estimate traces one of each."""
    gloo_cuda: bool = True
    """Runs on logical devices that share one GPU: there the ranks talk through gloo, which
    runs only all-reduce and broadcast on CUDA tensors."""
    batch_evenly: bool = False
    """The global batch must split evenly over the devices."""
    accumulates: bool = True
    """Runs train.grad_accumulation's micro-steps before each optimizer step."""
    checkpoints: bool = True
    """Can checkpoint activations: its blocks live from forward to backward, to recompute with."""
    zero: tuple[int, ...] = ()
    """The ZeRO stages (placement.zero) it takes besides 0, its own: 1 is ddp's sharded
    optimizer state (ZeroRedundancyOptimizer), 2 and 3 FSDP's choice to reshard after forward."""

    def world_size(self, n_devices: int) -> int:
        return n_devices if self.one_process_per_device else 1


REGISTRY: dict[str, Mode] = {m.name: m for m in (
    Mode("single", "single", False, "nothing",
         "One device trains the whole model: the baseline every other mode must match.",
         "Watch: the loss curve the other modes reproduce, and one device's memory by category."),
    Mode("data-parallel", "data_parallel", False, "batch",
         "nn.DataParallel, as in the seed: one process copies the model to every device each step "
         "and splits the batch.",
         "Watch: device 0 gathers outputs and gradients, so its memory stands above the rest.",
         checkpoints=False),  # its replicas are made anew each step
    Mode("model-parallel", "model_parallel", False, "layers",
         "The naive split, as in the seed: consecutive layers live on different devices and "
         "activations hop between them.",
         "Watch the timeline: only one device computes at a time, the others idle."),
    Mode("ddp", "ddp", True, "batch",
         "DistributedDataParallel: one process per device, each with the whole model and its share "
         "of the batch.",
         "Watch: equal memory on every device, and all-reduce (communication) during backward.",
         axis="dp", symmetric=True, batch_evenly=True, zero=(1,)),
    Mode("pipeline", "pipeline", True, "layers",
         "Pipeline: layers in stages on the devices; micro-batches flow through them (GPipe or 1F1B).",
         "Watch the timeline's idle bubbles shrink with more micro-batches; 1F1B holds fewer activations.",
         axis="pp", gloo_cuda=False, accumulates=False),  # over its micro-batches already
    Mode("fsdp", "fsdp", True, "parameters",
         "FSDP2: parameters, gradients and optimizer state are sharded over the devices and gathered "
         "layer by layer when needed.",
         "Watch: params, grads and optimizer memory divided by the device count, against DDP.",
         axis="shard", symmetric=True, gloo_cuda=False, batch_evenly=True, zero=(2, 3)),
    Mode("tensor-parallel", "tensor_parallel", True, "tensors",
         "Tensor parallel (DTensor): every layer's weight matrices are split over the devices.",
         "Watch: params per device shrink; communication appears inside forward and backward.",
         axis="tp", symmetric=True),
    Mode("mesh", "mesh", True, "composed",
         "A device mesh: the axes of mesh.pp, mesh.dp, mesh.shard and mesh.tp composed — pipeline "
         "stages outermost, then replicas, shards, and tensor-parallel splits innermost.",
         "Watch: each axis divides what it divides — shard and tp the parameters, dp and shard "
         "the batch, pp the layers — and adds its own communication.", gloo_cuda=False, zero=(2, 3)),
)}

MODES = tuple(REGISTRY)


def mode(name: str) -> Mode:
    """The registry's entry; a KeyError names the known modes (validation says it first)."""
    try:
        return REGISTRY[name]
    except KeyError:
        raise KeyError(f"mode {name!r} is not one of: {', '.join(MODES)}") from None
