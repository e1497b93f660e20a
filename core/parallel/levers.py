"""The levers a person turns to make a model fit, shared by the modes that run blocks.

activation checkpointing  `blocks`: every block (ResidualMLPBlock, TransformerBlock) runs
                          under torch's non-reentrant checkpoint, so it keeps only its input
                          and runs its forward again in backward.  `selective`: torch's
                          selective activation checkpointing with torchtitan's op-level
                          policy: attention's output and every other matmul's are kept,
                          the rest is recomputed.
mixed precision (bf16)    float32 master weights, gradients and optimizer state; forward and
                          backward under torch.autocast in bfloat16 (FSDP2 uses its own
                          MixedPrecisionPolicy instead, see core.parallel.fsdp).
gradient accumulation     the batch is cut into `grad_accumulation` micro-batches; each runs
                          forward and backward on its own (its loss divided by k, so the summed
                          gradients are the whole batch's) and one optimizer step follows.

What the ledger sees: checkpointed blocks' inputs and the selectively kept matmul outputs
are told to it as activations (autograd's saved-tensor hooks do not see them: checkpoint
keeps them itself); what a block recomputes in backward lives only there (temporaries),
and its ops and time are the `recompute` phase (inside backward) on the timeline.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import (
    CheckpointPolicy,
    checkpoint,
    create_selective_checkpoint_contexts,
)

from ..config import RunConfig
from ..models import ResidualMLPBlock, TransformerBlock

BLOCKS = (ResidualMLPBlock, TransformerBlock)

# torchtitan's op-level selective checkpointing keeps what is expensive to recompute: the
# matmuls and attention.  The rest (ReLU, GELU, LayerNorm, adds) is recomputed in backward.
_aten = torch.ops.aten
MATMULS = {_aten.mm.default, _aten.addmm.default, _aten.bmm.default, _aten.baddbmm.default}
SAVED_OPS = {*MATMULS,
             *(getattr(_aten, name).default for name in (
                 "_scaled_dot_product_flash_attention", "_scaled_dot_product_efficient_attention",
                 "_scaled_dot_product_flash_attention_for_cpu", "_scaled_dot_product_cudnn_attention")
               if hasattr(_aten, name))}


def checkpoint_blocks(model: nn.Module, how: str, ledger: Any) -> None:
    """Run every block of `model` under activation checkpointing (`how` = blocks or
    selective; none leaves it alone).  The ledger is told each tensor the checkpoint keeps
    for backward (an activation), and the block's second run, inside backward, happens in
    its `recompute` context.  The block's forward is wrapped in place, so its parameters
    keep their names (tensor parallel's plan, FSDP's units and materialise see the same
    module)."""
    if how == "none":
        return
    saved = ledger_saved(ledger)
    for block in model.modules():
        if isinstance(block, BLOCKS):
            block.forward = functools.partial(_checkpointed, _again(block.forward, ledger), how, saved)


def _again(forward: Callable, ledger: Any) -> Callable:
    """The forward checkpoint runs: as itself in forward, as the recompute in backward."""

    def run(*args: Any) -> Any:
        device, phase = ledger.where()
        if phase != "backward":
            return forward(*args)
        with ledger.recompute(device):
            return forward(*args)

    return run


def _checkpointed(forward: Callable, how: str, saved: Callable, x: torch.Tensor) -> torch.Tensor:
    saved(x)  # checkpoint keeps the block's input to run it again in backward
    context = functools.partial(_selective, saved) if how == "selective" else None
    kwargs = {"context_fn": context} if context else {}
    # No RNG state to replay: paralab's blocks have no dropout, so the recompute is exact.
    return checkpoint(forward, x, use_reentrant=False, preserve_rng_state=False, **kwargs)


def _selective(saved: Callable) -> tuple[Any, Any]:
    """torchtitan's op-level policy: keep attention's output and every other matmul's (the
    first, third, ... of the block), recompute the rest.  Keeping every matmul would keep
    more than no checkpointing at all in an MLP block: its second matmul's output feeds
    only the residual add, which saves nothing."""
    matmuls = [0]

    def policy(ctx: Any, op: Any, *args: Any, **kwargs: Any) -> CheckpointPolicy:
        if op in MATMULS:
            matmuls[0] += 1
        if op in SAVED_OPS and not (op in MATMULS and matmuls[0] % 2 == 0):
            for t in _tensors(ctx.op_output):
                saved(t)
            return CheckpointPolicy.MUST_SAVE
        return CheckpointPolicy.PREFER_RECOMPUTE

    return create_selective_checkpoint_contexts(policy)


def _tensors(out: Any) -> Iterator[torch.Tensor]:
    for t in out if isinstance(out, (tuple, list)) else (out,):
        if isinstance(t, torch.Tensor):
            yield t


def ledger_saved(ledger: Any) -> Callable[[torch.Tensor], None]:
    """`saved` for checkpoint_blocks: the ledger marks t as an activation on sampled steps."""

    def saved(t: torch.Tensor) -> None:
        if ledger.recording_allocations and torch.is_grad_enabled():
            ledger.mark_saved(t)

    return saved


def autocast(cfg: RunConfig, device_type: str) -> Any:
    """bf16 compute under torch.autocast (CPU autocast on simulated devices); nothing in fp32."""
    if cfg.train.precision != "bf16":
        return contextlib.nullcontext()
    return torch.autocast(device_type, dtype=torch.bfloat16)


def micro_batches(cfg: RunConfig, x: torch.Tensor, y: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The batch cut into grad_accumulation equal micro-batches (views: no copy)."""
    k = cfg.train.grad_accumulation
    if k == 1:
        return [(x, y)]
    return list(zip(x.chunk(k), y.chunk(k)))


def scaled(loss: torch.Tensor, k: int) -> torch.Tensor:
    """The micro-batch's loss as its share of the batch's mean loss (unchanged when k = 1)."""
    return loss if k == 1 else loss / k
