"""A GPU's clock for simulated devices: each operation of a sampled step gets a modelled
duration from its real shapes, and each collective one from its real message size.

  compute        max(FLOPs / peak FLOP/s, bytes moved / memory bandwidth) + launch cost,
                 FLOPs from torch's own formulas (torch.utils.flop_counter)
  collectives    the alpha-beta model of NCCL's ring algorithms over the GPU model's link:
                 all-reduce 2(n-1)/n * S/B + 2(n-1) * a; all-gather and reduce-scatter
                 (n-1)/n * S/B + (n-1) * a; send/recv S/B + a; a copy between two devices
                 of one process S/B + a
  CPU offload    each all-gather is preceded by the shard's host-to-device copy and each
                 reduce-scatter followed by its output's device-to-host copy, at the GPU
                 model's PCIe rate (S/pcie + launch); the optimizer step runs on the host,
                 off the GPU's streams, modelled at HOST_GBS (bytes it moves / rate + a
                 fixed cost per op): the GPU idles meanwhile

OpLog is the recorder's second listener (core.recorder): it writes down what each device
did, in program order, with what it read and wrote; core.schedule lays those lists out
on streams across ranks.  The numbers stay real: only the time is modelled.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils._pytree import tree_leaves
from torch.utils.flop_counter import flop_registry

from .gpus import GpuModel
from .memory import storage_of
from .recorder import tensors_in

# ---- one operation ------------------------------------------------------------------------------

COLLECTIVES = {
    "allreduce_": "all-reduce", "all_reduce": "all-reduce", "all_reduce_": "all-reduce",
    "_allgather_base_": "all-gather", "allgather_": "all-gather", "all_gather_into_tensor": "all-gather",
    "allgather_into_tensor_coalesced_": "all-gather", "all_gather_into_tensor_coalesced": "all-gather",
    "_reduce_scatter_base_": "reduce-scatter", "reduce_scatter_": "reduce-scatter",
    "reduce_scatter_tensor": "reduce-scatter", "reduce_scatter_tensor_coalesced_": "reduce-scatter",
    "reduce_scatter_tensor_coalesced": "reduce-scatter", "broadcast_": "broadcast", "broadcast": "broadcast",
    "send": "send", "recv_": "recv",
}
# No kernel runs for these: allocation, metadata and profiler marks.  `_local_scalar_dense`
# (.item()) is the optimizers reading their step counters, which live on the host in a
# CUDA run (torch keeps them on the CPU unless capturable or fused).
NO_KERNEL = {"empty", "empty_strided", "empty_like", "new_empty", "new_empty_strided", "_to_copy_meta",
             "wait_tensor", "detach", "lift_fresh", "_record_function_enter_new", "_record_function_exit",
             "_local_scalar_dense"}


# CPU offload's optimizer step on the host: torch's CPU kernels are memory-bound there.
# 20 GB/s is a modelled figure (what a few cores' elementwise kernels reach over DDR
# memory, a fraction of a socket's peak), and 5 us a CPU op's dispatch cost.
HOST_GBS = 20.0
HOST_OP_US = 5.0
FLOAT = 4  # the shards FSDP offloads are float32 master weights (bf16 gathers a cast of them)


@dataclass(slots=True)
class Op:
    """What one device did: compute (kind 'compute'), a transfer ('comm'), or its host's
    work on its behalf ('host': CPU offload's optimizer step)."""

    device: int
    phase: str
    kind: str
    seconds: float
    reads: tuple[int, ...]
    writes: tuple[int, ...]
    name: str = ""
    bytes: int = 0
    flops: float = 0.0
    group: str = ""
    """Collectives: the group's name, the same on every member; send/recv: 'src->dst'."""
    members: tuple[int, ...] = ()


def collective_seconds(kind: str, nbytes: float, n: int, gpu: GpuModel) -> float:
    """NCCL's ring algorithms in the alpha-beta model (nccl-tests' PERFORMANCE.md)."""
    beta, alpha = 1 / (gpu.link_gbs * 1e9), gpu.link_latency_us * 1e-6
    if n <= 1 and kind not in ("send", "recv", "copy"):
        return 0.0
    if kind == "all-reduce":
        return 2 * (n - 1) / n * nbytes * beta + 2 * (n - 1) * alpha
    if kind in ("all-gather", "reduce-scatter", "broadcast"):
        return (n - 1) / n * nbytes * beta + (n - 1) * alpha
    return nbytes * beta + alpha  # send/recv, a copy between two devices


def bus_factor(kind: str, n: int) -> float:
    """nccl-tests' bus bandwidth = algorithm bandwidth × this."""
    if kind == "all-reduce":
        return 2 * (n - 1) / n if n > 1 else 0.0
    if kind in ("all-gather", "reduce-scatter"):
        return (n - 1) / n if n > 1 else 0.0
    return 1.0


class OpLog:
    """Listens to the recorder: each operation as an Op with its modelled duration."""

    def __init__(self, gpu: GpuModel, where: Any, tf32: bool = False, offload: bool = False) -> None:
        self.gpu, self.where, self.tf32 = gpu, where, tf32
        self.offload = offload
        """placement.cpu_offload: host<->device copies around FSDP's collectives, the optimizer on the host."""
        self.ops: list[Op] = []

    def __call__(self, func: Any, args: Any, kwargs: Any, out: Any) -> None:
        name = func.__name__.split(".")[0]
        device, phase = self.where()
        ins, outs = tensors_in((args, kwargs)), tensors_in(out)
        reads = tuple(id(s) for t in ins if (s := storage_of(t)) is not None)
        writes = tuple(id(s) for t in outs if (s := storage_of(t)) is not None)
        kind = COLLECTIVES.get(name)
        if kind is not None and func.namespace in ("c10d", "_c10d_functional"):
            self._collective(device, phase, kind, args, ins, reads, outs)
            return
        # prim ops (a tensor's device, layout...) reach the recorder under fake tensors only.
        if name in NO_KERNEL or func.namespace == "prim" or (func.is_view and outs):
            if name == "wait_tensor":  # funcol: the result is used from here on
                self.ops.append(Op(device, phase, "wait", 0.0, reads, writes, name))
            return
        moved = sum(t.numel() * t.element_size() for t in (*ins, *outs))
        if phase == "communication":  # a copy from another device of this process (.to())
            seconds = collective_seconds("copy", moved / 2, 2, self.gpu)
            self.ops.append(Op(device, phase, "comm", seconds, reads, writes, "copy", moved // 2))
            return
        if self.offload and phase == "optimizer":  # the host steps; no GPU kernel
            seconds = moved / (HOST_GBS * 1e9) + HOST_OP_US * 1e-6
            self.ops.append(Op(device, phase, "host", seconds, reads, writes, name, moved))
            return
        flops = _flops(func, args, kwargs, out)
        dtype = outs[0].dtype if outs else torch.float32
        seconds = max(flops / self.gpu.peak_flops(dtype, self.tf32), moved / (self.gpu.memory_bandwidth_gbs * 1e9))
        self.ops.append(Op(device, phase, "compute", seconds + self.gpu.launch_us * 1e-6, reads, writes,
                           name, moved, flops))

    def _collective(self, device: int, phase: str, kind: str, args: Any, ins: list, reads: tuple,
                    outs: list) -> None:
        pg = next((a for a in tree_leaves(args) if isinstance(a, torch.ScriptObject)), None)
        members, name = _group(pg, args)
        tensors = ins if kind not in ("all-gather",) else ins[-1:]  # the input shard, not the output
        nbytes = sum(t.numel() * t.element_size() for t in tensors)
        if kind == "all-gather":
            nbytes *= len(members)  # the algorithm's size is the gathered whole
        if kind in ("send", "recv"):
            peer = next(a for a in args if isinstance(a, int))
            peer = members[peer] if peer < len(members) else peer
            me = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
            name = f"{me}->{peer}" if kind == "send" else f"{peer}->{me}"
        seconds = collective_seconds(kind, nbytes, len(members), self.gpu)
        if self.offload and kind == "all-gather" and ins:  # the shard comes from the host first
            self._pcie("host-to-device", device, ins[-1], ins[-1].numel() * FLOAT)
        # The collective writes into its tensors (all in place in c10d): work that reads them waits.
        self.ops.append(Op(device, "communication", "comm", seconds, reads, reads, kind, nbytes,
                           group=name, members=tuple(members)))
        if self.offload and kind == "reduce-scatter" and outs:  # the gradient shard goes to the host
            self._pcie("device-to-host", device, outs[0], outs[0].numel() * outs[0].element_size())

    def _pcie(self, name: str, device: int, t: torch.Tensor, nbytes: int) -> None:
        """A copy between the device and its host, on the copy stream; what reads `t` waits for it."""
        s = storage_of(t)
        touched = (id(s),) if s is not None else ()
        seconds = nbytes / (self.gpu.pcie_gbs * 1e9) + self.gpu.launch_us * 1e-6
        self.ops.append(Op(device, "communication", "comm", seconds, touched, touched, name, nbytes))


def _group(pg: Any, args: Any) -> tuple[list[int], str]:
    import torch.distributed as dist

    try:
        group = dist.ProcessGroup.unbox(pg) if pg is not None else None
        if group is None:  # functional collectives name their group: their last string
            name = [a for a in args if isinstance(a, str)][-1]  # (the first is all_reduce's op)
            from torch.distributed.distributed_c10d import _resolve_process_group

            group = _resolve_process_group(name)
        return dist.get_process_group_ranks(group), group.group_name
    except Exception:  # the fake process group of a trace, a group torch cannot name
        world = dist.get_world_size() if dist.is_initialized() else 1
        return list(range(world)), "world"


def _flops(func: Any, args: Any, kwargs: Any, out: Any) -> float:
    formula = flop_registry.get(func._overloadpacket)
    if formula is not None:
        try:
            return float(formula(*args, **kwargs, out_val=out))
        except Exception:
            pass
    return float(sum(t.numel() for t in tensors_in(out)))  # elementwise: about one op per output element


def mfu(flops: float, seconds: float, gpu: GpuModel, dtype: torch.dtype = torch.float32, tf32: bool = False) -> float:
    """Model FLOPs utilization: the FLOPs a step did over what the GPU could do meanwhile."""
    return flops / (seconds * gpu.peak_flops(dtype, tf32)) if seconds > 0 else math.nan
