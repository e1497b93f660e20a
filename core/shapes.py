"""Bytes of a model, from its shapes on the meta device, and the arithmetic each mode's
formula rule is written in.

The formula (core.formula) asks the config's mode for its rule: `memory(rule)` in the
mode's own module under core.parallel, which says who holds which parameters and how many
samples' activations, in the terms defined here.  Nothing here allocates.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from .config import ModelConfig, RunConfig
from .models import build_model, split_layers, tensor_splits

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


@dataclass(frozen=True)
class Rule:
    """What every mode's rule starts from: the config on n devices, its shapes as the
    levers change them, and `device()`, one device's bytes by category."""

    cfg: RunConfig
    n: int
    sh: Shapes
    recompute: float
    """Bytes per sample one checkpointed block recomputes in backward."""

    @classmethod
    def of(cls, cfg: RunConfig, n: int) -> Rule:
        sh, recompute = with_levers(cfg, shapes(cfg))
        return cls(cfg, n, sh, recompute)

    @property
    def state(self) -> int:
        """Optimizer state per parameter byte: Adam's two moments, SGD (no momentum) none."""
        return 2 if self.cfg.train.optimizer in ("adam", "adamw") else 0

    @property
    def batch(self) -> int:
        """One micro-batch (gradient accumulation): whose activations are alive at once."""
        t = self.cfg.train
        return t.batch_size // t.grad_accumulation

    @property
    def total(self) -> int:
        return sum(self.sh.params)

    @property
    def per(self) -> float:
        """One device's share of the micro-batch, when the batch is split over all of them."""
        return self.batch / self.n

    @property
    def slices(self) -> float:
        """A rank's slice of the batch is a view: its storage is the whole batch."""
        b = self.cfg.train.batch_size
        return (b - b / self.n) * self.sh.io

    @property
    def whole(self) -> float:
        """Activations of the whole micro-batch through every layer."""
        return self.batch * sum(self.sh.saved) + self.sh.fixed

    def device(self, p: float, samples: float, layers: Iterable[int] | None = None, other: float = 0.0,
               grads: float | None = None, acts: float | None = None, temps: float = 0.0,
               optimizer: float | None = None, autocast: bool = True) -> dict[str, int]:
        """One device's bytes by category: p bytes of parameters (and as many of gradients,
        `state` times as many of optimizer state, unless given) and `samples` samples'
        activations through `layers` (all of them by default), unless `acts` is given."""
        sh = self.sh
        layers = range(len(sh.params)) if layers is None else layers
        a = samples * sum(sh.saved[i] for i in layers) + sh.fixed if acts is None else acts
        # bf16 under autocast: a bf16 copy of every weight lives from forward to backward
        # (a working copy: temporaries); FSDP's MixedPrecisionPolicy gathers bf16 instead.
        if autocast and self.cfg.train.precision == "bf16":
            temps += 0.5 * p
        # The recompute runs in backward, once the head has freed what it saved.
        temps += samples * max(0.0, self.recompute - sh.saved[-1])
        return {"params": int(p), "grads": int(p if grads is None else grads),
                "optimizer": int(self.state * p if optimizer is None else optimizer),
                "activations": int(a), "temporaries": int(temps), "other": int(other)}

    def gathered(self, largest: float, total: float, backward: bool) -> float:
        """FSDP's temporaries: the layer at work gathered twice over (the all-gather's buffer
        and the unsharded parameters; bf16 under mixed precision), and in backward its
        unsharded gradients awaiting the reduce-scatter (fp32).  Without resharding after
        forward every layer stays gathered from its forward to its backward.  `largest`: the
        largest unit's unsharded bytes; `total`: all units'.  (The trace measures 3 × the
        largest layer in backward, and total + 2 × it, for the mlp.)"""
        half = 0.5 if self.cfg.train.precision == "bf16" else 1.0
        held = 2 * largest if self.cfg.placement.reshards_after_forward() else total + largest
        return half * held + (largest if backward else 0.0)

    def fsdp_peak(self, p: float, samples: float, acts: float, other: float, gathered: Any,
                  layers: Iterable[int] | None = None, pipelined: bool = False) -> dict[str, int]:
        """A sharded device's peak, the largest of three moments: the end of forward (last
        step's gradients alive until zero_grad), the start of backward (every activation,
        no gradient yet) and the end of backward (every gradient, the activations freed);
        `gathered(backward)` is what FSDP holds gathered then.  Accumulating, or `pipelined`
        (micro-batches through a stage), the gradients live unsharded until the last
        micro-batch reduce-scatters them, and the sharded ones appear as those go.  With
        placement.cpu_offload the shards, their gradients and the optimizer state are the
        host's, not the device's."""
        grads = 0 if self.cfg.train.grad_accumulation > 1 or pipelined else None
        moments = [self.device(p, samples, layers, acts=acts, other=other, temps=gathered(False), autocast=False),
                   self.device(p, samples, layers, acts=acts, other=other, temps=gathered(True), grads=0,
                               autocast=False),
                   self.device(p, samples, layers, acts=0, other=other, temps=gathered(True), grads=grads,
                               autocast=False)]
        if self.cfg.placement.cpu_offload:
            moments = [{**b, "params": 0, "grads": 0, "optimizer": 0} for b in moments]
        return peak(*moments)

    def sharded(self, dim_of: Any, *, pad: bool = False, n: int | None = None) -> list[int]:
        """Parameter bytes of each of n ranks (all devices by default) when every parameter is
        cut along the dim `dim_of(name, shape)` gives (None: kept whole).  DTensor keeps each
        chunk's own size; FSDP (`pad`) pads every dim-0 shard to the largest."""
        n = self.n if n is None else n
        out = [0] * n
        for name, shape in named_shapes(self.cfg.model):
            dim, numel = dim_of(name, shape), math.prod(shape)
            if dim is None or dim >= len(shape):
                for r in range(n):
                    out[r] += numel * FLOAT
                continue
            rest = numel // shape[dim]
            for r in range(n):
                rows = -(-shape[dim] // n) if dim == 0 and pad else chunk_len(shape[dim], n, r)
                out[r] += rows * rest * FLOAT
        return out

    def stage(self, layers: range, last: bool) -> tuple[float, float, float, float]:
        """A stage of consecutive layers (model-parallel, pipeline, a mesh's pp): its
        parameter bytes; per sample, what it saves (the input copied in is saved here) and
        what it sends on unsaved; the saved bytes that do not grow with the batch."""
        sh = self.sh
        p = sum(sh.params[i] for i in layers)
        received = 0 if layers.start == 0 else sh.out[layers.start - 1]
        saved = sum(sh.saved[i] for i in layers) + received
        sent = sh.unsaved
        if not last:  # the output the next device saves lives here unsaved, or saved by its own ReLU
            end = layers.stop - 1
            saved -= 0 if sh.keeps_output[end] else sh.out[end]
            sent = 0 if sh.keeps_output[end] else sh.out[end]
        return p, saved, sent, sh.fixed if layers.start == 0 or last else 0


def peak(*phases: dict[str, int]) -> dict[str, int]:
    """The phase whose bytes add up to the most: a device's peak is one moment's."""
    return max(phases, key=lambda b: sum(b.values()))


def stage_layers(cfg: RunConfig, stages: int) -> list[range]:
    """The layers of each of `stages` consecutive stages (placement.split, else even)."""
    return split_layers(len(layer_params(cfg)), stages, cfg.placement.split)


def tensor_parallel_dims(model: ModelConfig) -> Any:
    """dim_of(name, shape) for Rule.sharded: the dim models.tensor_splits cuts, or None."""
    dims = {name: dim for split in tensor_splits(model) for name, dim in split.dims().items()}
    return lambda name, shape: dims.get(name)


@functools.lru_cache(maxsize=8)
def named_shapes(model: ModelConfig) -> tuple[tuple[str, tuple[int, ...]], ...]:
    """Every parameter's name and shape, from a model on the meta device: asked on each
    edit of the form (the run's preflight), so built once per model."""
    return tuple((name, tuple(p.shape)) for name, p in build_model(model, 0, device="meta").named_parameters())


@functools.lru_cache(maxsize=8)
def meta_shapes(model: ModelConfig) -> tuple[tuple[tuple[int, ...], ...], ...]:
    """Each layer's parameter shapes, from a model on the meta device (nothing allocated)."""
    built = build_model(model, 0, device="meta")
    return tuple(tuple(tuple(p.shape) for p in layer.parameters()) for layer in built)


def layer_params(cfg: RunConfig) -> list[int]:
    """Parameter bytes of each layer."""
    return [sum(math.prod(s) for s in layer) * FLOAT for layer in meta_shapes(cfg.model)]


def chunk_len(n: int, world: int, r: int) -> int:
    """Rows of chunk r when n rows are split in `world` chunks as DTensor splits them."""
    size = -(-n // world)
    return max(0, min(size, n - r * size))
