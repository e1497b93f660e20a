"""The formula: bytes from the model's shapes and the mode's rule for who holds what
(replicated, sharded, split by layers).  Cheap and explainable, less exact than the trace."""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from .config import ModelConfig, RunConfig
from .devices import Device
from .predicted import DeviceEstimate

FLOAT = 4  # paralab trains in float32
LONG = 8


@dataclass(frozen=True)
class Shapes:
    """Bytes of a model, per layer: what the formula multiplies and adds."""

    params: list[int]
    """Parameter bytes of each layer."""
    saved: list[float]
    """Bytes autograd saves for backward per sample in each layer, each tensor once; a
    layer's output that the next layer saves counts here, with the layer that made it."""
    out: list[float]
    """Output bytes per sample of each layer (what crosses to the next device)."""
    io: float
    """Input and target bytes per sample (both saved: by the first layer and by the loss)."""
    unsaved: float
    """Output bytes per sample that autograd does not keep (the transformer's logits), and
    the loss (on the CPU, MSE's is a view of a buffer as large as the output)."""
    split: float
    """Per sample: the saved bytes of the blocks that tensor parallel splits."""
    keeps_output: tuple[bool, ...]
    """Per layer: whether the layer itself saves its output (a closing ReLU does)."""
    fixed: float = 0.0
    """Saved bytes that do not grow with the batch (the transformer's positions)."""
    loss: float = 0.0
    """Of `saved` on the last layer, per sample: what the loss keeps (output and target)."""


def shapes(cfg: RunConfig) -> Shapes:
    m = cfg.model
    params = layer_params(cfg)
    n = len(params)
    if m.kind in ("linear", "split-nn"):
        widths = [1] if m.kind == "linear" else [50, 20, 1]
        d_in = 1 if m.kind == "linear" else 10
        saved = [(d_in + w) * FLOAT for w in widths]
        saved[-1] = (d_in if n == 1 else 0) * FLOAT + 2 * FLOAT  # the loss keeps output and target
        # Tensor parallel cuts the SplitNN's 50 hidden units (the ReLU's saved output).
        return Shapes(params, saved, [w * FLOAT for w in widths], (d_in + 1) * FLOAT, FLOAT,
                      50.0 * FLOAT if n == 3 else 0.0,
                      (False,) if n == 1 else (True, True, False), loss=2 * FLOAT)
    if m.kind == "mlp":
        w = m.width
        # First layer: input and ReLU output; a block: its ReLU output (2w) and its own
        # output, which the next layer saves; the loss: output and target.
        saved = [(m.in_features + w) * FLOAT] + [3 * w * FLOAT] * m.depth + [2 * m.out_features * FLOAT]
        out = [w * FLOAT] * (n - 1) + [m.out_features * FLOAT]
        return Shapes(params, saved, out, (m.in_features + m.out_features) * FLOAT, m.out_features * FLOAT,
                      m.depth * 2 * w * FLOAT, (True,) + (False,) * (n - 1), loss=2 * m.out_features * FLOAT)
    d, t, v, h = m.width, m.seq_len, m.vocab, m.heads
    # A block saves per token: 2 norm outputs, q k v, attention output, the residual, the
    # 4d up-projection and its gelu, its own output (16 d); norm statistics (4) and
    # attention's log-sum-exp (one per head).
    block = t * (16 * d + 4 + h) * FLOAT
    embed = t * (LONG + d * FLOAT)  # token ids, the summed embedding
    head = t * ((d + v + 2) * FLOAT + LONG)  # norm output and statistics, log-softmax, targets
    saved = [embed] + [block] * m.depth + [head]
    out = [t * d * FLOAT] * (n - 1) + [t * v * FLOAT]
    return Shapes(params, saved, out, 2 * t * LONG, t * v * FLOAT, m.depth * t * (12 * d + h) * FLOAT,
                  (False,) * n, fixed=t * LONG + FLOAT, loss=t * (v * FLOAT + LONG))


def with_levers(cfg: RunConfig, sh: Shapes) -> tuple[Shapes, float]:
    """The shapes as the levers change them, and the bytes per sample one block recomputes
    in backward (checkpointing).

    bf16 (autocast): the MLP saves everything in bf16 but the loss's float32 output and
    target; a transformer block keeps its residual stream (its input and the sum after
    attention) and LayerNorm's statistics in float32, the other 14 d per token in bf16; the
    embedding and the head stay float32.  `blocks` keeps only each block's input (counted
    as the previous layer's output); `selective` keeps its input and every other matmul's
    output (mlp: fc1, 2w; transformer: q, v, attention's output and the 4d up-projection)."""
    m, t = cfg.model, cfg.train
    saved, out, split, recompute = list(sh.saved), list(sh.out), sh.split, 0.0
    if m.kind not in ("mlp", "transformer"):
        return sh, 0.0
    bf16, d, tokens = t.precision == "bf16", m.width, (m.seq_len if m.kind == "transformer" else 1)
    half = 0.5 if bf16 else 1.0
    if m.kind == "mlp":
        block, kept = sh.saved[1] * half, {"blocks": d * FLOAT * half, "selective": 3 * d * FLOAT * half}
        if bf16:
            saved[0] *= half
            saved[-1] = (saved[-1] - sh.loss) * half + sh.loss
            out = [o * half for o in out]
            split *= half
    else:
        residual = tokens * d * FLOAT  # float32 under autocast: embedding + bf16 promotes
        block = sh.saved[1] if not bf16 else tokens * (2 * d + 7 * d + 4 + m.heads) * FLOAT
        kept = {"blocks": residual, "selective": residual + tokens * (7 * d * half + m.heads) * FLOAT}
        split *= half
    saved[1:-1] = [block] * m.depth
    if t.activation_checkpointing in kept:
        recompute = max(0.0, block - kept[t.activation_checkpointing])
        saved[1:-1] = [kept[t.activation_checkpointing]] * m.depth
        split = 0.0 if t.activation_checkpointing == "blocks" else \
            m.depth * tokens * (2 * d if m.kind == "mlp" else 7 * d + m.heads) * FLOAT * half
    return dataclasses.replace(sh, saved=saved, out=out, split=split), recompute


def formula(cfg: RunConfig, devices: list[Device]) -> list[DeviceEstimate]:
    """Bytes from shapes: who holds which parameters, and how many samples' activations.

    The peak is taken where a run's is: at the end of a forward, with the last step's
    gradients still alive (zero_grad comes after the forward), or after a backward."""
    from .models import split_layers

    t, n, mode = cfg.train, len(devices), cfg.mode
    sh, recompute = with_levers(cfg, shapes(cfg))
    state = 2 if t.optimizer in ("adam", "adamw") else 0
    # Activations are one micro-batch's (gradient accumulation); B is the micro-batch.
    B, total, everything = t.batch_size // t.grad_accumulation, sum(sh.params), range(len(sh.params))
    # bf16 under autocast: a bf16 copy of every weight lives from forward to backward
    # (a working copy: temporaries), and a checkpointed block recomputes in backward.
    autocast = 0.5 if t.precision == "bf16" and mode != "fsdp" else 0.0

    def device(p: float, samples: float, layers: Iterable[int] = everything, other: float = 0.0,
               grads: float | None = None, acts: float | None = None, temps: float = 0.0,
               optimizer: float | None = None) -> dict[str, int]:
        a = samples * sum(sh.saved[i] for i in layers) + sh.fixed if acts is None else acts
        # The recompute runs in backward, once the head has freed what it saved.
        temps += autocast * p + samples * max(0.0, recompute - sh.saved[-1])
        return {"params": int(p), "grads": int(p if grads is None else grads),
                "optimizer": int(state * p if optimizer is None else optimizer),
                "activations": int(a), "temporaries": int(temps), "other": int(other)}

    per = B / n
    # a rank's slice of the batch is a view: its storage is the whole batch
    slices = (t.batch_size - t.batch_size / n) * sh.io
    out: list[dict[str, int]] = []
    whole = B * sum(sh.saved) + sh.fixed
    if mode == "single":
        out = [device(total, B, other=B * sh.unsaved)]
    elif mode == "ddp":
        # DDP's buckets: one more flat copy of the gradients.
        # ZeRO-1 (placement.zero 1): each rank keeps the optimizer state of 1/n of the parameters.
        opt = state * total / n if cfg.placement.zero == 1 else None
        out = [device(total, per, acts=whole - B * sum(sh.saved) + per * sum(sh.saved) + slices,
                      other=per * sh.unsaved + total, optimizer=opt) for _ in devices]
    elif mode == "fsdp":
        shard = _sharded_bytes(cfg, n, lambda name, shape: 0)
        # The layer at work is gathered twice over (the all-gather's buffer and the unsharded
        # parameters); without resharding every layer stays gathered until backward.
        # bf16: FSDP gathers bf16 copies (half the bytes).  Accumulating without gradient sync,
        # every rank keeps the whole unsharded gradients between micro-steps.
        largest, half = max(sh.params), 0.5 if t.precision == "bf16" else 1.0
        gathered = half * (2 * largest if cfg.placement.reshards_after_forward() else total + largest)
        gathered += total if t.grad_accumulation > 1 else 0
        out = [device(shard[r], per, acts=sh.fixed + per * sum(sh.saved) + slices,
                      other=per * sh.unsaved, temps=gathered) for r in range(n)]
    elif mode == "tensor-parallel":
        shard = _sharded_bytes(cfg, n, _tensor_parallel_dims(cfg))
        acts = whole - B * sh.split * (1 - 1 / n)
        out = [device(shard[r], B, acts=acts, other=B * sh.unsaved) for r in range(n)]
    elif mode == "data-parallel":
        chunk = [len(c) for c in _chunks(B, n)] + [0] * n
        # Device 0: the module, its gradients and state, chunk 0 (a view of the whole
        # batch) and the gathered output; the others: a fresh replica and their chunk,
        # then after backward the replica's gradients.
        gather = B * sh.out[-1]
        out = [device(total, chunk[0], other=(B - chunk[0]) * sh.io + gather + B * sh.unsaved)]
        for k in range(1, n):
            # The loss is taken on device 0: what it saves is not here, the output is.
            fwd = device(total, chunk[k], grads=0, other=chunk[k] * sh.out[-1],
                         acts=chunk[k] * (sum(sh.saved) - sh.loss))
            fwd["optimizer"] = 0
            bwd = {**fwd, "grads": total, "activations": 0}
            out.append(max(fwd, bwd, key=lambda b: sum(b.values())))
    elif mode in ("model-parallel", "pipeline"):
        ranges = split_layers(len(sh.params), n, cfg.placement.split)
        for s, layers in enumerate(ranges):
            p = sum(sh.params[i] for i in layers)
            first, last = layers.start == 0, s == n - 1
            received = 0 if first else sh.out[layers.start - 1]  # the input copied in, saved here
            saved = sum(sh.saved[i] for i in layers) + received
            sent = sh.unsaved
            if not last:  # the output the next device saves lives here unsaved, or saved by its own ReLU
                end = layers.stop - 1
                saved -= 0 if sh.keeps_output[end] else sh.out[end]
                sent = 0 if sh.keeps_output[end] else sh.out[end]
            fixed = sh.fixed if first or last else 0
            if mode == "model-parallel":
                out.append(device(p, B, layers, acts=B * saved + fixed, other=B * sent))
                continue
            m = t.micro_batches
            in_flight = B if t.schedule == "gpipe" else min(m, n - s) * B / m
            acts = in_flight * saved + fixed
            buffers = 0 if last else B * sh.out[layers.stop - 1]  # a gradient buffer per micro-batch
            # zero_grad runs before the schedule: gradients exist mid-step only once a
            # micro-batch's backward has run, which 1F1B does before the last forward.
            grads = p if t.schedule == "1f1b" and m > n - s else 0
            fwd = device(p, in_flight, layers, grads=grads, acts=acts, other=buffers)
            bwd = device(p, 0, layers, acts=0, other=buffers)
            out.append(max(fwd, bwd, key=lambda b: sum(b.values())))
    elif mode == "mesh":
        out = [_mesh_device(cfg, sh, r, device) for r in range(n)]
    if offloaded(cfg):  # the shards, their gradients and the optimizer state are the host's
        out = [{**b, "params": 0, "grads": 0, "optimizer": 0} for b in out]
    return [DeviceEstimate(d.index, d.label, sum(b.values()), b, d.capacity_bytes, "formula")
            for d, b in zip(devices, out)]


def offloaded(cfg: RunConfig) -> bool:
    """placement.cpu_offload: FSDP keeps the parameter shards, their gradients and the
    optimizer state in host memory; the device keeps what it gathers and computes with."""
    return cfg.placement.cpu_offload and (cfg.mode == "fsdp" or (cfg.mode == "mesh" and cfg.mesh.shard > 1))


def _mesh_device(cfg: RunConfig, sh: Shapes, rank: int, device: Any) -> dict[str, int]:
    """One rank of a composed mesh: its stage's layers (pp), each block's tp slice, that
    sharded over `shard` (padded as FSDP pads), its share of the batch (dp × shard) with
    the pipeline's micro-batches in flight; a block's split activations divided by tp."""
    from .models import split_layers, tensor_splits
    from .plan import Plan

    t, plan = cfg.train, Plan.of(cfg, 0)
    at = plan.coordinate(rank)
    stage, ways = at["pp"], plan.batch_ways
    layers = split_layers(len(sh.params), plan.pp, cfg.placement.split)[stage]
    first, last = stage == 0, stage == plan.pp - 1
    params, largest, tp_dim = 0, 0, _tensor_parallel_dims(cfg)
    for i in layers:
        held = 0
        for name, shape in named_shapes(cfg.model):
            if int(name.split(".")[0]) != i:
                continue
            dims = list(shape)
            dim = tp_dim(name, shape) if plan.tp > 1 else None
            if dim is not None and dim < len(dims):
                dims[dim] = chunk_len(dims[dim], plan.tp, at["tp"])
            whole = math.prod(dims) * FLOAT
            largest = max(largest, whole) if ways > 1 else 0
            if plan.shard > 1 and dims:  # FSDP pads dim 0 to a multiple of the shard count
                whole = -(-dims[0] // plan.shard) * math.prod(dims[1:]) * FLOAT
            held += whole
        params += held
    samples = t.batch_size / ways
    m = t.micro_batches if plan.pp > 1 else 1
    in_flight = samples if plan.pp == 1 or t.schedule == "gpipe" else min(m, plan.pp - stage) * samples / m
    splits = tensor_splits(cfg.model)
    here = sum(1 for s in splits if s.layers <= set(layers)) / max(len(splits), 1)
    split = sh.split * here * (1 - 1 / plan.tp)
    acts = in_flight * (sum(sh.saved[i] for i in layers) - split) + (sh.fixed if first or last else 0)
    gathered = (2 * largest if cfg.placement.reshard_after_forward else params * plan.shard + largest) if ways > 1 else 0
    other = in_flight * sh.unsaved if last else samples * sh.out[layers.stop - 1]
    return device(params, in_flight, layers, acts=acts, other=other, temps=gathered)


def _chunks(batch: int, n: int) -> list[range]:
    size = -(-batch // n)  # torch.chunk's rule, as nn.DataParallel's scatter uses
    return [range(i, min(i + size, batch)) for i in range(0, batch, size)]


def _sharded_bytes(cfg: RunConfig, n: int, dim_of: Any) -> list[int]:
    """Parameter bytes of each rank when every parameter is cut along the dim
    `dim_of(name, shape)` gives (None: kept whole), padded as torch.chunk cuts."""
    out = [0] * n
    for name, shape in named_shapes(cfg.model):
        dim, numel = dim_of(name, shape), math.prod(shape)
        if dim is None or dim >= len(shape):
            for r in range(n):
                out[r] += numel * FLOAT
            continue
        rest = numel // shape[dim]
        for r in range(n):
            # FSDP pads every shard to the largest (dim 0); DTensor keeps its chunk's size.
            rows = -(-shape[dim] // n) if dim == 0 and cfg.mode == "fsdp" else chunk_len(shape[dim], n, r)
            out[r] += rows * rest * FLOAT
    return out


def _tensor_parallel_dims(cfg: RunConfig) -> Any:
    """dim_of(name, shape) for _sharded_bytes: the dim models.tensor_splits cuts, or None."""
    from .models import tensor_splits

    dims = {name: dim for split in tensor_splits(cfg.model) for name, dim in split.dims().items()}
    return lambda name, shape: dims.get(name)


@functools.lru_cache(maxsize=8)
def named_shapes(model: ModelConfig) -> tuple[tuple[str, tuple[int, ...]], ...]:
    """Every parameter's name and shape, from a model on the meta device: asked on each
    edit of the form (the run's preflight), so built once per model."""
    from .models import build_model

    return tuple((name, tuple(p.shape)) for name, p in build_model(model, 0, device="meta").named_parameters())


@functools.lru_cache(maxsize=8)
def meta_shapes(model: ModelConfig) -> tuple[tuple[tuple[int, ...], ...], ...]:
    """Each layer's parameter shapes, from a model on the meta device (nothing allocated)."""
    from .models import build_model

    built = build_model(model, 0, device="meta")
    return tuple(tuple(tuple(p.shape) for p in layer.parameters()) for layer in built)


def layer_params(cfg: RunConfig) -> list[int]:
    """Parameter bytes of each layer."""
    return [sum(math.prod(s) for s in layer) * FLOAT for layer in meta_shapes(cfg.model)]


def chunk_len(n: int, world: int, r: int) -> int:
    """Rows of chunk r when n rows are split in `world` chunks as DTensor splits them."""
    size = -(-n // world)
    return max(0, min(size, n - r * size))
