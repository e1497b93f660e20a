"""Every preset runs a few steps (examples as smoke tests)."""

import pytest
from paralab.core import presets, validation

from tests.helpers import ended, losses, run_events

# The out-of-memory preset is meant to fail, and must fail the right way.
NAMES = [n for n in presets.names() if n != "out-of-memory"]


STEPS = 8


@pytest.mark.parametrize("name", NAMES)
def test_preset_runs_and_its_loss_falls_from_the_first_steps(name, no_leftover_ranks):
    """A teaching preset's first impression is a loss that falls: no step of the first
    few above the first (mlp-ddp once jumped from 0.53 to 3.47 at step 2), and lower at the end."""
    cfg = presets.load(name)
    devices = "sim:2" if cfg.devices == "auto" else cfg.devices
    cfg = cfg.with_overrides({"devices": devices, "train.steps": STEPS})
    assert validation.problems(cfg) == []
    events = run_events(cfg)
    assert ended(events).status == "ok", ended(events)
    loss = losses(events)
    assert len(loss) == STEPS
    assert max(loss[1:]) <= 1.05 * loss[0] and loss[-1] < loss[0], loss


def test_out_of_memory_preset_names_the_device(no_leftover_ranks):
    cfg = presets.load("out-of-memory").with_overrides({"train.steps": 3})
    end = ended(run_events(cfg))
    assert end.status == "oom", end
    assert end.device is not None and f"sim{end.device}" in end.message
