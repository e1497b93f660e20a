"""Check a RunConfig as a value, before any process or torch.distributed starts.

Each problem is a sentence a person can act on.  The parallel layout (devices × mode ×
batch × layers) is checked here once, so no strategy has to.
"""

from __future__ import annotations

from . import devices
from .config import (
    CHECKPOINTING,
    DATASETS,
    MODELS,
    OPTIMIZERS,
    PRECISIONS,
    SCHEDULES,
    ConfigError,
    RunConfig,
    shown,
)
from .data import data_kind
from .gpus import gpu_models
from .models import num_layers, split_layers, tensor_splits
from .modes import MODES, REGISTRY
from .plan import Plan, mesh_problems

MAX_SEED = 2**63 - 1
MAX_STEPS = 10**12
MAX_SIZE = 10**12
"""Sizes past this are typos (the host-memory check catches what is merely too large)."""
MAX_INTERVAL_S = 3600.0
MAX_HANG_TIMEOUT_S = 86400.0
MAX_TEXT = 10_000


def problems(cfg: RunConfig, *, resolve_devices: bool = True) -> list[str]:
    out: list[str] = []
    m, t = cfg.model, cfg.train

    def need(condition: bool, sentence: str) -> None:
        if not condition:
            out.append(sentence)

    need(cfg.mode in MODES, f"mode {shown(cfg.mode)} is not one of: {', '.join(MODES)}")
    need(m.kind in MODELS, f"model {shown(m.kind)} is not one of: {', '.join(MODELS)}")
    need(cfg.data.kind in DATASETS, f"data {shown(cfg.data.kind)} is not one of: {', '.join(DATASETS)}")
    need(t.optimizer in OPTIMIZERS, f"optimizer {shown(t.optimizer)} is not one of: {', '.join(OPTIMIZERS)}")
    need(t.schedule in SCHEDULES, f"schedule {shown(t.schedule)} is not one of: {', '.join(SCHEDULES)}")
    need(t.steps >= 1, f"train.steps must be at least 1, not {t.steps}")
    need(t.batch_size >= 1, f"train.batch_size must be at least 1, not {t.batch_size}")
    need(t.lr > 0, f"train.lr must be above 0, not {t.lr}")
    need(t.lr <= 100, f"train.lr {t.lr} is far too large to train; try 0.01")
    need(t.micro_batches >= 1, f"train.micro_batches must be at least 1, not {t.micro_batches}")
    need(t.log_every >= 1, f"train.log_every must be at least 1, not {t.log_every}")
    need(1 <= t.grad_accumulation <= MAX_STEPS,
         f"train.grad_accumulation must be at least 1 (micro-steps per optimizer step), not {t.grad_accumulation}")
    need(t.activation_checkpointing in CHECKPOINTING,
         f"train.activation_checkpointing {shown(t.activation_checkpointing)} is not one of: {', '.join(CHECKPOINTING)}")
    need(t.precision in PRECISIONS, f"train.precision {shown(t.precision)} is not one of: {', '.join(PRECISIONS)}")
    need(cfg.placement.zero in (0, 1, 2, 3),
         f"placement.zero must be 0 (the mode's own), 1, 2 or 3, not {cfg.placement.zero}")
    need(cfg.sim.memory >= 2**20, f"sim.memory {int(cfg.sim.memory)} bytes is too small; give at least 1MiB, e.g. 24GiB")
    if cfg.sim.gpu != "host":
        known = gpu_models()
        need(cfg.sim.gpu in known, f"sim.gpu {cfg.sim.gpu[:40]!r} is not a GPU model paralab knows; "
             f"use one of {', '.join(sorted(known))} or 'host' (the CPU's own time)")
    need(0.01 <= cfg.telemetry.interval_s <= MAX_INTERVAL_S,
         f"telemetry.interval_s must be from 0.01 to {MAX_INTERVAL_S:g} s, not {cfg.telemetry.interval_s:g}")
    need(1 <= cfg.telemetry.hang_timeout_s <= MAX_HANG_TIMEOUT_S,
         f"telemetry.hang_timeout_s must be from 1 to {MAX_HANG_TIMEOUT_S:g} s (a day), "
         f"not {cfg.telemetry.hang_timeout_s:g}")
    need(0 <= cfg.seed <= MAX_SEED, f"seed must be from 0 to 2**63-1 (torch's range), not {shown(cfg.seed)}")
    need(t.steps <= MAX_STEPS and t.log_every <= MAX_STEPS and t.micro_batches <= MAX_STEPS,
         f"train.steps, train.log_every and train.micro_batches must be at most {MAX_STEPS:g}")
    need(len(cfg.name) <= MAX_TEXT and len(cfg.description) <= MAX_TEXT,
         f"name and description must be at most {MAX_TEXT} characters")
    need(cfg.data.samples >= 0, f"data.samples must be 0 (the default) or more, not {cfg.data.samples}")
    need(0 <= cfg.data.noise <= 1e6, f"data.noise must be from 0 to 1e6, not {cfg.data.noise:g}")
    need(max(cfg.data.samples, m.in_features, m.out_features, m.vocab, m.seq_len, m.heads, t.batch_size)
         <= MAX_SIZE, f"data.samples, train.batch_size and the model's sizes must be at most {MAX_SIZE:.0e}")
    if m.kind in ("mlp", "transformer"):
        need(m.width >= 1, f"model.width must be at least 1, not {m.width}")
        need(m.depth >= 1, f"model.depth must be at least 1, not {m.depth}")
        need(m.width <= 65536 and m.depth <= 1024, "the model is larger than paralab builds (width ≤ 65536, depth ≤ 1024)")
    if m.kind == "mlp":
        need(m.in_features >= 1 and m.out_features >= 1, "model.in_features and model.out_features must be at least 1")
    if m.kind == "transformer":
        need(m.heads >= 1 and m.width % max(m.heads, 1) == 0,
             f"model.heads {m.heads} must divide model.width {m.width}")
        need(m.seq_len >= 1 and m.vocab >= 2, "model.seq_len must be at least 1 and model.vocab at least 2")
    if m.kind in MODELS and cfg.data.kind in DATASETS:
        kind = data_kind(cfg.data, m)
        tokens_model = m.kind == "transformer"
        need((kind == "tokens") == tokens_model,
             f"data {shown(kind)} does not fit model {shown(m.kind)}; use data.kind=auto")
    if out:
        return out  # the layout checks below assume sane basics

    n = _device_count(cfg, resolve_devices, out)
    if n is None:
        return out
    out.extend(layout_problems(cfg, n))
    return out


def _device_count(cfg: RunConfig, resolve_devices: bool, out: list[str]) -> int | None:
    try:
        if resolve_devices:
            return len(devices.resolve(cfg.devices, cfg.sim.memory))
        n = devices.count(cfg.devices)
        return 2 if n is None else n
    except ConfigError as e:
        out.append(str(e))
        return None


def _shares_a_gpu(spec: str) -> bool:
    parsed = devices.parse_spec(spec)
    return parsed.kind == "cuda" and parsed.share > 1


def layout_problems(cfg: RunConfig, n: int) -> list[str]:
    """Mode × devices × batch × layers, for n logical devices."""
    out: list[str] = []
    t, mode, known = cfg.train, cfg.mode, REGISTRY[cfg.mode]
    out.extend(mesh_problems(cfg, n))
    if out:
        return out
    plan = Plan.of(cfg, n)
    layers = num_layers(cfg.model)
    if not known.gloo_cuda and n > 1 and _shares_a_gpu(cfg.devices):
        out.append(f"{mode} cannot run on logical devices that share one GPU ({cfg.devices}): NCCL will not "
                   "put two ranks on one GPU, and gloo has no CUDA "
                   + ("send/receive" if mode == "pipeline" else "all-gather/reduce-scatter")
                   + "; use distinct GPUs (cuda:0,1) or simulated devices (sim:N)")
    if mode == "single" and n != 1:
        out.append(f"mode single runs on one device, but devices {shown(cfg.devices)} names {n}; use sim:1 or cuda:0")
    if known.batch_evenly and t.batch_size % n:
        out.append(f"batch size {t.batch_size} does not split over {n} devices; use a multiple of {n}")
    ways = plan.batch_ways
    if mode == "mesh" and t.batch_size % ways:
        out.append(f"batch size {t.batch_size} does not split over the {ways} replicas and shards "
                   f"(mesh.dp × mesh.shard); use a multiple of {ways}")
    if mode == "data-parallel" and t.batch_size < n:
        out.append(f"batch size {t.batch_size} leaves some of the {n} devices without samples; use at least {n}")
    stages = n if known.splits == "layers" else plan.pp
    if stages > 1 or known.splits == "layers":
        split = cfg.placement.split
        if split:
            if len(split) != stages:
                out.append(f"placement.split gives layers for {len(split)} devices, but the run has {stages}"
                           + (" pipeline stages (mesh.pp)" if mode == "mesh" else ""))
            elif any(c < 1 for c in split):
                out.append("placement.split must give every device at least one layer")
            elif sum(split) != layers:
                out.append(f"placement.split places {sum(split)} layers, but model {cfg.model.kind} has {layers}")
        elif layers < stages:
            out.append(f"model {cfg.model.kind} has {layers} layers: too few for {stages} "
                       + (f"devices (more stages than layers); use at most {layers} devices or a deeper model"
                          if mode != "mesh" else "pipeline stages (mesh.pp); use a smaller mesh.pp or a deeper model"))
    if mode == "pipeline" or plan.pp > 1:
        per_pipeline = t.batch_size // ways if not t.batch_size % ways else t.batch_size
        if per_pipeline % t.micro_batches:
            out.append(f"batch size {t.batch_size} does not split into {t.micro_batches} micro-batches"
                       + (f" per pipeline ({per_pipeline} samples each)" if ways > 1 else ""))
        if t.schedule == "1f1b" and t.micro_batches < stages:
            # torch's Schedule1F1B refuses it: every stage must have a forward in flight.
            out.append("schedule 1f1b needs at least as many micro-batches as "
                       + ("devices" if mode == "pipeline" else "pipeline stages")
                       + f"; use train.micro_batches of {stages} or more, or the gpipe schedule")
    if plan.tp > 1:
        out.extend(_tensor_parallel_problems(cfg, plan.tp))
    out.extend(lever_problems(cfg, n))
    return out


def lever_problems(cfg: RunConfig, n: int) -> list[str]:
    """Gradient accumulation, activation checkpointing, the ZeRO stage and CPU offload against
    the mode, the model and the batch (bf16 runs in every mode)."""
    out: list[str] = []
    t, p, mode, known = cfg.train, cfg.placement, cfg.mode, REGISTRY[cfg.mode]
    k = t.grad_accumulation
    if k > 1:
        if not known.accumulates or (mode == "mesh" and cfg.mesh.pp > 1):
            out.append("pipeline accumulates gradients over its micro-batches already; "
                       "raise train.micro_batches instead of train.grad_accumulation")
        else:
            per_device = (t.batch_size // n if known.batch_evenly
                          else t.batch_size // Plan.of(cfg, n).batch_ways if mode == "mesh" else t.batch_size)
            where = f"each device's {per_device} samples" if known.batch_evenly else f"batch size {per_device}"
            if per_device % k:
                out.append(f"train.grad_accumulation {k} does not divide {where} into equal micro-batches; "
                           f"use a divisor of {per_device}")
            elif mode == "data-parallel" and per_device // k < n:
                out.append(f"micro-batches of {per_device // k} samples leave some of the {n} devices without "
                           f"samples; use train.grad_accumulation of at most {per_device // n}")
    if t.activation_checkpointing in CHECKPOINTING[1:]:
        if cfg.model.kind not in ("mlp", "transformer"):
            out.append(f"activation checkpointing recomputes blocks, and model {cfg.model.kind} has none; "
                       "use the mlp or the transformer")
        elif not known.checkpoints:
            out.append(f"{mode} cannot checkpoint activations: its replicas are made anew each step and gone "
                       "before backward could recompute with them; use ddp")
    if p.zero and mode == "mesh" and p.zero in (2, 3) and cfg.mesh.shard == 1:
        out.append(f"placement.zero {p.zero} chooses how FSDP shards, and this mesh has no shards; "
                   "set mesh.shard above 1")
    elif p.zero and p.zero not in known.zero:
        out.append({1: f"placement.zero 1 shards the optimizer state of ddp; {mode} is not ddp "
                       "(fsdp is ZeRO-2 or 3)",
                    2: f"placement.zero {p.zero} is fsdp's; {mode} does not shard parameters "
                       "(ddp with placement.zero 1 shards its optimizer state)",
                    3: f"placement.zero {p.zero} is fsdp's; {mode} does not shard parameters "
                       "(ddp with placement.zero 1 shards its optimizer state)"}.get(p.zero, ""))
    if p.cpu_offload and not (mode == "fsdp" or (mode == "mesh" and cfg.mesh.shard > 1)):
        out.append("placement.cpu_offload moves FSDP's shards to the host; use fsdp or a mesh with "
                   "mesh.shard above 1")
    return out


def _tensor_parallel_problems(cfg: RunConfig, n: int) -> list[str]:
    splits = tensor_splits(cfg.model)
    if not splits:
        return [f"tensor parallel needs layers wide enough to split; model {cfg.model.kind} has none "
                "(use the split-nn, the mlp or the transformer)"]
    out = []
    for split in splits:
        sentence = (f"tensor parallel splits {split.what} over {n} devices; "
                    f"use {split.fix.format(n=n)}")
        if split.units % n and sentence not in out:
            out.append(sentence)
    plan = Plan.of(cfg, n)
    if plan.pp > 1:  # a pair cut across two stages would send a slice, not an activation
        stages = split_layers(num_layers(cfg.model), plan.pp, cfg.placement.split)
        if any(not any(s.layers <= set(r) for r in stages) for s in splits):
            out.append("tensor parallel's column and row halves of a block must sit in one pipeline stage; "
                       "use another placement.split or a smaller mesh.pp")
    return out
