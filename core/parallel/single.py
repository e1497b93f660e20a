"""single: the whole model and the whole batch on one device — the baseline every
other mode must match step for step."""

from __future__ import annotations

from ..data import make_dataset
from ..models import build_model
from ..shapes import Rule
from ..strategy import Trainer
from . import learned_line, make_optimizer, standard_step
from .levers import checkpoint_blocks


def apply_single(ctx) -> Trainer:
    cfg, device = ctx.cfg, ctx.local_devices[0]
    model = build_model(cfg.model, cfg.seed).to(device.torch_device)
    checkpoint_blocks(model, cfg.train.activation_checkpointing, ctx.ledger)
    data = make_dataset(cfg.data, cfg.model, cfg.seed).to(device.torch_device)
    optimizer = make_optimizer(model.parameters(), cfg.train)
    ctx.ledger.add_params(model.parameters(), device.index)
    ctx.ledger.add_optimizer(optimizer)
    ctx.ledger.checkpoint("setup")
    batch_size, d = cfg.train.batch_size, device.index

    def step(i, probe):
        x, y = data.batch(i, batch_size)
        return standard_step(cfg, model, optimizer, probe, d, x, y)

    return Trainer(step, [optimizer], learned_line(model), model=model)


def memory(f: Rule) -> list[dict[str, int]]:
    """The formula's rule: the whole model and the whole batch on the one device."""
    return [f.device(f.total, f.batch, other=f.batch * f.sh.unsaved)]
