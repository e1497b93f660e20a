"""single: the whole model and the whole batch on one device — the baseline every
other mode must match step for step."""

from __future__ import annotations

from ..data import make_dataset
from ..models import build_model, loss_fn
from . import Trainer, learned_line, make_optimizer


def apply_single(ctx) -> Trainer:
    cfg, device = ctx.cfg, ctx.local_devices[0]
    model = build_model(cfg.model, cfg.seed).to(device.torch_device)
    data = make_dataset(cfg.data, cfg.model, cfg.seed).to(device.torch_device)
    optimizer = make_optimizer(model.parameters(), cfg.train)
    ctx.ledger.add_params(model.parameters(), device.index)
    ctx.ledger.add_optimizer(optimizer)
    ctx.ledger.checkpoint("setup")
    batch_size, d = cfg.train.batch_size, device.index

    def step(i, probe):
        x, y = data.batch(i, batch_size)
        with probe.phase(d, "forward"):
            out = model(x)
            loss = loss_fn(cfg.model, out, y)
            probe.other(d, x, y, out, loss)
        with probe.phase(d, "backward"):
            # As in the seeds: last step's gradients live through this forward.
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
        with probe.phase(d, "optimizer"):
            optimizer.step()
        return loss

    return Trainer(step, [optimizer], learned_line(model))
