"""Every preset runs a few steps (examples as smoke tests)."""

import pytest
from paralab.core import presets

from tests.helpers import ended, losses, run_events

# The out-of-memory preset is meant to fail, and must fail the right way.
NAMES = [n for n in presets.names() if n != "out-of-memory"]


@pytest.mark.parametrize("name", NAMES)
def test_preset_runs(name, no_leftover_ranks):
    cfg = presets.load(name)
    devices = "sim:2" if cfg.devices == "auto" else cfg.devices
    cfg = cfg.with_overrides({"devices": devices, "train.steps": 4})
    assert cfg.validate() == []
    events = run_events(cfg)
    assert ended(events).status == "ok", ended(events)
    assert len(losses(events)) == 4


def test_out_of_memory_preset_names_the_device(no_leftover_ranks):
    cfg = presets.load("out-of-memory").with_overrides({"train.steps": 3})
    end = ended(run_events(cfg))
    assert end.status == "oom", end
    assert end.device is not None and f"sim{end.device}" in end.message
